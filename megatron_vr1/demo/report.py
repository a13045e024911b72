"""``<out>/report.md``: the held-out accuracy of the three checkpoints, what the demo ran, its curves."""

from __future__ import annotations

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


def _heldout_rows(summary: dict[str, Any], ckpts: dict[str, Path], root: Path, settings: dict) -> list[str]:
    h = settings["heldout"]
    lines = [f"| checkpoint | folder | sampled accuracy (T={h['temperature']}, {h['samples']} per prompt) | "
             "greedy accuracy |", "| --- | --- | --- | --- |"]
    titles = {"sft": "cold-start SFT", "rl": "GRPO with PTST", "control": "control: GRPO on shuffled rewards"}
    for run, acc in summary["heldout"].items():
        lines.append(f"| {titles[run]} | `{_rel(ckpts[run], root)}` | {acc['sampled']:.3f} | {acc['greedy']:.3f} |")
    return lines


def write_report(where: Layout, steps: list[Step], state: dict[str, Any], plots: dict[str, Path],
                 ckpts: dict[str, Path], summary: dict[str, Any]) -> Path:
    root = where.out
    done = state["steps"]
    settings = state["settings"]
    lines = ["# megatron-vr1 demo", "",
             f"Vision-R1's pipeline end to end on a tiny Qwen2.5-VL ({settings['model']}) and the offline "
             f"demo data, on {machine()}: {summary['wall_s'] / 60:.1f} minutes in all.", "",
             "The cold start teaches the answer format but not the task (its traces' answers are shuffled "
             "between problems), so what the RL checkpoint gets right beyond it, GRPO learnt from the reward. "
             "The control runs the same GRPO with each response paid another's reward: no signal, no gain.", "",
             "## Held-out set", "",
             f"{settings['data']['n_heldout']} problems never seen in SFT or RL, scored by "
             f"`python -m megatron_vr1.eval` with the same seed for every checkpoint (details in "
             f"`heldout/<run>/<mode>/summary.md`, every response in its `samples.jsonl`; these numbers in "
             f"`{_rel(where.summary, root)}`):", "", *_heldout_rows(summary, ckpts, root, settings), "",
             "## Steps", "", "| # | step | seconds | command |", "| --- | --- | --- | --- |"]
    for i, s in enumerate(steps, 1):
        seconds = f"{done[s.name]['seconds']:.1f}" if s.name in done else "-"
        lines.append(f"| {i} | {s.title} | {seconds} | `{s.shell()}` |")
    sft = read_metrics(where.sft)
    lines += ["", "## Cold-start SFT", "", f"![SFT loss]({_rel(plots['sft'], root)})", "",
              f"{len(sft)} steps; loss {sft[0]['loss']:.4f} at step 1, {sft[-1]['loss']:.4f} at step {sft[-1]['step']}. "
              f"TensorBoard logs of the runs: `tensorboard --logdir {where.out}`.", ""]
    rl, control = read_metrics(where.rl), read_metrics(where.control)
    lines += ["## GRPO with PTST", "", f"![reward, accuracy and response length]({_rel(plots['rl'], root)})", "",
              *_stage_rows(rl), "", "The control (shuffled rewards):", "", *_stage_rows(control), ""]
    verify = done.get("verify", {}).get("output", "").strip()
    lines += ["## Export", "", f"The RL checkpoint as a Hugging Face folder: `{_rel(where.hf_export, root)}` "
              f"(`Qwen2_5_VLForConditionalGeneration.from_pretrained`, or `vllm serve`). Checked against the "
              f"Megatron checkpoint: {verify or 'not checked'}.", ""]
    where.report.write_text("\n".join(lines))
    return where.report
