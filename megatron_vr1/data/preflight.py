"""The pre-flight data check: every record a run will read, checked before step 1 (its fields, its
chat template, its length, its images' headers and file structure; no pixels decoded), so that a
bad record stops the run at its start with one line naming it, or is counted and skipped under
``data.skip_bad_samples=true``, instead of ending a run hours in.

Under torchrun every rank checks its share of the records (in ``data.num_workers`` processes) and
the ranks share what they found.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Optional

import torch.distributed as dist

from ..errors import UsageError
from ..text import counted

_DATASET = None  # the dataset a forked checker reads (set before the pool forks)
POOL_MIN = 256  # fewer records than this are checked in this process: starting workers would cost more


def _check(index: int) -> tuple[int, Optional[str]]:
    return index, _DATASET.check(index)


def find_bad_records(dataset, *, workers: int = 0, progress: bool = False) -> list[tuple[int, str]]:
    """``(index, what is wrong)`` of every bad record of this rank's share (all of them outside
    torchrun), gathered over the ranks, in index order."""
    global _DATASET
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = range(rank, len(dataset), world)
    from tqdm import tqdm

    bar = tqdm(total=len(share), desc="data check", unit="record", disable=not progress or rank != 0)
    found: list[tuple[int, str]] = []
    if workers > 0 and len(share) >= POOL_MIN:
        _DATASET = dataset
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for index, problem in pool.imap_unordered(_check, share, chunksize=64):
                    if problem:
                        found.append((index, problem))
                    bar.update(1)
        finally:
            _DATASET = None
    else:
        for index in share:
            problem = dataset.check(index)
            if problem:
                found.append((index, problem))
            bar.update(1)
    bar.close()
    if world > 1:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, found)
        found = [item for part in everyone for item in part]
    return sorted(found)


def preflight(dataset, *, skip_bad: bool, workers: int = 0, progress: bool = False, say=print) -> int:
    """Check every record; a bad one is a :class:`UsageError` naming the first few, unless
    ``skip_bad`` (then they are counted, said, and left to the loader to skip). Returns how many
    records are bad."""
    bad = find_bad_records(dataset, workers=workers, progress=progress)
    if not bad:
        return 0
    first = "; ".join(problem for _, problem in bad[:3])
    more = f" (and {counted(len(bad) - 3, 'more record')})" if len(bad) > 3 else ""
    if not skip_bad:
        raise UsageError(f"{counted(len(bad), 'bad record')} of {len(dataset)}: {first}{more}; fix them, or set "
                         f"data.skip_bad_samples=true to skip and count them")
    say(f"data check: {counted(len(bad), 'record')} of {len(dataset)} will be skipped and counted "
        f"(data.skip_bad_samples=true): {first}{more}")
    return len(bad)
