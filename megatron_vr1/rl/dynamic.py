"""DAPO's dynamic sampling: a group whose rewards are all equal has zero advantages and carries
no gradient. With ``rl.dynamic_sampling.enabled`` a step samples more prompts' groups, round after
round, until it holds the step's number of groups with mixed rewards (``prompts_per_step`` of the
PTST stage, over all data-parallel replicas), or ``max_rounds`` rounds are spent; then it trains
on exactly that many (fewer only when the rounds ran out).

Data-parallel replicas agree: every round, and the decision to sample again, follows the global
count of mixed groups; the groups trained on are each replica's first mixed ones, replicas
filled in rank order up to the target. Each replica's data position advances by the prompts it
drew, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass
class DynamicSamplingSettings:
    enabled: bool = False
    max_rounds: int = 4  # rounds of generation per step, the first included
    oversample: float = 1.5  # a later round draws this many times the groups still missing


def mixed_groups(rewards: Sequence[float], group_size: int) -> torch.Tensor:
    """Per group (consecutive ``group_size`` rewards): whether its rewards are not all equal."""
    if not len(rewards):
        return torch.zeros(0, dtype=torch.bool)
    groups = torch.tensor(list(rewards), dtype=torch.float64).view(-1, group_size)
    return groups.amax(1) != groups.amin(1)


def quota(counts: Sequence[int], rank: int, target: int) -> int:
    """How many of its mixed groups replica ``rank`` keeps: replicas fill ``target`` in rank order."""
    before = sum(counts[:rank])
    return max(0, min(counts[rank], target - before))


class DynamicSampler:
    """One step's rounds. Every data-parallel rank calls each method alike (they are collectives)."""

    def __init__(self, settings: DynamicSamplingSettings, *, target: int, group_size: int, dp_group, device) -> None:
        self.s, self.target, self.group_size = settings, target, group_size
        self.dp_group, self.device = dp_group, device
        self.rounds = 1
        self.mixed = 0  # over all replicas, so far
        self.generated = 0
        self.kept = 0

    def _counts(self, rewards: Sequence[float]) -> list[int]:
        """Each replica's number of (mixed groups, groups)."""
        mine = torch.tensor([int(mixed_groups(rewards, self.group_size).sum()), len(rewards) // self.group_size],
                            dtype=torch.long, device=self.device)
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return [tuple(mine.tolist())]
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.dp_group))]
        dist.all_gather(every, mine, group=self.dp_group)
        return [tuple(x.tolist()) for x in every]

    def wants_more(self, rewards: Sequence[float]) -> bool:
        """Whether to sample another round, given this replica's rewards so far this step."""
        counts = self._counts(rewards)
        self.mixed, self.generated = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return self.mixed < self.target and self.rounds < self.s.max_rounds

    def next_draw(self, dp_size: int) -> int:
        """Prompts this replica draws for the next round."""
        self.rounds += 1
        return max(1, math.ceil((self.target - self.mixed) * self.s.oversample / dp_size))

    def keep(self, rewards: Sequence[float]) -> torch.Tensor:
        """Per group of this replica: whether the step trains on it."""
        mixed = mixed_groups(rewards, self.group_size)
        counts = self._counts(rewards)
        self.mixed, self.generated = sum(c[0] for c in counts), sum(c[1] for c in counts)
        rank = dist.get_rank(self.dp_group) if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1 else 0
        mine = quota([c[0] for c in counts], rank, self.target)
        self.kept = min(self.mixed, self.target)
        keep = mixed.clone()
        keep[mixed.nonzero()[mine:, 0]] = False  # this replica's first `mine` mixed groups
        return keep

    def metrics(self) -> dict:
        return {"dynamic_sampling_rounds": self.rounds, "groups_kept": self.kept, "groups_generated": self.generated}
