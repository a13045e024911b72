"""Per-step metrics: one JSON line per optimizer step, TensorBoard scalars, a progress bar.

Only the writing rank (global rank 0) writes. On resume, lines past the resumed step (written by
the run that died after its last checkpoint) are dropped, so the file holds one history.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..files import write_whole


class MetricsLog:
    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: Optional[bool] = None, name: str = "train") -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start_step, self.total_steps = start_step, total_steps
        self._tb = self._bar = None
        self._started = time.monotonic()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        interactive = sys.stderr.isatty() if progress is None else progress
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_whole(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        shown = {k: record[k] for k in ("loss", "reward_mean", "lr", "stage") if k in record}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                                  refresh=False)
            self._bar.update(step - self._bar.n)
        else:  # not a terminal: one plain line per step, with the time to go
            done = step - self.start_step
            eta = (time.monotonic() - self._started) / done * (self.total_steps - step) if done else float("nan")
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            print(f"step {step}/{self.total_steps} {parts} eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
