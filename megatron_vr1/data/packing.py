"""Packing variable-length samples into micro-batches of at most ``max_tokens`` (THD layout).

``pack`` is best-fit decreasing: longest sample first, each into the fullest bin it still fits.
``balance`` spreads bins over data-parallel ranks so that every rank gets the same number of
micro-batches (as megatron-core's schedules require); ``pack_balanced`` also evens out the
tokens per rank by choosing a multiple of the rank count as the number of bins.
``batch.packed_batch`` turns a bin's samples into the micro-batch itself.
"""

from __future__ import annotations

import bisect
from typing import Sequence


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of sample indices, each bin's lengths summing to at most ``max_tokens``."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens} "
                         f"({len(too_long)} sample(s) too long)")
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_tokens, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


def fill_ratio(bins: list[list[int]], lengths: Sequence[int], max_tokens: int) -> float:
    """Tokens packed over the token budget of the bins used."""
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * max_tokens) if bins else 1.0


def balance(bins: list[list[int]], lengths: Sequence[int], world_size: int) -> list[list[list[int]]]:
    """Bins per data-parallel rank: equal counts (empty bins pad), token loads greedily levelled."""
    per_rank = -(-len(bins) // world_size)
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for b in sorted(bins, key=lambda b: -sum(lengths[i] for i in b)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[r].append(b)
        load[r] += sum(lengths[i] for i in b)
    for r in ranks:
        r.extend([] for _ in range(per_rank - len(r)))
    return ranks


def pack_balanced(lengths: Sequence[int], max_tokens: int, world_size: int) -> list[list[list[int]]]:
    """Bins per data-parallel rank with equal bin counts *and* nearly equal tokens.

    Starts from the fewest bins best-fit needs, rounded up to a multiple of ``world_size``, and
    fills them longest-first into the least-loaded bin that still has room (adding ``world_size``
    bins while something does not fit).
    """
    n_bins = -(-len(pack(lengths, max_tokens)) // world_size) * world_size
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    while True:
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        load = [0] * n_bins
        for i in order:
            fits = [b for b in range(n_bins) if load[b] + lengths[i] <= max_tokens]
            if not fits:
                break
            b = min(fits, key=lambda b: load[b])
            bins[b].append(i)
            load[b] += lengths[i]
        else:
            return balance(bins, lengths, world_size)
        n_bins += world_size
