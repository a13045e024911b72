"""Packed (THD) batches: labels that never cross a sequence boundary, and loss aggregation."""

from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "dr-grpo")


def _sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or (lengths < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} packed tokens, got {cu_seqlens.tolist()[:8]}...")
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def shift_labels(input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *,
                 ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned to rows: row t predicts token t+1 of *its own* sequence; the last row of
    each packed sequence gets ``ignore_index`` instead of the next sequence's first token."""
    ids = input_ids.reshape(-1)
    labels = torch.full_like(ids, ignore_index)
    labels[:-1] = ids[1:]
    ends = (cu_seqlens[1:] - 1).long() if cu_seqlens is not None else torch.tensor([ids.numel() - 1])
    ends = ends[ends >= 0]
    labels[ends.to(ids.device)] = ignore_index
    return labels


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, *, mode: str = "token-mean",
                   cu_seqlens: Optional[torch.Tensor] = None, max_response_length: Optional[int] = None) -> torch.Tensor:
    """Reduce per-token losses of packed sequences to a scalar.

    ``token-mean``: over all unmasked tokens. ``seq-mean-token-mean``: per sequence, then over
    sequences that have any unmasked token. ``dr-grpo``: sum over tokens / (sequences x
    ``max_response_length``), Dr.GRPO's length-unbiased constant normaliser.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    m = mask.float()
    if mode == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    seq = _sequence_ids(cu_seqlens, per_token.numel()) if cu_seqlens is not None else \
        torch.zeros(per_token.numel(), dtype=torch.long, device=per_token.device)
    n_seq = int(seq.max()) + 1 if seq.numel() else 0
    sums = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, per_token.float() * m)
    counts = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, m)
    if mode == "seq-mean-token-mean":
        has = counts > 0
        return (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)
    if max_response_length is None:
        raise ValueError("mode 'dr-grpo' needs max_response_length (the generation budget)")
    return sums.sum() / (n_seq * max_response_length)
