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
    each packed sequence gets ``ignore_index`` instead of the next sequence's first token.

    ``input_ids`` is packed tokens ``[T]`` (or ``[1, T]``) with ``cu_seqlens``, or a padded
    batch ``[B, S]`` without them, whose rows are shifted each on its own. The labels have the
    shape of ``input_ids``.
    """
    if input_ids.dim() == 2 and cu_seqlens is None:
        labels = torch.full_like(input_ids, ignore_index)
        labels[:, :-1] = input_ids[:, 1:]
        return labels
    if input_ids.dim() > 2 or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
        raise ValueError(f"packed input_ids with cu_seqlens must be [T] or [1, T], got {list(input_ids.shape)}")
    ids = input_ids.reshape(-1)
    labels = torch.full_like(ids, ignore_index)
    labels[:-1] = ids[1:]
    ends = (cu_seqlens[1:] - 1).long() if cu_seqlens is not None else torch.tensor([ids.numel() - 1])
    ends = ends[ends >= 0]
    labels[ends.to(ids.device)] = ignore_index
    return labels.reshape(input_ids.shape)


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
    # every sequence given counts, empty or fully masked ones too (Dr.GRPO's constant normaliser)
    n_seq = len(cu_seqlens) - 1 if cu_seqlens is not None else 1
    sums = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, per_token.float() * m)
    counts = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, m)
    if mode == "seq-mean-token-mean":
        has = counts > 0
        return (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)
    if max_response_length is None:
        raise ValueError("mode 'dr-grpo' needs max_response_length (the generation budget)")
    return sums.sum() / max(n_seq * max_response_length, 1)
