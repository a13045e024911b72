"""``<out>/report.md``: what the demo ran, its curves, and the evaluation of both checkpoints."""

from __future__ import annotations

import json
import os
import platform as host
from pathlib import Path
from typing import Any

from .pipeline import Layout, Step
from .plots import read_metrics


def machine() -> str:
    cpus = os.cpu_count() or 0
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {cpus} CPU cores"
    except ImportError:
        pass
    name = host.processor() or host.machine()
    return f"{cpus}-core {name} CPU ({host.system()}), no GPU"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _stage_rows(metrics: list[dict]) -> list[str]:
    rows = ["| stage | steps | max response tokens | rollouts per prompt | mean reward, first step | "
            "mean reward, last step | mean length |", "| --- | --- | --- | --- | --- | --- | --- |"]
    stages: dict[int, list[dict]] = {}
    for m in metrics:
        stages.setdefault(int(m["stage"]), []).append(m)
    for stage, ms in sorted(stages.items()):
        length = sum(m["response_length_mean"] for m in ms) / len(ms)
        rows.append(f"| {stage} | {ms[0]['step']}-{ms[-1]['step']} | {ms[0]['max_response_tokens']} | "
                    f"{ms[0]['group_size']} | {ms[0]['reward_mean']:.3f} | {ms[-1]['reward_mean']:.3f} | {length:.1f} |")
    return rows


def _eval_tables(evals: dict[str, tuple[Path, Path]], root: Path) -> list[str]:
    """One row per evaluated checkpoint, then accuracy by the benchmark's categories."""
    lines = ["| checkpoint | folder | samples | accuracy % | no answer | mean response characters |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_category: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (ckpt, out) in evals.items():
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        chars = sum(len(r["response"]) for r in rows) / max(1, len(rows))
        for bench, e in summary["benchmarks"].items():
            lines.append(f"| {name.upper()} | `{_rel(ckpt, root)}` | {e['overall']['n']} | "
                         f"{e['overall']['accuracy']:.1f} | {e['no_answer']} | {chars:.0f} |")
            for field, groups in e["categories"].items():
                for key, value in groups.items():
                    by_category.setdefault(f"{field}: {key}", {})[name] = value
    if by_category:
        names = list(evals)
        lines += ["", "By the records' MathVista category fields (accuracy %, samples):", "",
                  "| category | " + " | ".join(n.upper() for n in names) + " |", "| --- |" + " --- |" * len(names)]
        for cat, per in sorted(by_category.items()):
            cells = [f"{per[n]['accuracy']:.1f} ({per[n]['n']})" if n in per else "-" for n in names]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return lines


def write_report(where: Layout, steps: list[Step], state: dict[str, Any], plots: dict[str, Path],
                 evals: dict[str, tuple[Path, Path]]) -> Path:
    root = where.out
    done = state["steps"]
    total = sum(done[s.name]["seconds"] for s in steps if s.name in done)
    lines = ["# megatron-vr1 demo", "",
             f"Vision-R1's pipeline end to end on a tiny Qwen2.5-VL ({state['settings']['model']}) and the offline "
             f"demo data, on {machine()}: {total / 60:.1f} minutes of steps in all.", "",
             "## Steps", "", "| # | step | seconds | command |", "| --- | --- | --- | --- |"]
    for i, s in enumerate(steps, 1):
        seconds = f"{done[s.name]['seconds']:.1f}" if s.name in done else "-"
        lines.append(f"| {i} | {s.title} | {seconds} | `{s.shell()}` |")
    sft = read_metrics(where.sft)
    lines += ["", "## Cold-start SFT", "", f"![SFT loss]({_rel(plots['sft'], root)})", "",
              f"{len(sft)} steps; loss {sft[0]['loss']:.4f} at step 1, {sft[-1]['loss']:.4f} at step {sft[-1]['step']}. "
              f"TensorBoard logs of both runs: `tensorboard --logdir {where.out}`.", ""]
    rl = read_metrics(where.rl)
    lines += ["## GRPO with PTST", "", f"![reward, accuracy and response length]({_rel(plots['rl'], root)})", "",
              *_stage_rows(rl), ""]
    lines += ["## Evaluation on the demo eval set", "",
              "Each checkpoint through `python -m megatron_vr1.eval` (details in its `summary.md`, every "
              "response in its `samples.jsonl`):", "", *_eval_tables(evals, root), ""]
    verify = done.get("verify", {}).get("output", "").strip()
    lines += ["## Export", "", f"The RL checkpoint as a Hugging Face folder: `{_rel(where.hf_export, root)}` "
              f"(`Qwen2_5_VLForConditionalGeneration.from_pretrained`, or `vllm serve`). Checked against the "
              f"Megatron checkpoint: {verify or 'not checked'}.", ""]
    where.report.write_text("\n".join(lines))
    return where.report
