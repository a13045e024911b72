"""Per-step metrics: one JSON line per optimizer step, TensorBoard scalars, a progress bar, and
``console.log``: what the writing rank printed, beside ``metrics.jsonl``.

Only the writing rank (global rank 0) writes. On resume, lines past the resumed step (written by
the run that died after its last checkpoint) are dropped, so the file holds one history. The
time to go leaves out a run's first step (start-up, first-call compilation).
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
        self._first_done: Optional[float] = None  # when this run's first step was logged
        self.name = name
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        # the bar is made at the first step, after the trainer's header lines: made now, it would
        # be drawn over by them
        self._interactive = sys.stderr.isatty() if progress is None else progress

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
        if record.get("skipped"):
            shown["skipped"] = record["skipped"]  # records left out under data.skip_bad_samples
        now = time.monotonic()
        if self._first_done is None:
            self._first_done, self._first_step = now, step
        if self._interactive:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.name, unit="step",
                                 dynamic_ncols=True)
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                                  refresh=False)
            self._bar.update(step - self._bar.n)
        else:  # not a terminal: one plain line per step, with the time to go
            timed = step - self._first_step  # steps since the first, whose time is start-up's too
            eta = (now - self._first_done) / timed * (self.total_steps - step) if timed else float("nan")
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


CONSOLE = "console.log"


class Tee:
    """Append what this process writes to stdout and stderr to ``path`` as well, until closed
    (the writing rank's ``<checkpoint.dir>/console.log``; a progress bar's redraws become lines)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self._streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = (_TeeStream(s, self._file) for s in self._streams)

    def close(self) -> None:
        sys.stdout, sys.stderr = self._streams
        self._file.close()


class _TeeStream:
    def __init__(self, stream, file) -> None:
        self._stream, self._file = stream, file

    def write(self, text: str) -> int:
        if not self._file.closed:
            self._file.write(text.replace("\r", "\n") if "\r" in text else text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        if not self._file.closed:
            self._file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


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
