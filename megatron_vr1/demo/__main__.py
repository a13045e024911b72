"""``python -m megatron_vr1.demo out=<dir>``: demo data, a tiny Hugging Face model, hf-to-mcore,
a cold start that teaches the format but not the task, GRPO with two PTST stages and the same GRPO
on shuffled rewards (the control), the three checkpoints scored on a held-out set (sampled and
greedy), and the export to Hugging Face, each through its own entry point; then plots,
``<dir>/summary.json`` and ``<dir>/report.md``. Running it again with the same ``out`` resumes,
or says that everything is done (config: ``conf/demo.yaml``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from ..entry import hydra_main
from ..errors import UsageError


def run(cfg: DictConfig) -> Path:
    from .pipeline import (Layout, StepFailed, checkpoints, load_state, plan, run_step, save_state, settings_of,
                           write_summary)
    from .plots import plot_rl, plot_sft, read_metrics
    from .report import write_report

    where = Layout(Path(cfg.out).resolve())
    where.out.mkdir(parents=True, exist_ok=True)
    state = load_state(where, settings_of(cfg))
    save_state(where, state)
    steps = plan(cfg, where)
    already = [s.name for s in steps if s.name in state["steps"]]
    if already:
        print(f"demo: already done in {where.out}: {', '.join(already)}", flush=True)
    start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        if step.name in state["steps"]:
            continue
        print(f"\ndemo [{i}/{len(steps)}] {step.title}\n  {step.shell()}", flush=True)
        try:
            seconds, output = run_step(step, where.out)
        except StepFailed as e:
            print(f"demo: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        state["steps"][step.name] = {"seconds": round(seconds, 2), "output": output}
        save_state(where, state)
        print(f"demo [{i}/{len(steps)}] {step.title}: done in {seconds:.1f} s"
              + (f" -> {step.output}" if step.output else ""), flush=True)
    plots = {"sft": plot_sft(read_metrics(where.sft), where.plots / "sft_loss.png"),
             "rl": plot_rl(read_metrics(where.rl), where.plots / "rl.png", control=read_metrics(where.control))}
    # the demo's time in all: every step's (however many runs it took) and this run's own work
    total = sum(v["seconds"] for v in state["steps"].values())
    summary = write_summary(where, total + time.perf_counter() - start - sum(
        state["steps"][s.name]["seconds"] for s in steps if s.name not in already))
    report = write_report(where, steps, state, plots, checkpoints(cfg, where), summary)
    ran = time.perf_counter() - start
    h = summary["heldout"]
    print(f"\ndemo: held-out accuracy, sampled (greedy): SFT {h['sft']['sampled']:.3f} ({h['sft']['greedy']:.3f}), "
          f"RL {h['rl']['sampled']:.3f} ({h['rl']['greedy']:.3f}), control {h['control']['sampled']:.3f} "
          f"({h['control']['greedy']:.3f})", flush=True)
    print(f"demo: done ({ran:.0f} s this time, {summary['wall_s']:.0f} s in all); report: {report}", flush=True)
    return report


@hydra_main("demo", "demo")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
