"""Seeded, data-parallel, resumable reading of a map-style dataset, built in DataLoader workers.

Each epoch has one order of all ``n`` records (a seeded permutation, or file order), and a
position ``(epoch, offset)`` counts how many of the epoch's records all data-parallel ranks
together have consumed. The position does not depend on the number of ranks, so a run resumes at
the same place with another data-parallel size, and a loader restored from its ``state_dict``
yields exactly what the original would have yielded next. Two ways to share the records:

* :class:`ShardedLoader` deals the order round-robin: rank ``r`` of ``dp`` reads positions
  ``r, r + dp, ...`` (disjoint shards covering the epoch; in an epoch's last round a rank past
  the end gets a hole). For prompts, evaluation, anything read item by item.
* :class:`GlobalBatchLoader` takes the next ``global_batch`` records per optimizer step, measures
  them (text and image headers only), packs them into micro-batches balanced over the ranks
  (:func:`~.packing.pack_balanced`: the same number of micro-batches on every rank, nearly the
  same tokens) and builds only this rank's. For training.

Either way a rank builds (decodes the images of) only its own records, in ``num_workers``
worker processes when asked, ``prefetch`` items ahead per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from .formats import RecordError, Skipped, SkipReport
from .images import ImageError
from .template import SampleError
from .packing import pack_balanced

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
    while True:
        order = epoch_order(num_records, epoch, seed=seed, shuffle=shuffle)
        while offset < num_records:
            p = offset + dp_rank
            offset += dp_size
            after = (epoch, offset) if offset < num_records else (epoch + 1, 0)
            yield (int(order[p]) if p < num_records else HOLE), *after
        epoch, offset = epoch + 1, 0


def global_batches(num_records: int, epoch: int, offset: int, *, seed: int, global_batch: int,
                   shuffle: bool = True) -> Iterator[tuple[list[int], int, int]]:
    """``(record indices of one step, epoch, offset after it)``: the next ``global_batch``
    positions of the epoch order, running on into the next epoch at an epoch's end."""
    order = epoch_order(num_records, epoch, seed=seed, shuffle=shuffle)
    while True:
        indices = []
        while len(indices) < global_batch:
            if offset >= num_records:
                epoch, offset = epoch + 1, 0
                order = epoch_order(num_records, epoch, seed=seed, shuffle=shuffle)
            take = min(global_batch - len(indices), num_records - offset)
            indices += order[offset:offset + take].tolist()
            offset += take
        if offset >= num_records:
            epoch, offset = epoch + 1, 0
            order = epoch_order(num_records, epoch, seed=seed, shuffle=shuffle)
        yield indices, epoch, offset


class _Prefetch(torch.utils.data.IterableDataset):
    """``(build(plan), epoch, offset)`` for each ``(plan, epoch, offset)`` the source yields, built
    in whichever process reads it; worker k of W builds items k, k + W, ... and the DataLoader
    hands them back in order."""

    def __init__(self, source: Callable[[], Iterator], build: Callable) -> None:
        self.source, self.build = source, build

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for k, (plan, epoch, offset) in enumerate(self.source()):
            if info is not None and k % info.num_workers != info.id:
                continue
            yield self.build(plan), epoch, offset


class _PositionedLoader:
    """What both loaders share: the position, its state dict, the (optional) worker processes."""

    def __init__(self, dataset, *, seed: int, dp_rank: int, dp_size: int, shuffle: bool, num_workers: int,
                 prefetch: int, pin_memory: bool = False) -> None:
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

    def close(self) -> None:
        """Stop the worker processes (reading again starts them anew, from the current position)."""
        self._items = None

    def _source(self) -> Iterator:
        raise NotImplementedError

    def _build(self, plan):
        raise NotImplementedError

    def _next(self):
        if self._items is None:
            source = _Prefetch(self._source, self._build)
            if self.num_workers:
                source = torch.utils.data.DataLoader(
                    source, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
                    pin_memory=self.pin_memory, collate_fn=_as_is, persistent_workers=False)
            self._items = iter(source)
        try:
            item, self.epoch, self.offset = next(self._items)
        except (SampleError, ImageError, RecordError) as e:  # a worker's error, re-raised with its traceback
            raise type(e)(own_message(e)) from None
        return item


class ShardedLoader(_PositionedLoader):
    """Items of a map-style dataset for one data-parallel rank, dealt round-robin, resumable.

    ``next()`` returns one item per round: a sample, or ``None`` (a hole at an epoch's end, or a
    record skipped under the dataset's ``skip_bad_samples``, counted in ``report``). ``take(k)``
    gives the samples of the next ``k`` rounds.
    """

    def __init__(self, dataset, *, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        super().__init__(dataset, seed=seed, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle,
                         num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory)

    def _source(self):
        return rank_slots(len(self.dataset), self.epoch, self.offset, seed=self.seed, dp_rank=self.dp_rank,
                          dp_size=self.dp_size, shuffle=self.shuffle)

    def _build(self, index):
        return None if index == HOLE else self.dataset[index]

    def next(self):
        """The next round's item for this rank: a sample, or ``None``."""
        item = self._next()
        if isinstance(item, Skipped):
            self.report.add(item)
            return None
        return item

    def take(self, rounds: int) -> list:
        """The samples of the next ``rounds`` rounds (holes and skipped records left out)."""
        items = (self.next() for _ in range(rounds))
        return [x for x in items if x is not None]


@dataclass
class StepData:
    """This rank's share of one optimizer step's global batch."""

    micro_batches: list[list]  # samples per micro-batch; the same count on every rank (some may be empty)
    records: int  # records in the global batch, bad ones included
    tokens: int  # tokens of the global batch's usable records (all ranks)
    skipped: list[Skipped] = field(default_factory=list)  # this rank's to count (see GlobalBatchLoader)


class GlobalBatchLoader(_PositionedLoader):
    """One optimizer step at a time: the next ``global_batch`` records, balanced over the ranks.

    Every rank measures every record of the step (tokens from text and image headers), so all
    agree on the micro-batches :func:`pack_balanced` makes of them (at most ``micro_batch_tokens``
    each, the same number per rank); then each rank builds only its own. A bad record is counted
    once: by rank 0 when measuring finds it, by its builder otherwise.
    """

    def __init__(self, dataset, *, seed: int, global_batch: int, micro_batch_tokens: int, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, num_workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False) -> None:
        super().__init__(dataset, seed=seed, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle,
                         num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory)
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.global_batch, self.micro_batch_tokens = global_batch, micro_batch_tokens

    def _source(self):
        return global_batches(len(self.dataset), self.epoch, self.offset, seed=self.seed,
                              global_batch=self.global_batch, shuffle=self.shuffle)

    def _build(self, indices: list[int]) -> StepData:
        lengths = [self.dataset.length(i) for i in indices]
        skipped = [x for x in lengths if isinstance(x, Skipped)] if self.dp_rank == 0 else []
        good = [(i, n) for i, n in zip(indices, lengths) if not isinstance(n, Skipped)]
        too_long = [n for _, n in good if n > self.micro_batch_tokens]
        if too_long:
            raise ValueError(f"a sample of {too_long[0]} tokens does not fit micro_batch_tokens="
                             f"{self.micro_batch_tokens}: raise it to at least the data cut-off (max_tokens)")
        # no usable record at all: one empty micro-batch on every rank
        bins = pack_balanced([n for _, n in good], self.micro_batch_tokens, self.dp_size)[self.dp_rank] if good \
            else [[]]
        micro_batches = []
        for b in bins:
            samples = []
            for k in b:
                item = self.dataset[good[k][0]]
                (skipped.append if isinstance(item, Skipped) else samples.append)(item)
            micro_batches.append(samples)
        return StepData(micro_batches, len(indices), sum(n for _, n in good), skipped)

    def next_step(self) -> StepData:
        step = self._next()
        for item in step.skipped:
            self.report.add(item)
        return step


def own_message(error: Exception) -> str:
    """An error's own message: a DataLoader worker's error arrives with the worker's traceback
    prepended ("Caught ... in DataLoader worker process 0. Original Traceback ..."), one line of
    which is the message itself."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _as_is(item):
    return item
