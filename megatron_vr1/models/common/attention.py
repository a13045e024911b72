"""Core attention on torch SDPA: causal, padded, packed (THD / cu_seqlens) and windowed.

It is the ``core_attention`` submodule of the local (non Transformer Engine) layer spec, with
megatron-core's ``DotProductAttention`` call signature. Megatron's own local attention rejects
packed sequences; this one runs each packed sequence (or vision window) as its own block, and
under context parallelism a rank's share of each sequence against all of it (``context_parallel``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .context_parallel import context_parallel_attention, starts_by_length

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


@dataclasses.dataclass
class HostPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` that also carry the boundaries as host ints: the local attention then
    groups blocks by length without reading ``cu_seqlens`` back from the device."""

    host_cu_seqlens: Optional[tuple] = None


def packed_seq_params(cu_seqlens: torch.Tensor, bounds, longest: int) -> HostPackedSeqParams:
    """THD parameters for blocks ``[bounds[i], bounds[i+1])`` (``cu_seqlens`` is ``bounds`` as an
    int32 tensor on the compute device)."""
    return HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                               max_seqlen_q=longest, max_seqlen_kv=longest, host_cu_seqlens=tuple(bounds))


class TorchSDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: object = None,
    ) -> None:
        super().__init__(config=config)
        # the ViT's config has no context parallelism, though it shares the model's process groups
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state

            self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") \
                else parallel_state.get_context_parallel_group()
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("TorchSDPAttention does not take an attention_bias")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            # THD: query [t, heads, dim], key/value [t, groups, dim]
            cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
            if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
                raise ValueError("TorchSDPAttention needs identical query and key cu_seqlens")
            if self.cp_group is not None:  # this rank's rows of each sequence against all of it
                bounds = getattr(packed_seq_params, "host_cu_seqlens", None) or tuple(cu_q.tolist())
                out = context_parallel_attention(query, key, value, bounds, self.cp_group, causal=causal,
                                                 scale=self.softmax_scale, dropout=dropout)
                return out.reshape(out.shape[0], -1)
            out = varlen_attention(query, key, value, cu_q, causal=causal, scale=self.softmax_scale, dropout=dropout,
                                   bounds=getattr(packed_seq_params, "host_cu_seqlens", None))
            return out.reshape(out.shape[0], -1)
        if self.cp_group is not None:
            raise ValueError("context parallelism splits packed (THD) batches only: give cu_seqlens")
        # SBHD: [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None:
            # megatron convention: True marks positions that may NOT be attended
            mask = ~attention_mask.bool()
            sq, sk = q.shape[2], k.shape[2]
            if causal:
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            # A padding query (left padding) may see no key at all; letting it see itself keeps
            # its output finite, so no NaN reaches real tokens through 0 * NaN.
            mask = mask | torch.eye(sq, sk, dtype=torch.bool, device=q.device)
            causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    dropout: float = 0.0,
    bounds: Optional[tuple] = None,
) -> torch.Tensor:
    """Attention within each ``[cu_seqlens[i], cu_seqlens[i+1])`` block of THD tensors.

    Blocks of equal length run as one batch (vision windows are mostly the same size).
    ``bounds``: ``cu_seqlens`` as host ints, if known (else it is read from the device).
    Returns ``[t, heads, dim]``.
    """
    total = query.shape[0]
    bounds = tuple(cu_seqlens.tolist()) if bounds is None else tuple(bounds)
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1:]} does not span the {total} packed tokens")
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    gqa = query.shape[1] != key.shape[1]
    for length, count, idx in _blocks_by_length(bounds, query.device):
        # [n, length, heads, dim] -> [n, heads, length, dim]
        q, k, v = (t.index_select(0, idx).view(count, length, t.shape[1], t.shape[2]).transpose(1, 2)
                   for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=gqa)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]))
    return out


@functools.lru_cache(maxsize=16)  # every layer of a micro-batch asks for the same blocks
def _blocks_by_length(bounds: tuple, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """``(length, count, row indices)`` per block length; the indices are built on the host and
    copied without blocking (pinned), so no layer waits for the device. Cached across calls, so
    never made as inference tensors (generation runs under ``inference_mode``; training reuses them)."""
    with torch.inference_mode(False):
        return _index_blocks(bounds, device)


def _index_blocks(bounds: tuple, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    out = []
    for length, starts in starts_by_length(bounds).items():
        idx = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
        if device.type == "cuda":
            idx = idx.pin_memory().to(device, non_blocking=True)
        out.append((length, len(starts), idx))
    return out
