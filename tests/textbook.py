"""Independent textbook implementations (float64, whole vocabulary, a loop where it is clearer)."""

from __future__ import annotations

import statistics

import torch


def advantages(rewards: list[float], sizes: list[int], std, eps: float) -> list[float]:
    out, start = [], 0
    for n in sizes:
        group = rewards[start:start + n]
        mean = sum(group) / n
        if std is None:
            out += [r - mean for r in group]
        else:
            sd = 0.0 if n == 1 else (statistics.stdev(group) if std == "unbiased" else statistics.pstdev(group))
            out += [(r - mean) / (sd + eps) for r in group]
        start += n
    return out


def grpo(logits: torch.Tensor, labels, old, ref, adv, mask, *, temperature, clip_low, clip_high, kl_beta,
         clip_ratio_c=3.0, kl_log_ratio_max=20.0, kl_max=10.0, rollout_weights=None):
    """Per-token (loss, logp, k3) from full-vocab logits in float64, differentiable.

    Dual clip (verl): a negative advantage's loss is ``min(PPO loss, -A * clip_ratio_c)``; k3's
    log-ratio is clamped to ``+-kl_log_ratio_max``, and k3 itself to ``+-kl_max`` (verl's
    low_var_kl bound; ``None``: unbounded). ``rollout_weights``: per-token importance weights
    multiplying the policy term (rollout correction)."""
    z = logits.double() / temperature
    losses, logps, kls = [], [], []
    for t in range(z.shape[0]):
        if not bool(mask[t]):
            zero = z.new_zeros(())
            losses.append(zero); logps.append(zero); kls.append(zero)
            continue
        logp = z[t, int(labels[t])] - torch.logsumexp(z[t], dim=-1)
        r = torch.exp(logp - float(old[t]))
        a = float(adv[t])
        pg = -torch.minimum(r * a, torch.clamp(r, 1 - clip_low, 1 + clip_high) * a)
        if a < 0 and clip_ratio_c is not None:
            pg = torch.minimum(pg, torch.tensor(-a * clip_ratio_c, dtype=pg.dtype))
        if rollout_weights is not None:
            pg = float(rollout_weights[t]) * pg
        d = torch.clamp(float(ref[t]) - logp, -kl_log_ratio_max, kl_log_ratio_max)
        k3 = torch.exp(d) - d - 1
        if kl_max is not None:
            k3 = torch.clamp(k3, -kl_max, kl_max)
        losses.append(pg + kl_beta * k3); logps.append(logp); kls.append(k3)
    return torch.stack(losses), torch.stack(logps), torch.stack(kls)


def gspo(logits: torch.Tensor, labels, old, ref, adv, mask, sequences, *, temperature, clip_low, clip_high,
         kl_beta=0.0, kl_log_ratio_max=20.0, kl_max=10.0):
    """GSPO's objective (Zheng et al., 2025) in float64 from full-vocab logits, differentiable:
    per sequence ``i`` (``sequences``: a list of its rows), with ``A_i`` its advantage,
    ``s_i = exp(mean_t(logp_t - old_t))`` over its loss tokens and
    ``J_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i) + kl_beta * mean_t k3_t``;
    returns ``mean_i J_i`` over the sequences with a loss token."""
    z = logits.double() / temperature
    logp = z.gather(1, labels.clamp(min=0)[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
    terms = []
    for rows in sequences:
        rows = [t for t in rows if bool(mask[t])]
        if not rows:
            continue
        idx = torch.tensor(rows)
        s = torch.exp((logp[idx] - old[idx].double()).mean())
        a = float(adv[rows[0]])
        pg = -torch.minimum(s * a, torch.clamp(s, 1 - clip_low, 1 + clip_high) * a)
        d = torch.clamp(ref[idx].double() - logp[idx], -kl_log_ratio_max, kl_log_ratio_max)
        k3 = torch.exp(d) - d - 1
        if kl_max is not None:
            k3 = torch.clamp(k3, -kl_max, kl_max)
        terms.append(pg + kl_beta * k3.mean())
    return torch.stack(terms).mean()
