"""The main job over several seeds: does GRPO learn, every time, in the time the demo promises?

    python tools/bench_demo.py [--seeds 0 1 2] [--out runs/bench_demo] [overrides ...]

Runs ``python -m megatron_vr1.demo out=<out>/seed<k> seed=<k>`` once per seed, one after another
(so that each wall time is the demo's alone), and prints a Markdown table of the held-out
accuracies from each run's ``summary.json`` with the demo's targets checked:

- RL sampled >= SFT sampled + 0.3, and RL sampled >= 0.7;
- RL greedy >= 0.8;
- control sampled <= SFT sampled + 0.05 (shuffled rewards teach nothing);
- the whole demo in at most 8 minutes.

Exit status 1 when any run misses a target. A run already in ``<out>`` resumes (its wall time is
then the sum over its runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TARGETS = {
    "RL sampled >= SFT sampled + 0.3": lambda h, w: h["rl"]["sampled"] >= h["sft"]["sampled"] + 0.3,
    "RL sampled >= 0.7": lambda h, w: h["rl"]["sampled"] >= 0.7,
    "RL greedy >= 0.8": lambda h, w: h["rl"]["greedy"] >= 0.8,
    "control sampled <= SFT sampled + 0.05": lambda h, w: h["control"]["sampled"] <= h["sft"]["sampled"] + 0.05,
    "at most 8 minutes": lambda h, w: w <= 480,
}


def missed(summary: dict) -> list[str]:
    """The targets a demo's ``summary.json`` misses."""
    return [name for name, ok in TARGETS.items() if not ok(summary["heldout"], summary["wall_s"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_demo")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for the demo")
    opts = parser.parse_args()
    rows, failed = [], False
    for seed in opts.seeds:
        out = Path(opts.out) / f"seed{seed}"
        proc = subprocess.run([sys.executable, "-m", "megatron_vr1.demo", f"out={out}", f"seed={seed}",
                               "progress=false", *opts.overrides], capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        summary = json.loads((out / "summary.json").read_text())
        miss = missed(summary)
        failed |= bool(miss)
        h = summary["heldout"]
        rows.append(f"| {seed} | {h['sft']['sampled']:.3f} | {h['sft']['greedy']:.3f} | {h['rl']['sampled']:.3f} | "
                    f"{h['rl']['greedy']:.3f} | {h['control']['sampled']:.3f} | {h['control']['greedy']:.3f} | "
                    f"{summary['wall_s'] / 60:.1f} | {'all' if not miss else 'missed: ' + '; '.join(miss)} |")
        print(f"seed {seed}: done", file=sys.stderr, flush=True)
    print("| seed | SFT sampled | SFT greedy | RL sampled | RL greedy | control sampled | control greedy | "
          "minutes | targets |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
