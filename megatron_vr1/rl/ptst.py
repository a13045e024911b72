"""Progressive Thinking Suppression Training: the schedule of response budgets and group sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import UsageError


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based, as the metrics report it
    max_response_tokens: int
    group_size: int
    steps: int
    prompts_per_step: Optional[int] = None  # None: rl.rollout.prompts_per_step
    first_step: int = 1  # the global step it starts at


def parse_stages(stages: Iterable[dict[str, Any]]) -> list[Stage]:
    """``rl.stages`` -> stages with their starting steps; bad entries name what to fix."""
    out, start = [], 1
    for i, raw in enumerate(stages, 1):
        raw = dict(raw)
        unknown = set(raw) - {"max_response_tokens", "group_size", "steps", "prompts_per_step"}
        if unknown:
            raise UsageError(f"rl.stages[{i - 1}] has unknown keys {sorted(unknown)}")
        try:
            stage = Stage(i, int(raw["max_response_tokens"]), int(raw["group_size"]), int(raw["steps"]),
                          None if raw.get("prompts_per_step") is None else int(raw["prompts_per_step"]), start)
        except KeyError as e:
            raise UsageError(f"rl.stages[{i - 1}] needs {e.args[0]}") from None
        if min(stage.max_response_tokens, stage.group_size, stage.steps) < 1:
            raise UsageError(f"rl.stages[{i - 1}]: max_response_tokens, group_size and steps must be >= 1")
        out.append(stage)
        start += stage.steps
    if not out:
        raise UsageError("rl.stages is empty")
    return out


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that global step ``step`` (1-based) belongs to."""
    for stage in stages:
        if step < stage.first_step + stage.steps:
            return stage
    raise ValueError(f"step {step} is past the last stage")
