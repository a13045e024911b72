"""Fused GRPO policy loss and token log-probs from (vocab-sharded) logits, in Triton.

Two passes over the vocabulary, one program per token row:
  forward   online max / sum-exp over vocab blocks (fp32) and the target logit, per row;
  backward  d logits = dL/dlogp * (onehot(y) - softmax(z/T)) / T, written straight into the
            gradient buffer (or into the logits' own storage when ``inplace_backward``).
Under tensor parallelism each rank holds a contiguous vocab shard; one all-gather of the
per-row (max, sum-exp, target) triples gives the global log-sum-exp, and the backward needs no
collective at all: every rank already has the global statistics it multiplies by.
The per-token algebra (ratio, clipping, k3) runs on [T]-sized tensors in torch.
Masked rows are never read: their outputs and gradients are 0, whatever their logits hold.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .packed import sequence_means

BLOCK_V = 8192
NUM_WARPS = 16  # tuned on an H200: see kernels/bench/RESULTS.md


@triton.jit
def _row_stats_kernel(logits_ptr, stride_row, labels_ptr, mask_ptr, max_ptr, sumexp_ptr, target_ptr,
                      V, vocab_start, inv_temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    keep = tl.load(mask_ptr + row)
    if keep == 0:
        tl.store(max_ptr + row, 0.0)
        tl.store(sumexp_ptr + row, 0.0)
        tl.store(target_ptr + row, 0.0)
    else:
        base = logits_ptr + row * stride_row
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            # columns past V load as -inf: they must add exp(-inf) = 0 to the sum, not exp(0)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(z, 0))
            # while every logit so far is -inf (banned ids, a masked shard), shift by 0, not by
            # -inf: exp(-inf - -inf) would make the sum NaN; s stays 0 and m stays -inf
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
            m = m_new
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        in_shard = (label >= 0) & (label < V)
        safe = tl.where(in_shard, label, 0)
        target = tl.load(base + safe).to(tl.float32) * inv_temperature
        tl.store(max_ptr + row, m)
        tl.store(sumexp_ptr + row, s)
        tl.store(target_ptr + row, tl.where(in_shard, target, 0.0))


@triton.jit
def _grad_logits_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, labels_ptr, lse_ptr, coef_ptr,
                        V, vocab_start, inv_temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)  # dL/dlogp / T, 0 for masked rows
    out = grad_ptr + row * stride_grad_row
    if coef == 0.0:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(out + cols, tl.zeros((BLOCK,), tl.float32).to(grad_ptr.dtype.element_ty), mask=cols < V)
    else:
        base = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temperature
            p = tl.exp(z - lse)
            g = coef * (tl.where(cols == label, 1.0, 0.0) - p)
            tl.store(out + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)


def row_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float,
              tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (log-sum-exp, target logit) of ``logits / T`` per row, fp32; rows off the mask get 0."""
    t, v = logits.shape
    vocab_start = dist.get_rank(tp_group) * v if tp_group is not None else 0
    m = torch.empty(t, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    target = torch.empty_like(m)
    if t:
        _row_stats_kernel[(t,)](logits, logits.stride(0), labels, mask, m, s, target, v, vocab_start,
                                1.0 / temperature, BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        stats = torch.stack([m, s, target])
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(gathered, stats, group=tp_group)  # the only collective
        ms, ss, ts = torch.stack(gathered).unbind(1)
        m = ms.amax(0)
        s = (ss * torch.exp(ms - m)).sum(0)
        target = ts.sum(0)
    keep = mask.bool()
    lse = torch.where(keep, m + torch.log(torch.where(keep, s, 1.0)), 0.0)
    return lse, target


def grad_logits(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, dlogp: torch.Tensor,
                temperature: float, tp_group=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    t, v = logits.shape
    vocab_start = dist.get_rank(tp_group) * v if tp_group is not None else 0
    grad = torch.empty_like(logits) if out is None else out
    coef = (dlogp / temperature).float().contiguous()
    if t:
        _grad_logits_kernel[(t,)](logits, logits.stride(0), grad, grad.stride(0), labels, lse, coef, v,
                                  vocab_start, 1.0 / temperature, BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return grad


class GRPOLossFunction(torch.autograd.Function):
    """Row statistics in Triton, the per-token algebra (``reference.py``'s conventions) on ``[T]``
    tensors in torch, and the logits gradient written by one Triton pass."""

    @staticmethod
    def forward(ctx, logits, labels, old_logprobs, ref_logprobs, advantages, mask, temperature, clips, tp_group,
                inplace_backward, rollout_weights=None, sequence=None, num_sequences=0, cp_group=None):
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not 0 * (a maybe-inf factor)
        clip_low, clip_high, clip_c = clips["clip_low"], clips["clip_high"], clips["clip_ratio_c"]
        kl_beta, bound, kl_max = clips["kl_beta"], clips["kl_log_ratio_max"], clips["kl_max"]
        keep = mask.bool()
        lse, target = row_stats(logits, labels, mask, temperature, tp_group)
        logp = torch.where(keep, target - lse, 0.0)
        adv = advantages.float()
        log_ratio = logp - old_logprobs.float()
        if sequence is not None:  # GSPO: the sequence's ratio; d ratio / d logp_t = ratio, as for the token's own
            log_ratio = sequence_means(log_ratio, keep, sequence, num_sequences, cp_group)
        ratio = torch.exp(log_ratio)
        # A = 0 carries no signal: its loss and gradient are 0 even where the ratio overflows
        unclipped = torch.where(adv == 0, 0.0, ratio * adv)
        clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
        pg = -torch.minimum(unclipped, clipped)
        dual = (adv < 0) & (ratio > clip_c) if clip_c is not None else torch.zeros_like(keep)
        if clip_c is not None:
            pg = torch.where(dual, -adv * clip_c, pg)  # a negative advantage's loss is capped at -A*c
        if rollout_weights is not None:  # the rollout correction's per-token importance weight
            pg = pg * rollout_weights.float()
        raw_delta = ref_logprobs.float() - logp
        delta = torch.clamp(raw_delta, -bound, bound)
        exp_delta = torch.exp(delta)
        k3 = exp_delta - delta - 1
        in_bounds = raw_delta.abs() <= bound  # k3 moves with logp only inside both bounds
        if kl_max is not None:
            in_bounds = in_bounds & (k3.abs() <= kl_max)
            k3 = torch.clamp(k3, -kl_max, kl_max)
        # kl_beta = 0 switches the KL term off: an overflowing k3 must not turn 0 * inf into NaN
        loss = torch.where(keep, pg + kl_beta * k3 if kl_beta else pg, 0.0)
        k3 = torch.where(keep, k3, 0.0)
        # d(pg)/d(logp): -A*r unless a clip (either side, or the dual clip) is the active branch
        clip_active = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low)) | dual
        dpg = torch.where(clip_active, 0.0, -unclipped)
        if rollout_weights is not None:
            dpg = dpg * rollout_weights.float()
        dk3 = torch.where(in_bounds, 1 - exp_delta, 0.0)  # d k3 / d logp; 0 where either clamp holds
        ctx.save_for_backward(logits, labels, lse, keep, dpg, dk3)
        ctx.temperature, ctx.kl_beta, ctx.tp_group, ctx.inplace = temperature, kl_beta, tp_group, inplace_backward
        return loss, logp, k3

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_k3):
        logits, labels, lse, keep, dpg, dk3 = ctx.saved_tensors
        dlogp = torch.zeros_like(lse)
        if g_loss is not None:
            dlogp = dlogp + g_loss.float() * (dpg + ctx.kl_beta * dk3 if ctx.kl_beta else dpg)
        if g_logp is not None:
            dlogp = dlogp + g_logp.float()
        if g_k3 is not None:
            dlogp = dlogp + g_k3.float() * dk3
        dlogp = torch.where(keep, dlogp, 0.0)
        grad = grad_logits(logits, labels, lse, dlogp, ctx.temperature, ctx.tp_group,
                           out=logits if ctx.inplace else None)
        if ctx.inplace:
            # a fresh view of the storage: returned as the input tensor itself, autograd would copy
            # it before storing a leaf's .grad (the tensor is still referenced), a full extra pass
            grad = grad.view_as(grad)
        return grad, None, None, None, None, None, None, None, None, None, None, None, None, None
