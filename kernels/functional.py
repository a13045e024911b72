"""The public kernels: checked inputs, then the Triton path or the torch reference.

The Triton path runs on CUDA tensors, or anywhere with ``backend="triton"`` (on CPU that needs
``TRITON_INTERPRET=1``, which is how the tests run it); the torch reference runs otherwise.
Both compute the same thing (DESIGN.md's conventions) and are tested against each other and
against a textbook implementation.

NaN handling (documented, not silent): a NaN in a token's logits, old/ref log-prob or advantage
makes that token's outputs NaN and its gradient NaN; it never reaches other tokens, and masked
tokens are never read, so NaN there is harmless.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .. import platform
from . import reference
from .packed import row_sequences

Backend = str  # "auto" | "triton" | "torch"


def _use_triton(backend: Backend, *tensors: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    if backend == "triton" and not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported (or use backend='torch')")
    return backend == "triton"


def _check_rows(name: str, t: torch.Tensor, rows: torch.Size) -> None:
    if t.shape != rows:
        raise ValueError(f"{name} must have shape {list(rows)} (one value per logits row), got {list(t.shape)}")


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor], tp_group,
                  temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [tokens, vocab] (or [batch, tokens, vocab]), got shape {list(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocab dimension (stride(-1) == 1); "
                         "call .contiguous() first")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    _check_rows("labels", labels, logits.shape[:-1])
    if mask is not None:
        _check_rows("mask", mask, logits.shape[:-1])
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if labels.numel():
        shards = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        vocab = logits.shape[-1] * shards
        # masked rows may hold anything (e.g. -100); no host sync on a GPU
        used = labels if mask is None else torch.where(mask.bool(), labels, 0)
        where = f"the {shards} vocab shards of {logits.shape[-1]}" if tp_group is not None else "the vocab"
        platform.check((used >= 0) & (used < vocab), f"labels must lie in [0, {vocab}) ({where}) on unmasked rows")


def _rows(logits: torch.Tensor, *per_row: Optional[torch.Tensor]):
    """Logits as ``[rows, vocab]`` and per-row tensors as ``[rows]`` (views where possible)."""
    flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    return (flat, *(None if t is None else t.reshape(-1) for t in per_row))


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """Any nonzero entry keeps its token, as ``mask.bool()`` reads it on the torch path (a
    plain cast to int8 would drop 0.5 and wrap 256 to 0)."""
    return mask.bool().to(torch.int8).contiguous()


def group_advantages(rewards: torch.Tensor, group_size: Union[int, torch.Tensor, None] = None, *,
                     group_ids: Optional[torch.Tensor] = None, std: Optional[str] = "unbiased", eps: float = 1e-6,
                     backend: Backend = "auto") -> torch.Tensor:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` per group of rollouts, fp32, shape of ``rewards``.

    Groups are given by ``group_size``, an int (consecutive groups of that size) or a tensor of
    group sizes in order (groups of different sizes, e.g. after filtering), or by ``group_ids``
    (one id per reward, in any order). ``std``: ``"unbiased"`` (n-1), ``"population"`` (n), or
    ``None`` for Dr.GRPO (no division). Groups of one get 0.
    """
    if group_ids is not None:
        if group_size is not None:
            raise ValueError("give group_size or group_ids, not both")
        if group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids must have the shape of rewards {list(rewards.shape)}, got {list(group_ids.shape)}")
        order = torch.argsort(group_ids, stable=True)
        sizes = torch.unique_consecutive(group_ids[order], return_counts=True)[1]
        out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
        out[order] = group_advantages(rewards[order], sizes, std=std, eps=eps, backend=backend)
        return out
    if group_size is None:
        raise ValueError("give group_size or group_ids")
    if std not in reference.STD_MODES:
        raise ValueError(f"std must be 'unbiased', 'population' or None, got {std!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {list(rewards.shape)}")
    if isinstance(group_size, int):
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        sizes = torch.full((rewards.numel() // group_size,), group_size, dtype=torch.int64)
    else:
        sizes = group_size.to(torch.int64).cpu()
        if (sizes < 1).any() or int(sizes.sum()) != rewards.numel():
            raise ValueError(f"group sizes must be >= 1 and sum to {rewards.numel()}, got sum {int(sizes.sum())}")
    offsets = torch.nn.functional.pad(sizes.cumsum(0), (1, 0)).to(rewards.device)
    if not rewards.numel():  # e.g. a rank whose groups were all filtered out
        return torch.empty(0, dtype=torch.float32, device=rewards.device)
    if _use_triton(backend, rewards):
        from .group_advantage import group_advantages_triton

        return group_advantages_triton(rewards, offsets, std=std, eps=eps, max_group=int(sizes.max()))
    return reference.group_advantages(rewards, offsets, std=std, eps=eps)


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, tp_group=None,
                   mask: Optional[torch.Tensor] = None, backend: Backend = "auto") -> torch.Tensor:
    """``log softmax(logits / T)[labels]`` per row, fp32 with the shape of ``labels``, without
    gradient (old and reference policies). ``logits`` is ``[T, V]`` or ``[B, T, V]`` (labels
    ``[T]`` or ``[B, T]``). With ``tp_group`` the logits are this rank's vocab shard and labels
    are global ids. Rows off ``mask`` (if given) are skipped and give 0."""
    _check_logits(logits, labels, mask, tp_group, temperature)
    shape = labels.shape
    logits, labels, mask = _rows(logits, labels, mask)
    if mask is None:
        mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if _use_triton(backend, logits):
        from .fused_grpo_loss import log_probs

        out = log_probs(logits, labels.contiguous(), _kernel_mask(mask), temperature, tp_group)[1]
    else:
        out = reference.masked_token_logprobs(logits, labels, mask, temperature=temperature, tp_group=tp_group)
    return out.reshape(shape)


def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0, clip_low: float = 0.2,
              clip_high: float = 0.2, clip_ratio_c: Optional[float] = 3.0, kl_beta: float = 0.0,
              kl_log_ratio_max: float = 20.0, kl_max: Optional[float] = 10.0, tp_group=None,
              rollout_weights: Optional[torch.Tensor] = None, ratio: str = "token",
              cu_seqlens: Optional[torch.Tensor] = None, cp_group=None, inplace_backward: bool = False,
              backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss, log-probs and k3 KL (fp32, the shape of ``labels``, 0 on masked tokens).

    ``pg = -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A)``, and for ``A < 0`` dual-clipped at
    ``-A * clip_ratio_c`` (verl's default 3; ``None`` switches it off), so a huge ratio on a
    negative advantage cannot make the loss unbounded; ``loss = pg + kl_beta * k3`` with
    ``r = exp(logp - old_logprobs)``, ``k3 = clamp(exp(d) - d - 1, +-kl_max)`` and ``d =
    clamp(ref_logprobs - logp, +-kl_log_ratio_max)`` (no gradient where either bound holds; verl
    bounds k3 at 10 too; ``kl_max=None``: no bound on k3's value).
    ``rollout_weights`` (optional, no gradient, the shape of ``labels``) multiply ``pg`` per
    token: the rollout correction's importance weights (``loss = w * pg + kl_beta * k3``).
    ``ratio="sequence"`` is GSPO's: ``r`` is the geometric mean of the sequence's token ratios,
    ``exp(mean_t(logp_t - old_t))`` over its unmasked tokens, on every one of its tokens, with the
    gradient through each token's own log-prob (published as GSPO-token with a stop-gradient);
    aggregated per sequence (``seq-mean-token-mean``) it is GSPO's objective. Sequences: packed
    rows split by ``cu_seqlens``, else the rows of a ``[B, S]`` batch (a 1-D batch is one);
    ``cp_group`` sums each sequence over the context-parallel ranks that hold its shares. The dual
    clip is a token-ratio option (``clip_ratio_c=None`` here, as GSPO has none).
    Row t of ``logits`` (``[T, V]`` or ``[B, T, V]``) predicts ``labels[t]``; the other per-token
    inputs have the shape of ``labels``. Differentiable with respect to ``logits`` (all three
    outputs). ``inplace_backward`` writes the gradient into the logits' own storage (saves a
    logits-sized buffer; the logits must not be used afterwards).
    """
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("advantages", advantages),
                    ("mask", mask)) + ((("rollout_weights", rollout_weights),) if rollout_weights is not None else ()):
        _check_rows(name, t, logits.shape[:-1])
    _check_logits(logits, labels, mask, tp_group, temperature)
    if ratio not in ("token", "sequence"):
        raise ValueError(f"ratio must be 'token' or 'sequence', got {ratio!r}")
    if ratio == "sequence" and clip_ratio_c is not None:
        raise ValueError("the dual clip (clip_ratio_c) belongs to the token ratio: pass clip_ratio_c=None with "
                         "ratio='sequence'")
    if clip_ratio_c is not None and not clip_ratio_c > 1 + clip_high:
        raise ValueError(f"clip_ratio_c must exceed 1 + clip_high = {1 + clip_high}, got {clip_ratio_c}")
    if not kl_log_ratio_max > 0:
        raise ValueError(f"kl_log_ratio_max must be positive, got {kl_log_ratio_max}")
    if kl_max is not None and not kl_max > 0:
        raise ValueError(f"kl_max must be positive (or None for no bound), got {kl_max}")
    shape = labels.shape
    sequence, num_sequences = (None, 0) if ratio == "token" else row_sequences(labels, cu_seqlens)
    logits, labels, old_logprobs, ref_logprobs, advantages, mask, rollout_weights = _rows(
        logits, labels, old_logprobs, ref_logprobs, advantages, mask, rollout_weights)
    clips = dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, kl_beta=kl_beta,
                 kl_log_ratio_max=kl_log_ratio_max, kl_max=kl_max)
    if _use_triton(backend, logits):
        from .fused_grpo_loss import GRPOLossFunction

        out = GRPOLossFunction.apply(logits, labels.contiguous(), old_logprobs, ref_logprobs, advantages,
                                     _kernel_mask(mask), temperature, clips, tp_group, inplace_backward, rollout_weights, sequence,
                                     num_sequences, cp_group)
    else:
        out = reference.grpo_loss(logits, labels, old_logprobs, ref_logprobs, advantages, mask,
                                  temperature=temperature, tp_group=tp_group, rollout_weights=rollout_weights,
                                  sequence=sequence, num_sequences=num_sequences, cp_group=cp_group, **clips)
    return tuple(t.reshape(shape) for t in out)


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, tp_group=None) -> torch.Tensor:
    """Entropy of the policy's next-token distribution per row, fp32, no gradient (a metric);
    ``logits`` ``[T, V]`` or ``[B, T, V]``, a vocab shard under ``tp_group``."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return reference.token_entropy(logits, temperature=temperature, tp_group=tp_group)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: Backend = "auto") -> torch.Tensor:
    """``weight * cast(x * rsqrt(mean(x^2) + eps))`` over the last dimension, Qwen's numerics
    (statistics in fp32, cast back to ``x``'s dtype before the weight); differentiable in ``x``
    and ``weight``. The Triton path is one launch forward and one backward."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (the last dimension of x), got {list(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if _use_triton(backend, x, weight):
        from .rmsnorm import RMSNormFunction

        return RMSNormFunction.apply(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rotary(t: torch.Tensor, freqs: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Rotary position embedding, megatron-core's (non-interleaved) convention: ``t * cos(f) +
    rotate_half(t) * sin(f)`` over the first ``rot_dim = freqs.shape[-1]`` channels, the rest
    passed, cos and sin cast to ``t``'s dtype. ``t``: ``[S, B, H, D]`` (or packed ``[T, H, D]``);
    ``freqs``: fp32 angles ``[S, 1, 1, rot_dim]`` or ``[S, B, 1, rot_dim]``. Differentiable in
    ``t``; the Triton path is one launch each way."""
    from .rope import positions_of

    if positions_of(t, freqs) is None:
        raise ValueError(f"freqs must be [S, 1, 1, r] or [S, B, 1, r] with an even r <= D for t of shape "
                         f"{list(t.shape)}, got {list(freqs.shape)}")
    if _use_triton(backend, t, freqs):
        from .rope import RotaryFunction

        return RotaryFunction.apply(t, freqs)
    return reference.rotary(t, freqs)
