"""Context parallelism for packed (THD) batches: which rows each rank holds, and attention over them.

Every packed sequence (a multiple of ``2 * size`` rows long) is cut into ``2 * size`` equal
chunks; rank ``r`` holds chunks ``r`` and ``2 * size - 1 - r``, so that under causal attention
each rank does the same work (Transformer Engine's THD layout, ``thd_get_partitioned_indices``).
A rank's rows are its two chunks of the first sequence, then of the second, and so on.

The attention here is the local layer spec's: each rank all-gathers the keys and values of the
whole micro-batch (the backward reduce-scatters their gradients) and attends from its own queries
with a causal mask on the sequence's original positions. It moves ``size - 1`` times a rank's
keys and values per layer, which at the sequence lengths of reasoning traces costs less than the
attention itself; Transformer Engine's ring attention overlaps the same exchange with compute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def check_bounds(bounds: Sequence[int], size: int) -> None:
    chunks = 2 * size
    for a, b in zip(bounds[:-1], bounds[1:]):
        if (b - a) % chunks:
            raise ValueError(f"context parallelism over {size} ranks needs every packed sequence to be a multiple of "
                             f"{chunks} rows (packed_batch(sequence_multiple=...)); the one at row {a} has {b - a}")


def shard_rows(bounds: Sequence[int], size: int, rank: int) -> list[int]:
    """The rows of a packed micro-batch (sequence boundaries ``bounds``) that ``rank`` of ``size``
    context-parallel ranks holds, in its order."""
    check_bounds(bounds, size)
    rows: list[int] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = (b - a) // (2 * size)
        for chunk in (rank, 2 * size - 1 - rank):
            rows.extend(range(a + chunk * c, a + (chunk + 1) * c))
    return rows


def starts_by_length(bounds: Sequence[int]) -> dict[int, list[int]]:
    """First rows of the non-empty sequences of ``bounds``, grouped by length (one attention call each)."""
    out: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out.setdefault(b - a, []).append(a)
    return out


@dataclass(frozen=True)
class _Group:
    """Sequences of one length: this rank's query rows, their keys' rows in the gathered tensor,
    and the causal mask of its two chunks against the whole sequence (True = may attend)."""

    count: int
    queries: torch.Tensor  # [count * 2c] local rows
    keys: torch.Tensor  # [count * length] rows of the gathered keys, in sequence order
    mask: torch.Tensor  # [2c, length]


@functools.lru_cache(maxsize=16)  # every layer of a micro-batch asks for the same plan
def _plan(bounds: tuple, size: int, rank: int, causal: bool, device: torch.device) -> list[_Group]:
    with torch.inference_mode(False):  # cached across calls: never inference tensors
        check_bounds(bounds, size)
        local_rows = bounds[-1] // size
        # where each global row sits in the all-gathered tensor: rank-major, each rank's rows in its order
        where = torch.empty(bounds[-1], dtype=torch.long)
        for r in range(size):
            where[torch.tensor(shard_rows(bounds, size, r), dtype=torch.long)] = torch.arange(
                r * local_rows, (r + 1) * local_rows)
        groups = []
        for length, starts in starts_by_length(bounds).items():
            c = length // (2 * size)
            offsets = torch.cat([torch.arange(rank * c, (rank + 1) * c),
                                 torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c)])
            queries = torch.cat([torch.arange(a // size, a // size + 2 * c) for a in starts])
            keys = torch.cat([where[a:a + length] for a in starts])
            mask = offsets[:, None] >= torch.arange(length)[None, :] if causal else \
                torch.ones(2 * c, length, dtype=torch.bool)
            groups.append(_Group(len(starts), *(t.to(device, non_blocking=True) for t in (queries, keys, mask))))
        return groups


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: tuple,
                               group, *, causal: bool, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of this rank's THD rows (``query [t, heads, dim]``, ``key/value [t, groups, dim]``)
    over whole sequences, ``bounds`` being the micro-batch's global sequence boundaries (host
    ints). Returns ``[t, heads, dim]``."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    size = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    if query.shape[0] * size != bounds[-1]:
        raise ValueError(f"this rank holds {query.shape[0]} rows; {size} context-parallel ranks of a micro-batch of "
                         f"{bounds[-1]} rows hold {bounds[-1] // size} each")
    keys = gather_from_sequence_parallel_region(key, True, group=group)
    values = gather_from_sequence_parallel_region(value, True, group=group)
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    gqa = query.shape[1] != key.shape[1]
    for g in _plan(tuple(bounds), size, rank, causal, query.device):
        q = query.index_select(0, g.queries).view(g.count, -1, *query.shape[1:]).transpose(1, 2)
        k, v = (t.index_select(0, g.keys).view(g.count, -1, *t.shape[1:]).transpose(1, 2) for t in (keys, values))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)
        out.index_copy_(0, g.queries, o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]))
    return out
