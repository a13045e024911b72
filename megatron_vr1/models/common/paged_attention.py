"""Attention over megatron-core's paged KV cache in plain torch: flash-attn's two paged entry
points with the arguments megatron-core's dynamic inference path passes them.

megatron-core's ``DynamicInferenceContext`` keeps keys and values in blocks of
``block_size`` tokens (``[blocks, block_size, kv_heads, head_dim]`` per layer) and hands attention
a block table per request. On GPUs flash-attn reads them; where flash-attn is absent (the CPU)
:mod:`megatron_vr1.platform` installs these, which gather each request's blocks and run causal
attention. They are the reference the paged path is tested with, not a fast path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _request_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                       kv_len: int, scale: float) -> torch.Tensor:
    """``q [lq, hq, d]``: the request's last ``lq`` positions of ``kv_len``; causal attention over
    its cached keys (``blocks``: its block ids, in order)."""
    block_size = k_cache.shape[1]
    used = blocks[:(kv_len + block_size - 1) // block_size].long()
    k = k_cache[used].flatten(0, 1)[:kv_len]  # [kv_len, hk, d]
    v = v_cache[used].flatten(0, 1)[:kv_len]
    lq, hq = q.shape[0], q.shape[1]
    if hq != k.shape[1]:  # grouped-query attention: each KV head serves hq / hk query heads
        k = k.repeat_interleave(hq // k.shape[1], dim=1)
        v = v.repeat_interleave(hq // v.shape[1], dim=1)
    # query j sits at position kv_len - lq + j and sees keys up to it
    rows = torch.arange(kv_len - lq, kv_len, device=q.device)[:, None]
    mask = torch.arange(kv_len, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def varlen_paged_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale: Optional[float] = None, causal: bool = True,
                           block_table: torch.Tensor, **_) -> torch.Tensor:
    """``flash_attn_varlen_func`` over a paged cache: ``q [total_q, hq, d]`` packed by
    ``cu_seqlens_q``; request ``i`` holds ``cu_seqlens_k[i+1] - cu_seqlens_k[i]`` cached tokens."""
    if not causal:
        raise ValueError("the paged attention reference is causal only")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if lq and lk:
            out[cu_q[i]:cu_q[i + 1]] = _request_attention(q[cu_q[i]:cu_q[i + 1]], k, v, block_table[i], lk, scale)
    return out


def kvcache_paged_attention(q, k_cache, v_cache, cache_seqlens, *, causal: bool = True,
                            block_table: torch.Tensor, softmax_scale: Optional[float] = None,
                            **_) -> torch.Tensor:
    """``flash_attn_with_kvcache`` for decode: ``q [b, 1, hq, d]``, one new token per request,
    already appended to the cache (``cache_seqlens[i]`` tokens cached)."""
    if not causal:
        raise ValueError("the paged attention reference is causal only")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    # one padded batch: every request's blocks gathered up to the longest, the rest masked out
    lengths = cache_seqlens.long()
    longest = max(int(lengths.max()), 1)
    block_size = k_cache.shape[1]
    blocks = block_table[:, :(longest + block_size - 1) // block_size].long()
    k = k_cache[blocks].flatten(1, 2)[:, :longest]  # [b, longest, hk, d]
    v = v_cache[blocks].flatten(1, 2)[:, :longest]
    hq = q.shape[2]
    if hq != k.shape[2]:
        k = k.repeat_interleave(hq // k.shape[2], dim=2)
        v = v.repeat_interleave(hq // v.shape[2], dim=2)
    seen = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
    seen[:, 0] |= lengths == 0  # an empty (padding) row attends to something; its output is zeroed
    # past a request's length the blocks hold whatever was there (uninitialised memory can be NaN,
    # and a masked NaN still poisons the product): zero them
    k = k.masked_fill(~seen[:, :, None, None], 0)
    v = v.masked_fill(~seen[:, :, None, None], 0)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), attn_mask=seen[:, None, None, :], scale=scale)
    out = out.transpose(1, 2).to(q.dtype)
    return torch.where((lengths > 0)[:, None, None, None], out, torch.zeros_like(out))
