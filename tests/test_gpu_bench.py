"""tools/gpu_bench.sh's dry mode: every part of the GPU bench runs at toy sizes on the CPU and
the report holds a row for each, with the planner's estimate for the measured runs' settings."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_every_part_on_a_cpu_in_dry_mode(tmp_path):
    env = dict(os.environ, DRY="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the loss bench chooses the interpreter itself on a CPU
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_bench.sh"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = (tmp_path / "parts.txt").read_text()
    for part in ("env", "loss", "sft_local", "sft_fused", "rollout", "refit", "grpo"):
        assert f"gpu_bench: {part}: rc 0" in parts, parts
        assert (tmp_path / f"{part}.json").is_file(), part
    table = (tmp_path / "results.md").read_text()
    assert "CPU dry run (plumbing only, no GPU figure)" in table
    for figure in ("| loss | 32 tokens, ours (ms) |", "| sft | toy step, local spec: MFU |",
                   "| sft | toy step, fused spec: step (s) / tokens/s |", "| rollout | toy, continuous |",
                   "| rollout | toy, static |", "| refit | toy (0.0 GB) into the hf engine |",
                   "| plan | toy SFT step: measured / planned peak (GiB) | n/a (a CPU) / ",
                   "| plan | toy GRPO step: measured / planned peak (GiB) | n/a (a CPU) / "):
        assert figure in table, figure
    assert "Missed" not in table


def test_a_missing_part_is_reported_and_fails(tmp_path):
    env = dict(os.environ, DRY="1", PYTHON=sys.executable, PARTS="env")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_bench.sh"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "- part loss did not finish" in (tmp_path / "results.md").read_text()
