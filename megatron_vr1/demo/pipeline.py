"""The demo's steps, each one command a user could type, run in turn and remembered when done.

``<out>/demo_state.json`` holds the demo's settings and, per finished step, its time and what it
printed; a step is recorded only once its command has exited cleanly. The trainers and the
evaluation resume on their own, so a step cut short simply runs again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UsageError
from ..files import write_whole

STATE = "demo_state.json"
# the settings that change what the steps make (progress bars and the like do not)
RESULT_KEYS = ("model", "seed", "data", "sft", "rl", "heldout")
RUNS = ("sft", "rl", "control")  # the checkpoints scored on the held-out set
MODES = ("sampled", "greedy")


@dataclass
class Step:
    name: str
    title: str
    argv: list[str]           # after the Python interpreter
    output: Optional[Path] = None  # what the step makes (shown to the user)
    capture: bool = False     # keep its standard output for the report

    def shell(self) -> str:
        return "python " + " ".join(shlex.quote(a) for a in self.argv)


@dataclass
class Layout:
    """Where each step writes under ``out``."""
    out: Path

    data = property(lambda self: self.out / "data")
    hf_init = property(lambda self: self.out / "hf_init")
    mcore_init = property(lambda self: self.out / "mcore_init")
    sft = property(lambda self: self.out / "sft")
    rl = property(lambda self: self.out / "rl")
    control = property(lambda self: self.out / "control")  # GRPO on shuffled rewards
    hf_export = property(lambda self: self.out / "hf_export")
    plots = property(lambda self: self.out / "plots")
    report = property(lambda self: self.out / "report.md")
    summary = property(lambda self: self.out / "summary.json")

    def heldout(self, run: str, mode: str) -> Path:
        return self.out / "heldout" / run / mode


def _iter(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"  # the trainers' checkpoint folder name (training.checkpoint)


def rl_steps(cfg: DictConfig) -> int:
    return sum(int(s["steps"]) for s in cfg.rl.stages)


def checkpoints(cfg: DictConfig, where: Layout) -> dict[str, Path]:
    """The checkpoints the demo scores on the held-out set (each run's last step)."""
    return {"sft": _iter(where.sft, int(cfg.sft.steps)), "rl": _iter(where.rl, rl_steps(cfg)),
            "control": _iter(where.control, rl_steps(cfg))}


def plan(cfg: DictConfig, where: Layout) -> list[Step]:
    progress = "null" if cfg.progress is None else str(bool(cfg.progress)).lower()
    tensorboard = str(bool(cfg.tensorboard)).lower()
    tokenizer = "toy" if str(cfg.model) == "toy" else "qwen"
    ckpt = checkpoints(cfg, where)
    stages = json.dumps(OmegaConf.to_container(cfg.rl.stages, resolve=True)).replace('"', "")
    d = cfg.data
    rl = ["-m", "megatron_vr1.rl", f"model={cfg.model}", f"init_from={ckpt['sft']}",
          f"data.train={where.data / 'rl.jsonl'}", f"seed={cfg.seed}", f"rl.stages={stages}",
          f"rl.rollout.prompts_per_step={cfg.rl.prompts_per_step}", f"train.lr={cfg.rl.lr}",
          f"checkpoint.every={rl_steps(cfg)}", f"metrics.tensorboard={tensorboard}", f"metrics.progress={progress}",
          *cfg.rl.extra]
    steps = [
        Step("data", "demo data", ["-m", "megatron_vr1.cli.make_demo_data", f"out={where.data}",
                                   f"n_sft={d.n_sft}", f"n_rl={d.n_rl}", f"n_eval={d.n_heldout}", f"seed={d.seed}",
                                   f"kinds=[{','.join(d.kinds)}]", f"sft_answers={d.sft_answers}", "tokenizer=null"],
             where.data),
        Step("hf_init", "a tiny Hugging Face model", ["-m", "megatron_vr1.cli.make_tiny_model",
                                                      f"out={where.hf_init}", f"model={cfg.model}",
                                                      f"tokenizer={tokenizer}", f"seed={cfg.seed}",
                                                      "overwrite=true"], where.hf_init),
        Step("convert", "hf-to-mcore", ["-m", "megatron_vr1.cli.convert", "hf-to-mcore", "--hf", str(where.hf_init),
                                        "--out", str(where.mcore_init), "--overwrite"], where.mcore_init),
        Step("sft", "cold-start SFT", ["-m", "megatron_vr1.sft", f"model={cfg.model}", f"init_from={where.mcore_init}",
                                       f"data.train={where.data / 'sft.json'}", f"checkpoint.dir={where.sft}",
                                       "data.system_prompt=null", f"seed={cfg.seed}", f"train.steps={cfg.sft.steps}",
                                       f"train.global_batch_size={cfg.sft.global_batch_size}",
                                       f"train.lr={cfg.sft.lr}", f"checkpoint.every={cfg.sft.steps}",
                                       f"metrics.tensorboard={tensorboard}", f"metrics.progress={progress}",
                                       *cfg.sft.extra], ckpt["sft"]),
        Step("rl", "GRPO with PTST", [*rl, f"checkpoint.dir={where.rl}"], ckpt["rl"]),
        Step("control", "the control: the same GRPO on shuffled rewards",
             [*rl, f"checkpoint.dir={where.control}", "rl.reward.shuffle=true"], ckpt["control"]),
    ]
    h = cfg.heldout
    for run in RUNS:
        for mode in MODES:
            out = where.heldout(run, mode)
            sampling = [f"temperature={h.temperature}", f"top_p={h.top_p}", f"samples={h.samples}"] \
                if mode == "sampled" else ["temperature=0", "samples=1"]
            # the same seed for every checkpoint: sample k of record i draws the same random numbers
            steps.append(Step(f"heldout_{run}_{mode}", f"held-out set, {run.upper()} checkpoint, {mode}",
                              ["-m", "megatron_vr1.eval", f"checkpoint={ckpt[run]}",
                               f"data={where.data / 'eval.jsonl'}", f"out={out}", *sampling,
                               f"max_new_tokens={h.max_new_tokens}", f"batch_size={h.batch_size}",
                               f"seed={cfg.seed}", f"progress={progress}"], out / "summary.md"))
    steps += [
        Step("export", "export to Hugging Face", ["-m", "megatron_vr1.cli.convert", "mcore-to-hf", "--mcore",
                                                  str(ckpt["rl"]), "--out", str(where.hf_export), "--overwrite"],
             where.hf_export),
        Step("verify", "the export against the checkpoint", ["-m", "megatron_vr1.cli.convert", "verify", "--hf",
                                                             str(where.hf_export), "--mcore", str(ckpt["rl"]),
                                                             "--tolerance", "1e-4"], capture=True),
    ]
    return steps


def accuracy(where: Layout, run: str, mode: str) -> float:
    """One run's accuracy in [0, 1] on the held-out set in one decoding mode, from its
    evaluation's summary (mean over every sample of every record)."""
    summary = json.loads((where.heldout(run, mode) / "summary.json").read_text())
    (bench,) = summary["benchmarks"].values()
    return bench["overall"]["accuracy"] / 100.0


def heldout_accuracy(where: Layout) -> dict[str, dict[str, float]]:
    """Accuracy per run and decoding mode (:func:`accuracy`)."""
    return {run: {mode: accuracy(where, run, mode) for mode in MODES} for run in RUNS}


def write_summary(where: Layout, wall_s: float) -> dict[str, Any]:
    summary = {"heldout": heldout_accuracy(where), "wall_s": round(wall_s, 1)}
    write_whole(where.summary, json.dumps(summary, indent=1))
    return summary


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in RESULT_KEYS}


def load_state(where: Layout, settings: dict[str, Any]) -> dict[str, Any]:
    """The state of an earlier run into the same ``out``; refuses one made with other settings."""
    path = where.out / STATE
    if not path.exists():
        return {"settings": settings, "steps": {}}
    state = json.loads(path.read_text())
    changed = sorted(k for k in RESULT_KEYS if state["settings"].get(k) != settings.get(k))
    if changed:
        raise UsageError(f"out={where.out} holds a demo made with other settings ({', '.join(changed)} differ): "
                         f"use another out, or delete that folder to start again")
    return state


def save_state(where: Layout, state: dict[str, Any]) -> None:
    write_whole(where.out / STATE, json.dumps(state, indent=1))


def child_env() -> dict[str, str]:
    """The environment of a step: a one-process job, whatever launched the demo, with one intra-op
    thread unless ``OMP_NUM_THREADS`` says otherwise (the toy model's ops are too small to split:
    on 2 CPU cores a GRPO step took 3.4 s with two threads, 2.0 s with one)."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_step(step: Step, cwd: Path) -> tuple[float, str]:
    """Run one step's command, its output on the console; ``(seconds, captured stdout)``."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *step.argv], cwd=cwd, env=child_env(), text=True,
                          stdout=subprocess.PIPE if step.capture else None)
    captured = proc.stdout or ""
    if captured:
        print(captured, end="", flush=True)
    if proc.returncode:
        raise StepFailed(f"step {step.name} ({step.title}) failed with exit code {proc.returncode}; its command:\n"
                         f"  {step.shell()}\nfix what it printed above and run the demo again: it resumes here")
    return time.perf_counter() - start, captured


class StepFailed(RuntimeError):
    pass
