"""Plain-torch references of the RL kernels: the CPU default and what the Triton kernels are
tested against. Log-softmax runs in fp32 from any input dtype.

Conventions (see DESIGN.md), per token with temperature T:
  logp = z_y/T - logsumexp(z/T);  r = exp(logp - logp_old)
  pg = -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A), and for A < 0 at most -A*clip_ratio_c (dual clip)
  loss = pg + kl_beta * k3,  k3 = clamp(exp(d) - d - 1, -kl_max, kl_max),  d = clamp(ref - logp, +-kl_log_ratio_max)
  (each clamp passes no gradient where it holds, as verl's low_var_kl does; kl_max None: no value bound)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .packed import sequence_means

STD_MODES = ("unbiased", "population", None)


def group_advantages(rewards: torch.Tensor, offsets: torch.Tensor, *, std: Optional[str] = "unbiased",
                     eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` per group ``[offsets[i], offsets[i+1])``; ``std=None``: ``r - mean_g``.

    A group of one has advantage 0 (its reward is its mean); the unbiased std of one sample is
    taken as 0 rather than undefined.
    """
    r = rewards.float()
    sizes = (offsets[1:] - offsets[:-1]).long()
    group = torch.repeat_interleave(torch.arange(len(sizes), device=r.device), sizes)
    n = sizes.float().to(r.device)
    mean = torch.zeros(len(sizes), device=r.device).index_add_(0, group, r) / n
    centred = r - mean[group]
    if std is None:
        return centred
    sq = torch.zeros(len(sizes), device=r.device).index_add_(0, group, centred * centred)
    denom = (n - 1).clamp(min=1) if std == "unbiased" else n
    return centred / ((sq / denom).sqrt()[group] + eps)


class _AllReduceFwd(torch.autograd.Function):
    """All-reduce forward, identity backward: every rank computes the same replicated loss, so
    the gradient reaching each rank's partial input is the loss gradient itself (not tp x it)."""

    @staticmethod
    def forward(ctx, x, op, group):
        x = x.clone()
        dist.all_reduce(x, op=op, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _global_lse_and_target(z: torch.Tensor, labels: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp and target logit of vocab-sharded fp32 logits ``z`` (differentiable)."""
    v_local = z.shape[-1]
    start = dist.get_rank(group) * v_local
    local = labels - start
    in_shard = (local >= 0) & (local < v_local)
    target = torch.where(in_shard, z.gather(-1, local.clamp(0, v_local - 1)[:, None])[:, 0], torch.zeros_like(z[:, 0]))
    target = _AllReduceFwd.apply(target, dist.ReduceOp.SUM, group)
    m = _AllReduceFwd.apply(z.detach().amax(-1), dist.ReduceOp.MAX, group)  # a constant shift
    s = _AllReduceFwd.apply(torch.exp(z - m[:, None]).sum(-1), dist.ReduceOp.SUM, group)
    return m + torch.log(s), target


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   tp_group=None) -> torch.Tensor:
    """``log softmax(logits / T)[label]`` in fp32; differentiable."""
    z = logits.float() / temperature
    if tp_group is None:
        lse = torch.logsumexp(z, dim=-1)
        target = z.gather(-1, labels[:, None].long())[:, 0]
    else:
        lse, target = _global_lse_and_target(z, labels.long(), tp_group)
    return target - lse


def masked_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
                          temperature: float = 1.0, tp_group=None) -> torch.Tensor:
    """:func:`token_logprobs` of the rows on ``mask``, 0 elsewhere; masked rows are never read,
    so NaN (or an out-of-range label) there cannot leak."""
    rows = mask.bool().nonzero()[:, 0]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    return out.index_put((rows,), token_logprobs(logits[rows], labels[rows], temperature=temperature,
                                                 tp_group=tp_group))


def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0, clip_low: float = 0.2,
              clip_high: float = 0.2, clip_ratio_c: Optional[float] = 3.0, kl_beta: float = 0.0,
              kl_log_ratio_max: float = 20.0, kl_max: Optional[float] = 10.0, tp_group=None,
              rollout_weights: Optional[torch.Tensor] = None, sequence: Optional[torch.Tensor] = None,
              num_sequences: int = 0, cp_group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (loss, logp, k3) in fp32; masked tokens give 0 and no gradient.
    ``rollout_weights`` (no gradient) multiply the policy term: the rollout correction.
    ``sequence`` (each row's sequence, see ``packed.sequence_means``): GSPO's sequence-level
    ratio, ``exp(logp - sg(logp) + sg(mean over the sequence of (logp - old)))``: its value is
    the sequence's ratio, its gradient flows through each token's own log-prob."""
    keep = mask.bool()
    logp = masked_token_logprobs(logits, labels, keep, temperature=temperature, tp_group=tp_group)
    adv = advantages.detach().float()  # gradients go to the logits only, as on the Triton path
    log_ratio = logp - old_logprobs.detach().float()
    if sequence is not None:
        log_ratio = logp - logp.detach() + sequence_means(log_ratio, keep, sequence, num_sequences, cp_group)
    ratio = torch.exp(log_ratio.detach())
    dual = (adv < 0) & (ratio > clip_ratio_c) if clip_ratio_c is not None else torch.zeros_like(keep)
    # where a clip wins, or A = 0, the policy term has no gradient: cut the graph before exp so
    # an overflowing ratio cannot turn that 0 into 0 * inf = NaN
    no_grad = (adv == 0) | ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low)) | dual
    ratio = torch.exp(torch.where(no_grad, log_ratio.detach(), log_ratio))
    unclipped = torch.where(adv == 0, 0.0, ratio * adv)
    pg = -torch.minimum(unclipped, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if clip_ratio_c is not None:
        pg = torch.where(dual, -adv * clip_ratio_c, pg)
    if rollout_weights is not None:
        pg = pg * rollout_weights.detach().float()
    delta = torch.clamp(ref_logprobs.detach().float() - logp, -kl_log_ratio_max, kl_log_ratio_max)
    k3 = torch.exp(delta) - delta - 1
    if kl_max is not None:
        k3 = torch.clamp(k3, -kl_max, kl_max)
    loss = pg + kl_beta * k3 if kl_beta else pg  # kl_beta = 0: the KL term is off entirely
    zero = torch.zeros_like(loss)
    return torch.where(keep, loss, zero), logp, torch.where(keep, k3, zero)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, tp_group=None, chunk_rows: int = 1024
                  ) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` per row, fp32, rows processed ``chunk_rows`` at a time
    (never a full fp32 copy of the logits). With ``tp_group`` the logits are a vocab shard."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_rows):
        z = flat[start:start + chunk_rows].float() / temperature
        m = z.amax(-1)
        if tp_group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        e = torch.exp(z - m[:, None])
        s, t = e.sum(-1), (e * z).sum(-1)
        if tp_group is not None:
            st = torch.stack([s, t])
            dist.all_reduce(st, group=tp_group)
            s, t = st[0], st[1]
        out[start:start + chunk_rows] = m + torch.log(s) - t / s
    return out.reshape(logits.shape[:-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen's RMSNorm: the statistics in fp32, the normalised input cast back to ``x``'s dtype
    before the weight (what ``models.common.norm.RMSNorm`` runs unfused)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t * cos(f) + rotate_half(t) * sin(f)`` over the first ``freqs.shape[-1]`` channels (the
    halves rotated, not interleaved pairs), the rest passed; cos and sin cast to ``t``'s dtype."""
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)
