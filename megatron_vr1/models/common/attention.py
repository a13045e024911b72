"""Core attention on torch SDPA: causal, padded, packed (THD / cu_seqlens) and windowed.

It is the ``core_attention`` submodule of the local (non Transformer Engine) layer spec, with
megatron-core's ``DotProductAttention`` call signature. Megatron's own local attention rejects
packed sequences; this one runs each packed sequence (or vision window) as its own block.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


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
        if config.context_parallel_size > 1:
            raise ValueError("TorchSDPAttention does not support context parallelism; use the TE spec")
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
            if cu_kv is not None and not torch.equal(cu_q, cu_kv):
                raise ValueError("TorchSDPAttention needs identical query and key cu_seqlens")
            out = varlen_attention(query, key, value, cu_q, causal=causal, scale=self.softmax_scale, dropout=dropout)
            return out.reshape(out.shape[0], -1)
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
) -> torch.Tensor:
    """Attention within each ``[cu_seqlens[i], cu_seqlens[i+1])`` block of THD tensors.

    Blocks of equal length run as one batch (vision windows are mostly the same size).
    Returns ``[t, heads, dim]``.
    """
    total = query.shape[0]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens {bounds[:3]}...{bounds[-1:]} does not span the {total} packed tokens")
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    gqa = query.shape[1] != key.shape[1]
    for length, starts in by_length.items():
        idx = (torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)).reshape(-1)
        # [n, length, heads, dim] -> [n, heads, length, dim]
        q, k, v = (t.index_select(0, idx).view(len(starts), length, t.shape[1], t.shape[2]).transpose(1, 2)
                   for t in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=gqa)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]))
    return out
