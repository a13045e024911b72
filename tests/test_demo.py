"""The main job (python -m megatron_vr1.demo) on a shortened config: every step runs through its own
entry point, the plots hold one point per step, the report names the checkpoints it evaluated,
and a second run says what is already done."""

import json
import os
import subprocess
import sys

import pytest

SHORT = ["data.n_sft=8", "data.n_rl=8", "data.n_eval=4", "sft.steps=6", "sft.global_batch_size=4",
         "rl.stages=[{max_response_tokens: 16, group_size: 2, steps: 2}, {max_response_tokens: 24, group_size: 2, steps: 2}]",
         "rl.prompts_per_step=4", "eval.max_new_tokens=16", "eval.batch_size=4", "progress=false"]


def _demo(out, *overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.demo", f"out={out}", *SHORT, *overrides],
                          capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode:
        pytest.fail(f"demo exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, _demo(out)


def test_every_step_runs_and_the_report_names_the_checkpoints(demo):
    out, proc = demo
    for n, title in enumerate(["demo data", "a tiny Hugging Face model", "hf-to-mcore", "cold-start SFT",
                               "GRPO with PTST", "evaluation of the SFT checkpoint", "evaluation of the RL checkpoint",
                               "export to Hugging Face", "the export against the checkpoint"], 1):
        assert f"demo [{n}/9] {title}: done" in proc.stdout, title
    report = (out / "report.md").read_text()
    assert "`sft/iter_0000006`" in report and "`rl/iter_0000004`" in report
    assert "plots/sft_loss.png" in report and "plots/rl.png" in report
    for run in ("sft", "rl"):
        summary = json.loads((out / "eval" / run / "summary.json").read_text())
        assert summary["settings"]["checkpoint"] == str(out / run / f"iter_000000{6 if run == 'sft' else 4}")
        assert summary["benchmarks"]["mathvista"]["overall"]["n"] == 4
        assert any(f.name.startswith("events.out.tfevents") for f in (out / run / "tensorboard").iterdir())
    assert (out / "hf_export" / "config.json").is_file() and list((out / "hf_export").glob("*.safetensors"))
    assert "max |logit difference| =" in report


def test_plots_are_pngs_with_one_point_per_step(demo):
    from PIL import Image

    from megatron_vr1.demo.plots import read_metrics, read_plotted

    out, _ = demo
    for name in ("sft_loss.png", "rl.png"):
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
            img.verify()  # the whole file decodes
    sft = read_metrics(out / "sft")
    lines = read_plotted(out / "plots" / "sft_loss.png")["lines"]
    assert lines["loss/loss"] == {"x": [float(s) for s in range(1, 7)], "y": [m["loss"] for m in sft]}
    rl = read_metrics(out / "rl")
    plotted = read_plotted(out / "plots" / "rl.png")
    assert plotted["stage_boundaries"] == [2.5]  # between stage 1's last step and stage 2's first
    for label, key in [("reward/mean reward", "reward_mean"), ("accuracy/answer right", "accuracy"),
                       ("response tokens/mean length", "response_length_mean"),
                       ("response tokens/stage budget", "max_response_tokens")]:
        assert plotted["lines"][label]["x"] == [1.0, 2.0, 3.0, 4.0], label
        assert plotted["lines"][label]["y"] == pytest.approx([m[key] for m in rl]), label
    assert plotted["lines"]["response tokens/stage budget"]["y"] == [16, 16, 24, 24]


def test_running_again_says_what_is_done_and_other_settings_are_refused(demo):
    out, _ = demo
    before = (out / "demo_state.json").read_text()
    again = _demo(out)
    assert "already done" in again.stdout and "sft, rl, eval_sft, eval_rl, export, verify" in again.stdout
    assert "demo [" not in again.stdout  # no step ran again
    assert json.loads((out / "demo_state.json").read_text())["steps"] == json.loads(before)["steps"]
    other = _demo(out, "sft.lr=1e-3", check=False)
    assert other.returncode == 2
    assert "other settings (sft differ)" in other.stderr and "Traceback" not in other.stderr


def test_demo_eval_records_score_their_own_answers():
    """The demo's eval records are MathVista-shaped: the answer written in the SFT traces' way is
    right for every kind, and a wrong one is not (multiple choice by letter and by text)."""
    import tempfile
    from pathlib import Path

    from megatron_vr1.data.demo import ALL_KINDS, generate
    from megatron_vr1.eval import extract_answer, is_correct

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, n_sft=0, n_rl=0, n_eval=20, seed=4, kinds=ALL_KINDS)
        records = [json.loads(line) for line in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == set(ALL_KINDS)
    for r in records:
        right = f"<think> ... </think><answer> Final Answer: {r['answer']} </answer>"
        assert is_correct(extract_answer(right), r), r
        if not r["choices"]:
            assert not is_correct("purple" if r["answer_type"] == "text" else "-7", r), r
        else:
            letter = "ABCD"[r["choices"].index(r["answer"])]
            assert is_correct(letter, r) and is_correct(f"({letter}) {r['answer']}", r), r
            wrong = next(c for c in r["choices"] if c != r["answer"])
            assert not is_correct(wrong, r), r
        assert r["metadata"]["task"] and r["metadata"]["skills"]
