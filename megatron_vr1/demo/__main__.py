"""``python -m megatron_vr1.demo out=<dir>``: demo data, a tiny Hugging Face model, hf-to-mcore,
cold-start SFT, GRPO with two PTST stages, evaluation of both checkpoints and the export to
Hugging Face, each through its own entry point; then plots and ``<dir>/report.md``. Running it
again with the same ``out`` resumes, or says that everything is done (config: ``conf/demo.yaml``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..errors import UsageError


def run(cfg: DictConfig) -> Path:
    from .pipeline import Layout, StepFailed, checkpoints, load_state, plan, run_step, save_state, settings_of
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
             "rl": plot_rl(read_metrics(where.rl), where.plots / "rl.png")}
    ckpt = checkpoints(cfg, where)
    report = write_report(where, steps, state, plots, {"sft": (ckpt["sft"], where.eval_sft),
                                                       "rl": (ckpt["rl"], where.eval_rl)})
    ran = time.perf_counter() - start
    total = sum(v["seconds"] for v in state["steps"].values())
    print(f"\ndemo: done ({ran:.0f} s this time, {total:.0f} s of steps in all); report: {report}", flush=True)
    return report


@hydra.main(config_path=str(CONF_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UsageError as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
