"""Seeded, data-parallel, resumable reading of a map-style dataset, decoded in DataLoader workers.

Each epoch has one order of all ``n`` records (a seeded permutation, or file order). Its
positions are dealt round-robin to the data-parallel ranks: rank ``r`` of ``dp`` reads positions
``r, r + dp, r + 2 dp, ...``, so the ranks' shards are disjoint and together cover the epoch, and
no rank touches (or decodes) another rank's records. Ranks advance in lockstep, one *round*
(``dp`` positions) per item; in an epoch's last round a rank past the end gets a hole (``None``).

The position is ``(epoch, offset)``: how many of the epoch's positions all ranks together have
consumed. It does not depend on the number of ranks, so a run resumes at the same place with
another data-parallel size, and a loader restored from :meth:`ShardedLoader.state_dict` yields
exactly what the original would have yielded next.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch

from .formats import Skipped, SkipReport

HOLE = -1  # a rank's slot in an epoch's last round that falls past the end


def epoch_order(num_records: int, epoch: int, *, seed: int, shuffle: bool = True) -> np.ndarray:
    """The record order of ``epoch``: a permutation seeded by ``(seed, epoch)``, or file order."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def rank_slots(num_records: int, epoch: int, offset: int, *, seed: int, dp_rank: int, dp_size: int,
               shuffle: bool = True) -> Iterator[tuple[int, int, int]]:
    """``(record index or HOLE, epoch, offset after the slot)`` for this rank, from a position on,
    through this epoch and every one after it."""
    if num_records < 1:
        raise ValueError("the dataset has no records")
    while True:
        order = epoch_order(num_records, epoch, seed=seed, shuffle=shuffle)
        while offset < num_records:
            p = offset + dp_rank
            offset += dp_size
            yield (int(order[p]) if p < num_records else HOLE), epoch, offset
        epoch, offset = epoch + 1, 0


class _Slots(torch.utils.data.IterableDataset):
    """This rank's records, built by the dataset in whichever process reads them (a worker)."""

    def __init__(self, dataset, slots_fn) -> None:
        self.dataset, self.slots_fn = dataset, slots_fn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for k, (index, epoch, offset) in enumerate(self.slots_fn()):
            if info is not None and k % info.num_workers != info.id:
                continue  # every worker reads every num_workers-th slot; the loader restores the order
            yield (None if index == HOLE else self.dataset[index]), epoch, offset


class ShardedLoader:
    """Items of a map-style dataset for one data-parallel rank, in a seeded order, resumable.

    ``next()`` returns one item per round: a sample, or ``None`` (a hole at an epoch's end, or a
    record skipped under the dataset's ``skip_bad_samples``, counted in ``report``). ``take(k)``
    gives the samples of the next ``k`` rounds. With ``num_workers`` the records are built (images
    decoded) in worker processes, ``prefetch`` items ahead per worker.
    """

    def __init__(self, dataset, *, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if len(dataset) < 1:
            raise ValueError(f"{getattr(dataset, 'path', 'the dataset')} has no records")
        self.dataset = dataset
        self.seed, self.dp_rank, self.dp_size, self.shuffle = seed, dp_rank, dp_size, shuffle
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self.epoch, self.offset = 0, 0
        self.report = SkipReport()
        self._items: Optional[Iterator] = None

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_records"] != len(self.dataset):
            raise ValueError(f"the data position was saved for {state['num_records']} records, "
                             f"the dataset has {len(self.dataset)}: resume with the same data")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._items = None  # the next read starts over from the restored position

    # ---------------------------------------------------------------- reading
    def _slots(self):
        return rank_slots(len(self.dataset), self.epoch, self.offset, seed=self.seed, dp_rank=self.dp_rank,
                          dp_size=self.dp_size, shuffle=self.shuffle)

    def _open(self) -> Iterator:
        source = _Slots(self.dataset, self._slots)
        if not self.num_workers:
            return iter(source)
        loader = torch.utils.data.DataLoader(
            source, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
            pin_memory=self.pin_memory, collate_fn=_as_is, persistent_workers=False)
        return iter(loader)

    def next(self):
        """The next round's item for this rank: a sample, or ``None``."""
        if self._items is None:
            self._items = self._open()
        item, epoch, offset = next(self._items)
        self.epoch, self.offset = (epoch + 1, 0) if offset >= len(self.dataset) else (epoch, offset)
        if isinstance(item, Skipped):
            self.report.add(item)
            return None
        return item

    def take(self, rounds: int) -> list:
        """The samples of the next ``rounds`` rounds (holes and skipped records left out)."""
        items = (self.next() for _ in range(rounds))
        return [x for x in items if x is not None]

    def close(self) -> None:
        """Stop the worker processes (reading again starts them anew, from the current position)."""
        self._items = None


def _as_is(item):
    return item
