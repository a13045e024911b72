"""The results of ``tools/gpu_bench.sh``, as one Markdown table with its targets checked.

    python tools/gpu_bench_report.py OUT        # reads OUT/*.json, writes OUT/results.md

Each part of the bench writes one JSON file; a part that did not finish (a time limit, an error)
is a row that says so. The targets (issue 28's Part 2):

- loss kernel: faster than Liger-Kernel's ``triton_grpo_loss`` at every size where Liger runs,
  at least 75% of HBM bandwidth at 16K and 64K tokens, no more peak memory than the logits'
  size with the in-place gradient;
- 3B SFT step: MFU at least 40% (45% is the compass), no host-device syncs in the step;
- planner: the measured peak of the SFT step and of a GRPO step within 15% of the planner's
  estimate for the same settings (its reserve for the CUDA context and fragmentation left out:
  ``max_memory_allocated`` does not see those).

Exit status: 1 when a part is missing or, on a GPU, a target is missed; 0 otherwise. A CPU run
(``DRY=1``) checks the plumbing only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PARTS = ("env", "loss", "sft_local", "sft_fused", "rollout", "refit", "grpo")


def _load(out: Path, part: str) -> dict | None:
    path = out / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def planned_peak_gb(overrides: list[str], gpu_memory_gb: float | None) -> float | None:
    """The planner's peak for a trainer's overrides, less its reserve (GiB, stage 0: one GPU)."""
    from megatron_vr1.planning.cli import compose_trainer_config
    from megatron_vr1.planning.memory import GiB, plan
    from megatron_vr1.planning.report import settings_from_conf

    extra = ["gpus=1"] + ([f"gpu_memory_gb={gpu_memory_gb}"] if gpu_memory_gb else [])
    cfg, _ = compose_trainer_config([o for o in overrides if not o.startswith(("checkpoint.", "metrics."))] + extra)
    args, layout, settings = settings_from_conf(cfg)
    stage = plan(args, layout, settings).stages[0]
    return (stage.peak - stage.bytes.get("reserve", 0.0)) / GiB


def report(out: Path) -> tuple[list[str], list[str]]:
    """(Markdown lines, missed targets)."""
    found = {p: _load(out, p) for p in PARTS}
    env = found["env"] or {}
    gpu = bool(env.get("gpu"))
    missed = [f"part {p} did not finish" for p, v in found.items() if v is None]
    lines = [f"# GPU bench: {env.get('gpu') or 'CPU dry run (plumbing only, no GPU figure)'}", "",
             f"driver {env.get('driver', '-')}, torch {env.get('torch', '-')}, triton {env.get('triton', '-')}, "
             f"megatron-core {env.get('megatron_core', '-')}, liger-kernel {env.get('liger_kernel', 'not installed')}",
             "", "| part | figure | value | target | met |", "| --- | --- | --- | --- | --- |"]

    def row(part: str, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        met = "-" if ok is None or not gpu else ("yes" if ok else "NO")
        if ok is False and gpu:
            missed.append(f"{part}: {figure} {value} (target {target})")
        lines.append(f"| {part} | {figure} | {value} | {target} | {met} |")

    if found["loss"]:
        rows = [r for r in found["loss"]["rows"] if "ms" in r]
        by = {(r["tokens"], r["implementation"]): r for r in rows}
        for t in sorted({r["tokens"] for r in rows}):
            ours = by.get((t, "triton (ours, in-place grad)")) or by.get((t, "triton (ours)"))
            liger = by.get((t, "liger triton_grpo_loss (in-place)"))
            compiled = by.get((t, "torch.compile"))
            if ours is None:
                continue
            row("loss", f"{t} tokens, ours (ms)", f"{ours['ms']:.2f}")
            if liger:
                row("loss", f"{t} tokens, Liger (ms)", f"{liger['ms']:.2f}", "ours faster", ours["ms"] < liger["ms"])
            if compiled:
                row("loss", f"{t} tokens, torch.compile (ms)", f"{compiled['ms']:.2f}")
            if ours.get("bandwidth_fraction") is not None:
                row("loss", f"{t} tokens, share of HBM bandwidth", f"{ours['bandwidth_fraction']:.0%}",
                    ">= 75%" if t >= 16384 else "", ours["bandwidth_fraction"] >= 0.75 if t >= 16384 else None)
            logits_gib = t * found["loss"]["vocab"] * 2 / 2**30
            row("loss", f"{t} tokens, peak extra memory (GiB), in-place", f"{ours['peak_extra_gib']:.2f}",
                f"<= logits ({logits_gib:.2f})", ours["peak_extra_gib"] <= logits_gib * 1.05)
    for part, name in (("sft_local", "local spec"), ("sft_fused", "fused spec")):
        r = found[part]
        if not r:
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        name = f"{r['model']} step, {name}"
        row("sft", f"{name}: MFU", mfu, ">= 40%", r.get("mfu") is not None and r["mfu"] >= 0.40)
        row("sft", f"{name}: step (s) / tokens/s", f"{r['time_step']:.2f} / {r['tokens_per_s']:.0f}")
        if r.get("profile_seconds"):
            total = sum(r["profile_seconds"].values()) or 1.0
            split = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(r["profile_seconds"].items(), key=lambda kv: -kv[1]))
            row("sft", f"{name}: device time", split or "none recorded")
        if r.get("host_syncs") is not None:
            row("sft", f"{name}: host-device syncs", str(r["host_syncs"]), "0", r["host_syncs"] == 0)
    if found["rollout"]:
        for r in found["rollout"]["rows"]:
            util = f", slot utilisation {r['slot_utilisation']:.2f}" if r.get("slot_utilisation") is not None else ""
            row("rollout", f"{found['rollout']['model']}, {r['engine']}", f"{r['tokens_per_s']:.0f} tokens/s{util}")
        row("rollout", "CUDA graphs", "not built yet: no on/off figure")
    if found["refit"]:
        r = found["refit"]
        row("refit", f"{r['model']} ({r['weights_gb']:.1f} GB) into the hf engine", f"{r['seconds']:.2f} s")
    tests = out / "tests.txt"
    if tests.is_file():
        summary = [line for line in tests.read_text().splitlines() if " passed" in line or " failed" in line]
        row("tests", "kernel and GPU tests, compiled", summary[-1].strip("= ") if summary else "did not finish",
            "all pass", bool(summary) and "failed" not in summary[-1] and "error" not in summary[-1])
    for part, label in (("sft_local", "SFT step"), ("grpo", "GRPO step")):
        r = found[part]
        if not r:
            continue
        estimate = planned_peak_gb(r["trainer_overrides"], env.get("memory_gb"))
        if r.get("memory_peak_gb") is None:
            row("plan", f"{r['model']} {label}: measured / planned peak (GiB)", f"n/a (a CPU) / {estimate:.2f}")
            continue
        off = r["memory_peak_gb"] / estimate - 1
        row("plan", f"{r['model']} {label}: measured / planned peak (GiB)", f"{r['memory_peak_gb']:.1f} / {estimate:.1f} "
            f"({off:+.0%})", "within 15%", abs(off) <= 0.15)
    return lines, missed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    lines, missed = report(out)
    if missed:
        lines += ["", "Missed:", *[f"- {m}" for m in missed]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
