"""Do the GRPO variants learn the demo's task, as GRPO does, while their shuffled-reward controls
do not? (Too slow for the test suite: about two minutes per variant and seed on a 2-core CPU.)

    python tools/bench_variants.py [--seeds 0 1 2] [--variants gspo dapo] [--out runs/bench_variants]

Runs the main job's own steps (``megatron_vr1.demo.pipeline.plan``), shortened as
tests/test_demo.py shortens them (36 RL steps, 32 held-out problems x 4 samples), with each
variant's overrides added to the demo's RL ones: per seed one cold start (answers shuffled: the
task at chance), then per variant its GRPO run, the same run paid shuffled rewards, and their
held-out evaluations. Prints a Markdown table and checks, per run:

- RL sampled and greedy >= cold start + 0.15;
- control sampled <= cold start + 0.05;
- DAPO: at least 34 of its 36 steps hold all 16 groups with mixed rewards, and the overlong
  penalty touched some responses.

Exit status 1 when a run misses one. Steps already done in ``--out`` are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["data.n_heldout=32", "heldout.samples=4", "progress=false",
         "rl.stages=[{max_response_tokens: 32, group_size: 8, steps: 28}, "
         "{max_response_tokens: 48, group_size: 4, steps: 8}]"]
VARIANTS = {"gspo": ["rl=gspo"],
            "dapo": ["rl=dapo", "rl.reward.overlong_buffer=4", "rl.loss.mask_truncated=true"]}


def steps_for(out: Path, seed: int, variant: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_vr1.demo.pipeline import Layout, plan

    extra = list(OmegaConf.load(ROOT / "conf" / "demo.yaml").rl.extra) + variant
    quoted = ",".join(f"'{x}'" for x in extra)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("demo", overrides=[f"out={out}", f"seed={seed}", *SHORT, f"rl.extra=[{quoted}]"])
    return {step.name: step for step in plan(cfg, Layout(out))}


def run(steps: dict, names: list[str], cwd: Path) -> None:
    from megatron_vr1.demo.pipeline import run_step

    for name in names:
        if steps[name].output is not None and steps[name].output.exists():
            continue  # done in an earlier run of the bench
        run_step(steps[name], cwd)


def variant_run(base: Path, out: Path, seed: int, name: str) -> dict:
    """One variant from the cold start in ``base``: its held-out gains and what it missed."""
    out.mkdir(parents=True, exist_ok=True)
    for shared in ("data", "sft"):  # the variant trains from the shared cold start
        if not (out / shared).exists():
            (out / shared).symlink_to(base / shared)
    run(steps_for(out, seed, VARIANTS[name]),
        ["rl", "control", "heldout_rl_sampled", "heldout_rl_greedy", "heldout_control_sampled"], out)
    from megatron_vr1.demo.pipeline import Layout, accuracy

    cold, here = Layout(base), Layout(out)
    sft = {mode: accuracy(cold, "sft", mode) for mode in ("sampled", "greedy")}
    got = {"sampled": accuracy(here, "rl", "sampled") - sft["sampled"],
           "greedy": accuracy(here, "rl", "greedy") - sft["greedy"],
           "control": accuracy(here, "control", "sampled") - sft["sampled"]}
    missed = [f"RL {mode} >= cold start + 0.15" for mode in ("sampled", "greedy") if got[mode] < 0.15]
    if got["control"] > 0.05:
        missed.append("control sampled <= cold start + 0.05")
    if name == "dapo":
        m = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
        if sum(x["groups_kept"] == 16 for x in m) < 34:
            missed.append("34 of 36 steps full of mixed groups")
        if not sum(x["overlong_penalized"] for x in m):
            missed.append("the overlong penalty touched a response")
    return dict(got, missed=missed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/bench_variants")
    opts = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    rows, failed = [], False
    for seed in opts.seeds:
        base = Path(opts.out).resolve() / f"seed{seed}" / "base"
        base.mkdir(parents=True, exist_ok=True)
        run(steps_for(base, seed, []), ["data", "hf_init", "convert", "sft", "heldout_sft_sampled",
                                        "heldout_sft_greedy"], base)
        for name in opts.variants:
            r = variant_run(base, base.parent / name, seed, name)
            failed |= bool(r["missed"])
            rows.append(f"| {name} | {seed} | {r['sampled']:+.3f} | {r['greedy']:+.3f} | {r['control']:+.3f} | "
                        f"{'all' if not r['missed'] else 'missed: ' + '; '.join(r['missed'])} |")
            print(f"seed {seed} {name}: done", file=sys.stderr, flush=True)
    print("Held-out accuracy over the cold start:\n")
    print("| variant | seed | RL sampled | RL greedy | control sampled | targets |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
