"""GRPO with PTST (python -m megatron_vr1.rl) on CPU: layout equivalence (with two PPO epochs, each
on its own mini-batch split), engines, resume after SIGKILL, the run without a reference model,
bad input. That GRPO learns, on held-out prompts beside a shuffled-reward control, is
tests/test_demo.py's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RTOL = 1e-5


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _command(module: str, nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
            *overrides]


def launch(module: str, run_dir: Path, nproc: int, *overrides: str, check: bool = True):
    proc = subprocess.run(_command(module, nproc, [f"checkpoint.dir={run_dir}", *overrides]), env=_env(),
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        pytest.fail(f"{module} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return lines


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory, toy_tokenizer_dir):
    """The demo generator's colour task, and a short cold-start SFT on it (40 steps: the toy model
    learns most of the format and a little of the task; its sampled reward starts near 0.3)."""
    from megatron_vr1.data.demo import generate

    root = tmp_path_factory.mktemp("colour")
    generate(root / "data", n_sft=48, n_rl=64, n_eval=0, seed=1, kinds=("colour",))
    launch("megatron_vr1.sft", root / "sft", 1, f"data.train={root / 'data' / 'sft.json'}",
           f"tokenizer={toy_tokenizer_dir}", "data.system_prompt=null", "train.steps=40",
           "train.global_batch_size=8", "train.micro_batch_tokens=1024", "data.max_tokens=1024", "train.lr=5e-3",
           "train.lr_schedule=constant", "train.adam_beta2=0.95", "data.num_workers=0", "checkpoint.every=40",
           "metrics.tensorboard=false")
    return root, root / "sft" / "iter_0000040"


def rl_args(root: Path, init: Path, tokenizer: Path, stages: str, *extra: str) -> list[str]:
    return [f"data.train={root / 'data' / 'rl.jsonl'}", f"tokenizer={tokenizer}", f"init_from={init}",
            f"rl.stages={stages}", "rl.rollout.prompts_per_step=16", "rl.mini_batches=2", "rl.ppo_epochs=2",
            "rl.micro_batch_tokens=512", "data.max_prompt_tokens=128", "train.lr=3e-4", "data.num_workers=0",
            "rl.reward.workers=1", "metrics.tensorboard=false", *extra]


SHORT = "[{max_response_tokens: 32, group_size: 4, steps: 2}, {max_response_tokens: 48, group_size: 2, steps: 2}]"


LAYOUTS = {"tp1": (1, []), "tp2": (2, ["model.parallel.tensor_parallel=2", "model.parallel.sequence_parallel=true"]),
           "pp2": (2, ["model.parallel.pipeline_parallel=2"])}


@pytest.fixture(scope="session")
def rl_references(tmp_path_factory, colour_task, toy_tokenizer_dir):
    root, init = colour_task
    out = tmp_path_factory.mktemp("rl_layouts")
    for name, (nproc, extra) in LAYOUTS.items():
        launch("megatron_vr1.rl", out / name, nproc,
               *rl_args(root, init, toy_tokenizer_dir, SHORT, "checkpoint.every=2", *extra))
    return {name: out / name for name in LAYOUTS}




def test_tp2_and_pp2_give_the_single_process_losses_and_rewards(rl_references):
    base = metrics(rl_references["tp1"])
    assert [x["stage"] for x in base] == [1, 1, 2, 2]
    for name in ("tp2", "pp2"):
        got = metrics(rl_references[name])
        assert [x["reward_mean"] for x in got] == [x["reward_mean"] for x in base], name
        assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in base], rel=RTOL, abs=1e-7), name
        assert [x["response_length_mean"] for x in got] == [x["response_length_mean"] for x in base], name
        for key in ("kl", "entropy", "clip_frac"):
            assert [x[key] for x in got] == pytest.approx([x[key] for x in base], rel=1e-4, abs=1e-7), (name, key)
    for run in rl_references.values():  # the engine/trainer gap is measured on every step, at rounding level
        assert all(x["rollout_logprob_diff_max"] < 1e-4 and "rollout_weight_mean" not in x for x in metrics(run))


def test_context_parallelism_gives_the_single_process_grpo_step(tmp_path, rl_references, colour_task,
                                                              toy_tokenizer_dir):
    """CP=2: each rank holds half of every sequence (padded for the split), the hf engine's
    rollouts are shared from the replica's first rank, and the loss is the whole batch's: the
    first step of the single-process run (one step keeps the suite short; the SFT runs four).
    Sequence-level rollout correction sums each response over both ranks' halves: at fp32 its
    weights are 1 and leave the step as it was."""
    root, init = colour_task
    one_step = "[{max_response_tokens: 32, group_size: 4, steps: 1}]"
    launch("megatron_vr1.rl", tmp_path / "cp2", 2, *rl_args(root, init, toy_tokenizer_dir, one_step,
                                                            "model.parallel.context_parallel=2",
                                                            "rl.loss.rollout_correction=sequence-tis"))
    (got,), want = metrics(tmp_path / "cp2"), metrics(rl_references["tp1"])[0]
    for key in ("reward_mean", "response_length_mean", "tokens"):
        assert got[key] == want[key], key
    for key in ("loss", "kl", "entropy", "clip_frac"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
    assert got["rollout_logprob_diff_max"] < 1e-4 and got["rollout_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_two_nodes_through_the_launch_script_give_the_single_node_grpo_step(tmp_path, rl_references, colour_task,
                                                                           toy_tokenizer_dir):
    """One GRPO step at TP=2 over two "nodes" of one process (tools/launch/torchrun.sh, loopback):
    the first step of the single-node two-process run."""
    from multinode import launch_two_nodes

    root, init = colour_task
    run_dir = tmp_path / "two_nodes"
    one_step = "[{max_response_tokens: 32, group_size: 4, steps: 1}]"
    outputs = launch_two_nodes("megatron_vr1.rl", [f"checkpoint.dir={run_dir}", *rl_args(
        root, init, toy_tokenizer_dir, one_step, *LAYOUTS["tp2"][1])], cwd=tmp_path)
    assert "GRPO on 2 GPUs: TP=2" in outputs[0] and "verdict: fits" in outputs[0]
    got, want = metrics(run_dir), metrics(rl_references["tp2"])[:1]
    assert len(got) == 1
    for key in ("reward_mean", "loss", "response_length_mean", "kl", "entropy"):
        assert got[0][key] == want[0][key], key


def test_megatron_engine_runs_grpo_like_the_hf_engine(tmp_path, colour_task, toy_tokenizer_dir):
    """Greedy rollouts (temperature 0): GRPO with rl.engine=megatron, generating with the TP=2
    (sequence-parallel) policy itself or with a TP=1 copy refit from it after every update, gives
    the per-step rewards and losses of the single-process run with rl.engine=hf. (Greedy groups
    are all alike, so their advantages are 0: the rollout tokens carry the comparison, through the
    lengths, rewards and the policy's entropy on them.)"""
    root, init = colour_task
    greedy = ("checkpoint.every=100", "rl.rollout.temperature=0")
    tp2 = ("model.parallel.tensor_parallel=2", "model.parallel.sequence_parallel=true", "rl.engine=megatron")
    runs = {"hf": (1, ()), "megatron": (2, tp2), "megatron-copy": (2, (*tp2, "+rl.engine_options.tensor_parallel=1"))}
    # one update per step: with every advantage 0, each Adam step turns rounding-level gradients,
    # which differ between TP=1 and TP=2, into full-size steps; four per step drift too far apart
    two_steps = "[{max_response_tokens: 32, group_size: 4, steps: 1}, {max_response_tokens: 48, group_size: 2, steps: 1}]"
    one_update = [a for a in rl_args(root, init, toy_tokenizer_dir, two_steps, *greedy)
                  if not a.startswith(("rl.mini_batches=", "rl.ppo_epochs="))] + ["rl.mini_batches=1"]
    for name, (nproc, extra) in runs.items():
        launch("megatron_vr1.rl", tmp_path / name, nproc, *one_update, *extra)
    base = metrics(tmp_path / "hf")
    assert all(x["entropy"] > 0 and x["response_length_mean"] > 5 for x in base)
    for name in ("megatron", "megatron-copy"):
        got = metrics(tmp_path / name)
        for key in ("reward_mean", "format_rate", "accuracy", "response_length_mean", "truncated_frac"):
            assert [x[key] for x in got] == [x[key] for x in base], (name, key)
        for key, rel in (("loss", RTOL), ("entropy", 1e-4)):  # TP=2 sums in another order
            assert [x[key] for x in got] == pytest.approx([x[key] for x in base], rel=rel, abs=1e-7), (name, key)
        # with every advantage 0 the policy only drifts (Adam scales rounding-level gradients up to
        # full steps), so the KL stays at rounding level in both runs
        assert max(abs(x["kl"]) for x in got + base) < 1e-4, name
        assert max(x["rollout_logprob_diff_max"] for x in got) < 1e-4, name


def kill_after_first_checkpoint(run_dir: Path, args: list[str]) -> None:
    """Start the RL run and SIGKILL it once step 1's checkpoint is complete (during step 2)."""
    proc = subprocess.Popen(_command("megatron_vr1.rl", 1, [f"checkpoint.dir={run_dir}", *args]), env=_env(),
                            cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "iter_0000001" / "megatron_vr1.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_mid_stage(tmp_path, rl_references, colour_task, toy_tokenizer_dir):
    """Killed during step 2 (mid stage 1) once step 1's checkpoint is in, then resumed: the same
    metrics afterwards as the uninterrupted run."""
    root, init = colour_task
    run_dir = tmp_path / "run"
    args = rl_args(root, init, toy_tokenizer_dir, SHORT, "checkpoint.every=1")
    kill_after_first_checkpoint(run_dir, args)
    assert not (run_dir / "iter_0000002").exists()
    launch("megatron_vr1.rl", run_dir, 1, *args)
    keys = ("stage", "reward_mean", "loss", "response_length_mean", "kl", "entropy", "grad_norm")
    want = [{k: x[k] for k in keys} for x in metrics(rl_references["tp1"])]
    got = [{k: x[k] for k in keys} for x in metrics(run_dir)]
    assert [g["stage"] for g in got] == [1, 1, 2, 2]
    for a, b in zip(got, want):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-9), (k, got, want)


def test_dapo_recipe_resumes_after_sigkill_with_the_uninterrupted_data_order(tmp_path, colour_task,
                                                                            toy_tokenizer_dir):
    """rl=dapo (dynamic sampling, overlong shaping, clip-higher, no KL) and mask_truncated, killed
    during step 2 once step 1's checkpoint is in, then resumed: every step's metrics, the rounds of
    sampling and the groups kept among them, equal the uninterrupted run's; each step keeps the
    target's number of mixed-reward groups (16 prompts per step) when its rounds find them."""
    root, init = colour_task
    steps = "[{max_response_tokens: 32, group_size: 4, steps: 3}]"
    args = rl_args(root, init, toy_tokenizer_dir, steps, "checkpoint.every=1", "rl=dapo",
                   "rl.reward.overlong_buffer=8", "rl.loss.mask_truncated=true")
    launch("megatron_vr1.rl", tmp_path / "whole", 1, *args)
    run_dir = tmp_path / "resumed"
    kill_after_first_checkpoint(run_dir, args)
    launch("megatron_vr1.rl", run_dir, 1, *args)
    keys = ("reward_mean", "loss", "dynamic_sampling_rounds", "groups_kept", "groups_generated", "groups_dropped",
            "overlong_penalized", "truncated_masked", "response_length_mean", "grad_norm")
    whole, resumed = metrics(tmp_path / "whole"), metrics(run_dir)
    for a, b in zip(whole, resumed):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=1e-9), (k, whole, resumed)
    for m in whole:
        assert "kl" not in m and m["groups_generated"] >= m["groups_kept"]
        assert m["groups_kept"] == 16 or m["dynamic_sampling_rounds"] == 4, m
        assert m["groups_dropped"] == m["groups_generated"] - m["groups_kept"], m
    assert sum(m["dynamic_sampling_rounds"] for m in whole) > 3  # some step needed a second round
    assert sum(m["overlong_penalized"] for m in whole) > 0


def test_without_a_reference_there_is_no_kl(tmp_path, colour_task, toy_tokenizer_dir):
    """kl_beta=0: no reference model, so no KL in the metrics (not a 0); the scoring time-outs are
    counted per step (none here). With token-level rollout correction the engine/trainer gap is
    recorded, and at fp32 on the CPU it is at rounding level (weights 1)."""
    root, init = colour_task
    run_dir = tmp_path / "run"
    one_step = "[{max_response_tokens: 32, group_size: 2, steps: 1}]"
    launch("megatron_vr1.rl", run_dir, 1, *rl_args(root, init, toy_tokenizer_dir, one_step), "rl.loss.kl_beta=0",
           "rl.loss.rollout_correction=token-tis")
    (m,) = metrics(run_dir)
    assert "kl" not in m and "entropy" in m and "time_ref_logprobs" not in m
    assert m["reward_timeouts"] == 0 and m["format_rate"] > 0
    assert 0 <= m["rollout_logprob_diff_mean"] <= m["rollout_logprob_diff_max"] < 1e-4, m
    assert abs(m["rollout_kl"]) < 1e-8 and m["rollout_weight_mean"] == pytest.approx(1.0, abs=1e-4), m


@pytest.mark.parametrize("overrides, message", [
    (["rl.micro_batch_tokens=64"], "must hold a prompt and a full response"),
    (["rl.loss.kl_maximum=5"], r"rl.loss.kl_maximum is not an option of conf/grpo.yaml .*rl.loss has .*kl_max"),
    (["+rl.reward.shufle=true"], r"rl.reward.shufle is not an option of conf/grpo.yaml .*rl.reward has .*shuffle"),
    (["rl.loss.kl_max=0"], r"rl.loss.kl_max must be > 0 \(or null for no bound\), got 0"),
    (["rl.engine=sglang"], "rl.engine must be hf, megatron or vllm"),
    (["rl.stages=[{max_response_tokens: 8, steps: 1}]"], r"rl.stages\[0\] needs group_size"),
    (["rl.engine=megatron", "model.parallel.context_parallel=2"], r"context_parallel=2 use rl.engine=hf"),
    (["rl.loss.rollout_correction=tis"], r"rl.loss.rollout_correction must be null, token-tis, sequence-tis"),
], ids=["micro-batch-too-small", "unknown-loss-option", "unknown-reward-option-added", "kl-max-zero", "unknown-engine",
        "stage-missing-key", "engine-under-context-parallelism", "unknown-rollout-correction"])
def test_bad_rl_input_is_one_clear_line(tmp_path, colour_task, toy_tokenizer_dir, overrides, message):
    import re

    root, init = colour_task
    args = [a for a in rl_args(root, init, toy_tokenizer_dir, SHORT, "checkpoint.every=100")
            if not any(a.split("=")[0] == o.split("=")[0] for o in overrides)]
    proc = launch("megatron_vr1.rl", tmp_path / "run", 1, *args, *overrides, check=False)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len([x for x in proc.stderr.splitlines() if "error:" in x]) == 1
