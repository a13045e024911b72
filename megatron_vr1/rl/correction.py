"""Rollout correction: the engine that sampled a response and the trainer that scores it compute
its log-probs differently (kernels, batching, bf16), so the rollout is slightly off-policy even
before the first update. The trainer measures the gap on every step and can reweight the
policy term by a truncated importance weight (TIS) or mask the tokens that diverge (MIS):

    r_t = exp(old_logprob_t - engine_logprob_t)         (trainer over engine, per token)
    token-tis     w_t = min(r_t, cap)
    sequence-tis  w_t = min(prod_t r_t, cap)           (one weight per response, on all its tokens)
    token-mask    w_t = 1 if 1/cap <= r_t <= cap else 0

``loss_t = w_t * pg_t + kl_beta * k3_t``; ``w`` carries no gradient. The engine's log-probs ride
on each micro-batch as ``extras["engine_logprobs"]`` (0 off the loss tokens), the weights as
``extras["rollout_weights"]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..data.batch import Batch
from ..errors import UsageError

MODES = ("token-tis", "sequence-tis", "token-mask")
ENGINE = "engine_logprobs"
WEIGHTS = "rollout_weights"


def check_correction(mode: Optional[str], cap: float) -> None:
    if mode is not None and mode not in MODES:
        raise UsageError(f"rl.loss.rollout_correction must be null, {', '.join(MODES)}; got {mode!r}")
    if not (isinstance(cap, (int, float)) and 1 <= cap < float("inf")):
        raise UsageError(f"rl.loss.rollout_correction_cap must be a finite number >= 1, got {cap!r}")


def token_weights(old: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, *, mode: str, cap: float,
                  sequence_log_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token weights (0 off ``mask``). ``sequence_log_ratio``: for ``sequence-tis``, each
    token's whole-sequence ``sum(old - engine)``."""
    keep = mask.bool()
    log_ratio = (old.double() - engine.double()) if mode != "sequence-tis" else sequence_log_ratio.double()
    if mode == "token-mask":
        w = ((log_ratio >= -math.log(cap)) & (log_ratio <= math.log(cap))).double()
    else:  # min(exp(x), cap) = exp(min(x, log cap)): no overflow on a huge ratio
        w = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))
    return torch.where(keep, w, 0.0).float()


def attach_weights(batches: Sequence[Batch], mode: Optional[str], cap: float, num_sequences: int,
                   sequence_key: str, cp_group=None) -> None:
    """Put ``extras["rollout_weights"]`` on every micro-batch of a step (those with old log-probs:
    the last pipeline stage). A sequence-level weight sums its tokens over the micro-batches and,
    under context parallelism, over the ranks that hold its other chunks."""
    if mode is None or not batches or "old_logprobs" not in batches[0].extras:
        return
    if any(ENGINE not in b.extras for b in batches):
        raise RuntimeError("rl.loss.rollout_correction needs the engine's log-probs, which this engine's "
                           "completions lack")
    seq_sum = None
    if mode == "sequence-tis":
        seq_sum = sequence_log_ratios(batches, num_sequences, sequence_key)
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            dist.all_reduce(seq_sum, group=cp_group)
    set_weights(batches, mode, cap, sequence_key, seq_sum)


def sequence_log_ratios(batches: Sequence[Batch], num_sequences: int, sequence_key: str) -> torch.Tensor:
    """``[num_sequences + 1]``: each sequence's ``sum(old - engine)`` over this rank's loss tokens
    (entry ``i + 1`` for sequence ``i``, as ``extras[sequence_key]`` numbers them)."""
    out = torch.zeros(num_sequences + 1, dtype=torch.float64, device=batches[0].loss_mask.device)
    for b in batches:
        diff = (b.extras["old_logprobs"].double() - b.extras[ENGINE].double()) * b.loss_mask
        out.index_add_(0, b.extras[sequence_key].reshape(-1), diff.reshape(-1))
    return out


def set_weights(batches: Sequence[Batch], mode: str, cap: float, sequence_key: str,
                seq_log_ratio: Optional[torch.Tensor] = None) -> None:
    for b in batches:
        per_token = seq_log_ratio[b.extras[sequence_key]] if seq_log_ratio is not None else None
        b.extras[WEIGHTS] = token_weights(b.extras["old_logprobs"], b.extras[ENGINE], b.loss_mask, mode=mode,
                                          cap=cap, sequence_log_ratio=per_token)


def mismatch(batches: Sequence[Batch], device, *, with_weights: bool) -> dict:
    """Engine vs trainer old log-probs over the world (every rank calls it): the mean and max
    absolute difference, the k3 estimate of KL(engine || trainer), and the mean correction weight.
    Tensor-parallel ranks count the same tokens alike, which leaves means and maxima as they are."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # |diff|, tokens, k3, weights
    worst = torch.zeros(1, dtype=torch.float64, device=device)
    for b in batches:
        if ENGINE not in b.extras or "old_logprobs" not in b.extras:
            continue
        keep = b.loss_mask.bool()
        d = (b.extras["old_logprobs"].double() - b.extras[ENGINE].double())[keep]  # log r
        sums[0] += d.abs().sum()
        sums[1] += keep.sum()
        sums[2] += (torch.exp(d) - 1 - d).sum()
        if WEIGHTS in b.extras:
            sums[3] += b.extras[WEIGHTS].double()[keep].sum()
        if d.numel():
            worst = torch.maximum(worst, d.abs().max()[None])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    abs_sum, tokens, k3, weights = sums.tolist()
    if tokens == 0:
        return {}
    out = {"rollout_logprob_diff_mean": abs_sum / tokens, "rollout_logprob_diff_max": float(worst),
           "rollout_kl": k3 / tokens}
    if with_weights:
        out["rollout_weight_mean"] = weights / tokens
    return out
