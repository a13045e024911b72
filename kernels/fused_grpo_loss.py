"""Fused GRPO policy loss and token log-probs from (vocab-sharded) logits, in Triton.

Two passes over the vocabulary, one program per token row:
  forward   online max / sum-exp over vocab blocks (fp32) and the target logit, per row; its
            epilogue turns them into the token's log-prob and, when the row holds everything
            it needs, the whole per-token algebra (ratio, clip, dual clip, k3 with its bounds,
            the rollout-correction weight) and its derivatives, in the same launch;
  backward  its prologue sums the outputs' gradients into dL/dlogp, then
            d logits = dL/dlogp * (onehot(y) - softmax(z/T)) / T, written straight into the
            gradient buffer (or into the logits' own storage when ``inplace_backward``).
Under tensor parallelism each rank holds a contiguous vocab shard: the rows write their partial
(max, sum-exp, target) triples, one all-gather exchanges them, and one element-wise kernel over
the tokens combines them and runs the per-token algebra (the backward needs no collective: every
rank already has the global statistics it multiplies by). GSPO's sequence ratio needs the mean
over each sequence's log-ratios first, so it runs the algebra in that kernel too, after the
(torch) per-sequence sums. Either way a GRPO step's loss is one, two or three launches, not the
thirty-odd small torch ops on ``[T]`` tensors it would otherwise take.
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


BLOCK_T = 512  # tokens per program of the element-wise kernel: 4 per thread, in 128-bit accesses
STATS, LOGP, TERMS = 0, 1, 2  # what a row_stats launch writes: partial triples, log-probs, or everything


@triton.jit
def _clamp(x, lo, hi):
    # NaN passes through, as in torch.clamp: every comparison with it is false
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _policy_terms(logp, log_ratio, ref, adv, w, clip_low, clip_high, clip_c, kl_beta, bound, kl_max,
                  DUAL: tl.constexpr, WEIGHTS: tl.constexpr, KL: tl.constexpr, KL_MAX: tl.constexpr):
    """(loss, k3, d loss / d logp, d k3 / d logp) of a token or a block of tokens, in
    ``reference.grpo_loss``'s conventions (functional.grpo_loss's docstring has the formulas)."""
    ratio = tl.exp(log_ratio)
    # A = 0 carries no signal: its loss and gradient are 0 even where the ratio overflows
    unclipped = tl.where(adv == 0, 0.0, ratio * adv)
    clipped = _clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    pg = -tl.where(clipped < unclipped, clipped, unclipped)  # NaN in either stays NaN
    # d(pg)/d(logp): -A*r unless a clip (either side, or the dual clip) is the active branch
    active = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
    if DUAL:
        dual = (adv < 0) & (ratio > clip_c)
        pg = tl.where(dual, -adv * clip_c, pg)  # a negative advantage's loss is capped at -A*c
        active = active | dual
    dpg = tl.where(active, 0.0, -unclipped)
    if WEIGHTS:  # the rollout correction's importance weight scales the policy term
        pg = pg * w
        dpg = dpg * w
    raw = ref - logp
    delta = _clamp(raw, -bound, bound)
    e = tl.exp(delta)
    k3 = e - delta - 1
    inside = tl.abs(raw) <= bound  # k3 moves with logp only inside both bounds
    if KL_MAX:
        inside = inside & (tl.abs(k3) <= kl_max)
        k3 = _clamp(k3, -kl_max, kl_max)
    dk3 = tl.where(inside, 1 - e, 0.0)
    if KL:
        loss = pg + kl_beta * k3
        dloss = dpg + kl_beta * dk3
    else:  # no KL term: an overflowing k3 must not turn 0 * inf into NaN
        loss = pg
        dloss = dpg
    return loss, k3, dloss, dk3


@triton.jit
def _row_stats_kernel(logits_ptr, stride_row, labels_ptr, mask_ptr, stats_ptr, T, V, vocab_start, inv_temperature,
                      lse_ptr, logp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, loss_ptr, k3_ptr, dloss_ptr, dk3_ptr,
                      clip_low, clip_high, clip_c, kl_beta, bound, kl_max, OUT: tl.constexpr, DUAL: tl.constexpr,
                      WEIGHTS: tl.constexpr, KL: tl.constexpr, KL_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    keep = tl.load(mask_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    target = tl.zeros((), tl.float32)
    if keep != 0:
        base = logits_ptr + row * stride_row
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
        target = tl.where(in_shard, tl.load(base + safe).to(tl.float32) * inv_temperature, 0.0)
    if OUT == 0:  # STATS: this shard's partial triple, for the all-gather; masked rows write 0s
        tl.store(stats_ptr + row, tl.where(keep != 0, m, 0.0))
        tl.store(stats_ptr + T + row, s)
        tl.store(stats_ptr + 2 * T + row, target)
    else:
        lse = tl.where(keep != 0, m + tl.log(tl.where(keep != 0, s, 1.0)), 0.0)
        logp = tl.where(keep != 0, target - lse, 0.0)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, logp)
        if OUT == 2:  # TERMS: the per-token algebra in the epilogue
            old = tl.load(old_ptr + row).to(tl.float32)
            w = tl.load(w_ptr + row).to(tl.float32) if WEIGHTS else 1.0
            loss, k3, dloss, dk3 = _policy_terms(
                logp, logp - old, tl.load(ref_ptr + row).to(tl.float32), tl.load(adv_ptr + row).to(tl.float32),
                w, clip_low, clip_high, clip_c, kl_beta, bound, kl_max, DUAL, WEIGHTS, KL, KL_MAX)
            tl.store(loss_ptr + row, tl.where(keep != 0, loss, 0.0))
            tl.store(k3_ptr + row, tl.where(keep != 0, k3, 0.0))
            tl.store(dloss_ptr + row, tl.where(keep != 0, dloss, 0.0))
            tl.store(dk3_ptr + row, tl.where(keep != 0, dk3, 0.0))


@triton.jit
def _token_terms_kernel(stats_ptr, n_shards, T, mask_ptr, lse_ptr, logp_ptr, log_ratio_ptr, old_ptr, ref_ptr, adv_ptr,
                        w_ptr, loss_ptr, k3_ptr, dloss_ptr, dk3_ptr, clip_low, clip_high, clip_c, kl_beta, bound,
                        kl_max, FROM_STATS: tl.constexpr, TERMS: tl.constexpr, SEQUENCE: tl.constexpr,
                        DUAL: tl.constexpr, WEIGHTS: tl.constexpr, KL: tl.constexpr, KL_MAX: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < T
    keep = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    if FROM_STATS:  # combine the shards' (max, sum-exp, target) triples into the global log-prob
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        target = tl.zeros((BLOCK,), tl.float32)
        for r in range(n_shards):
            part = stats_ptr + r * 3 * T + offs
            m_r = tl.load(part, mask=inside, other=0.0)
            m_new = tl.maximum(m, m_r)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.load(part + T, mask=inside, other=0.0) * tl.exp(m_r - shift)
            target += tl.load(part + 2 * T, mask=inside, other=0.0)
            m = m_new
        lse = tl.where(keep, m + tl.log(tl.where(keep, s, 1.0)), 0.0)
        logp = tl.where(keep, target - lse, 0.0)
        tl.store(lse_ptr + offs, lse, mask=inside)
        tl.store(logp_ptr + offs, logp, mask=inside)
    else:
        logp = tl.load(logp_ptr + offs, mask=inside, other=0.0)
    if TERMS:
        if SEQUENCE:  # GSPO: the sequence's mean log-ratio, on each of its tokens
            log_ratio = tl.load(log_ratio_ptr + offs, mask=inside, other=0.0)
        else:
            log_ratio = logp - tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32) if WEIGHTS else 1.0
        loss, k3, dloss, dk3 = _policy_terms(
            logp, log_ratio, tl.load(ref_ptr + offs, mask=inside, other=0.0).to(tl.float32),
            tl.load(adv_ptr + offs, mask=inside, other=0.0).to(tl.float32), w, clip_low, clip_high, clip_c, kl_beta,
            bound, kl_max, DUAL, WEIGHTS, KL, KL_MAX)
        tl.store(loss_ptr + offs, tl.where(keep, loss, 0.0), mask=inside)
        tl.store(k3_ptr + offs, tl.where(keep, k3, 0.0), mask=inside)
        tl.store(dloss_ptr + offs, tl.where(keep, dloss, 0.0), mask=inside)
        tl.store(dk3_ptr + offs, tl.where(keep, dk3, 0.0), mask=inside)


@triton.jit
def _grad_logits_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, labels_ptr, lse_ptr, mask_ptr,
                        g_loss_ptr, g_loss_stride, dloss_ptr, g_logp_ptr, g_logp_stride, g_k3_ptr, g_k3_stride,
                        dk3_ptr, V, vocab_start, inv_temperature, G_LOSS: tl.constexpr, G_LOGP: tl.constexpr,
                        G_K3: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # prologue: dL/dlogp from the gradients of the three outputs (absent ones are None: 0)
    dlogp = tl.zeros((), tl.float32)
    if G_LOSS:
        dlogp += tl.load(g_loss_ptr + row * g_loss_stride).to(tl.float32) * tl.load(dloss_ptr + row)
    if G_LOGP:
        dlogp += tl.load(g_logp_ptr + row * g_logp_stride).to(tl.float32)
    if G_K3:
        dlogp += tl.load(g_k3_ptr + row * g_k3_stride).to(tl.float32) * tl.load(dk3_ptr + row)
    coef = tl.where(tl.load(mask_ptr + row) != 0, dlogp * inv_temperature, 0.0)  # masked rows: 0, even for NaN
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


ROW_OUTPUTS = ("stats", "lse", "logp", "old", "ref", "adv", "w", "loss", "k3", "dloss", "dk3")
NO_TERMS = dict(clip_low=0.0, clip_high=0.0, clip_c=0.0, kl_beta=0.0, bound=0.0, kl_max=0.0, DUAL=False,
                WEIGHTS=False, KL=False, KL_MAX=False)


def _terms_flags(clips: dict, rollout_weights: Optional[torch.Tensor]) -> dict:
    """The kernels' scalar arguments and switches for the per-token algebra."""
    c, kl_max = clips["clip_ratio_c"], clips["kl_max"]
    return dict(clip_low=clips["clip_low"], clip_high=clips["clip_high"], clip_c=0.0 if c is None else c,
                kl_beta=clips["kl_beta"], bound=clips["kl_log_ratio_max"], kl_max=0.0 if kl_max is None else kl_max,
                DUAL=c is not None, WEIGHTS=rollout_weights is not None, KL=bool(clips["kl_beta"]),
                KL_MAX=kl_max is not None)


def _pointers(given: dict, dummy: torch.Tensor) -> dict:
    # a switched-off output or input is never touched: any tensor stands in for its pointer
    return {f"{name}_ptr": given.get(name, dummy) for name in ROW_OUTPUTS}


def _launch_rows(logits, labels, mask, temperature, tp_group, out: int, flags: dict = NO_TERMS, **tensors) -> None:
    """``_row_stats_kernel`` over every row; ``out``: STATS (into ``stats`` [3, T]), LOGP or TERMS."""
    t, v = logits.shape
    rank, _ = _shards(tp_group)
    if t:
        _row_stats_kernel[(t,)](logits, logits.stride(0), labels, mask, T=t, V=v, vocab_start=rank * v,
                                inv_temperature=1.0 / temperature, OUT=out, BLOCK=BLOCK_V, num_warps=NUM_WARPS,
                                **_pointers(tensors, mask), **flags)


def _launch_tokens(mask, n_shards: int, *, from_stats: bool, terms: bool, log_ratio=None, flags: dict = NO_TERMS,
                   **tensors) -> None:
    """``_token_terms_kernel`` over the tokens, ``BLOCK_T`` per program."""
    t = mask.numel()
    if t:
        _token_terms_kernel[(triton.cdiv(t, BLOCK_T),)](
            n_shards=n_shards, T=t, mask_ptr=mask, log_ratio_ptr=mask if log_ratio is None else log_ratio,
            FROM_STATS=from_stats, TERMS=terms, SEQUENCE=log_ratio is not None, BLOCK=BLOCK_T, num_warps=4,
            **_pointers(tensors, mask), **flags)


def _shards(tp_group) -> tuple[int, int]:
    """(this rank's vocab shard, how many shards)."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _gathered_stats(logits, labels, mask, temperature, tp_group) -> torch.Tensor:
    """Every shard's partial (max, sum-exp, target) triples, ``[shards, 3, T]``: one launch and
    the only collective."""
    rank, shards = _shards(tp_group)
    local = torch.empty(3, logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch_rows(logits, labels, mask, temperature, tp_group, STATS, stats=local)
    gathered = torch.empty(shards, *local.shape, dtype=local.dtype, device=local.device)
    dist.all_gather(list(gathered.unbind(0)), local, group=tp_group)
    return gathered


def _fill_log_probs(logits, labels, mask, temperature, tp_group, lse, logp) -> None:
    _, shards = _shards(tp_group)
    if shards == 1:
        _launch_rows(logits, labels, mask, temperature, tp_group, LOGP, lse=lse, logp=logp)
    else:
        stats = _gathered_stats(logits, labels, mask, temperature, tp_group)
        _launch_tokens(mask, shards, from_stats=True, terms=False, stats=stats, lse=lse, logp=logp)


def log_probs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float,
              tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (log-sum-exp, log-prob of the label) of ``logits / T`` per row, fp32; rows off the
    (int8) mask get 0. One launch, or under TP two and an all-gather."""
    lse, logp = torch.empty(2, logits.shape[0], dtype=torch.float32, device=logits.device)
    _fill_log_probs(logits, labels, mask, temperature, tp_group, lse, logp)
    return lse, logp


def policy_forward(logits, labels, mask, old_logprobs, ref_logprobs, advantages, temperature: float, clips: dict,
                   tp_group=None, rollout_weights=None, sequence=None, num_sequences: int = 0, cp_group=None):
    """(loss, logp, k3, lse, d loss / d logp, d k3 / d logp) per row, fp32, 0 off the mask.

    Token ratio on one vocab shard: one launch. Under TP: the shards' row statistics, their
    all-gather, and one element-wise launch. GSPO's sequence ratio: the log-probs, the
    per-sequence mean log-ratio (torch, summed over ``cp_group``), then the element-wise launch."""
    t = logits.shape[0]
    lse, logp, loss, k3, dloss, dk3 = torch.empty(6, t, dtype=torch.float32, device=logits.device)
    inputs = dict(old=old_logprobs.contiguous(), ref=ref_logprobs.contiguous(), adv=advantages.contiguous())
    if rollout_weights is not None:
        inputs["w"] = rollout_weights.contiguous()
    outputs = dict(lse=lse, logp=logp, loss=loss, k3=k3, dloss=dloss, dk3=dk3)
    flags = _terms_flags(clips, rollout_weights)
    _, shards = _shards(tp_group)
    if sequence is None and shards == 1:
        _launch_rows(logits, labels, mask, temperature, tp_group, TERMS, flags, **inputs, **outputs)
    elif sequence is None:
        stats = _gathered_stats(logits, labels, mask, temperature, tp_group)
        _launch_tokens(mask, shards, from_stats=True, terms=True, flags=flags, stats=stats, **inputs, **outputs)
    else:
        _fill_log_probs(logits, labels, mask, temperature, tp_group, lse, logp)
        log_ratio = sequence_means(logp - inputs["old"].float(), mask, sequence, num_sequences, cp_group)
        _launch_tokens(mask, shards, from_stats=False, terms=True, log_ratio=log_ratio, flags=flags, **inputs,
                       **outputs)
    return loss, logp, k3, lse, dloss, dk3


def grad_logits(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor,
                grads: tuple, slopes: tuple, temperature: float, tp_group=None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d L / d logits, given the gradients of (loss, logp, k3) (each ``[T]`` or None) and the
    forward's slopes (d loss / d logp, d k3 / d logp); one launch."""
    t, v = logits.shape
    rank, _ = _shards(tp_group)
    grad = torch.empty_like(logits) if out is None else out
    g_loss, g_logp, g_k3 = grads
    dloss, dk3 = slopes
    stand_in = (lse, 0)
    if t:
        (gl, gl_s), (gp, gp_s), (gk, gk_s) = ((g, g.stride(0)) if g is not None else stand_in for g in grads)
        _grad_logits_kernel[(t,)](logits, logits.stride(0), grad, grad.stride(0), labels, lse, mask, gl, gl_s, dloss,
                                  gp, gp_s, gk, gk_s, dk3, v, rank * v, 1.0 / temperature, G_LOSS=g_loss is not None,
                                  G_LOGP=g_logp is not None, G_K3=g_k3 is not None, BLOCK=BLOCK_V,
                                  num_warps=NUM_WARPS)
    return grad


class GRPOLossFunction(torch.autograd.Function):
    """The forward's row statistics and per-token algebra, and the logits gradient, in Triton
    (``policy_forward`` and ``grad_logits``); ``reference.py``'s conventions."""

    @staticmethod
    def forward(ctx, logits, labels, old_logprobs, ref_logprobs, advantages, mask, temperature, clips, tp_group,
                inplace_backward, rollout_weights=None, sequence=None, num_sequences=0, cp_group=None):
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not 0 * (a maybe-inf factor)
        loss, logp, k3, lse, dloss, dk3 = policy_forward(logits, labels, mask, old_logprobs, ref_logprobs, advantages,
                                                         temperature, clips, tp_group, rollout_weights, sequence,
                                                         num_sequences, cp_group)
        ctx.save_for_backward(logits, labels, mask, lse, dloss, dk3)
        ctx.temperature, ctx.tp_group, ctx.inplace = temperature, tp_group, inplace_backward
        return loss, logp, k3

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_k3):
        logits, labels, mask, lse, dloss, dk3 = ctx.saved_tensors
        grad = grad_logits(logits, labels, mask, lse, (g_loss, g_logp, g_k3), (dloss, dk3), ctx.temperature,
                           ctx.tp_group, out=logits if ctx.inplace else None)
        if ctx.inplace:
            # a fresh view of the storage: returned as the input tensor itself, autograd would copy
            # it before storing a leaf's .grad (the tensor is still referenced), a full extra pass
            grad = grad.view_as(grad)
        return grad, None, None, None, None, None, None, None, None, None, None, None, None, None
