"""Cold-start SFT (python -m megatron_vr1.sft) on CPU: learning, layout equivalence, resume after
SIGKILL, export to transformers, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny import hf_logits

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from megatron_vr1.data.demo import generate

    out = tmp_path_factory.mktemp("demo")
    generate(out, n_sft=12, n_rl=0, n_eval=0, seed=5)
    return out


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory, model_parallel_1):
    """A random toy Qwen2.5-VL in transformers, converted: every run starts from the same weights."""
    from omegaconf import OmegaConf
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.checkpoint import hf_to_mcore
    from megatron_vr1.config import load_model_conf

    out = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(**OmegaConf.to_container(load_model_conf("toy").hf_config))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out / "hf")
    hf_to_mcore(out / "hf", out / "mcore", dtype="fp32")
    return out / "mcore"


def _command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_vr1.sft", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "megatron_vr1.sft", *overrides]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def sft(run_dir: Path, nproc: int, *overrides: str, check: bool = True, cwd: Path | None = None):
    proc = subprocess.run(_command(nproc, [f"checkpoint.dir={run_dir}", *overrides]), env=_env(), cwd=cwd or run_dir.parent,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        pytest.fail(f"sft exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return [m["loss"] for m in lines]


def common(demo: Path, init: Path, *extra: str) -> list[str]:
    """Four steps of 8 samples in micro-batches of at most 512 tokens: several per rank and step."""
    return [f"data.train={demo / 'sft.json'}", f"tokenizer={demo.parent / 'tokenizer'}", f"init_from={init}",
            "train.steps=4", "train.global_batch_size=8", "train.micro_batch_tokens=512", "data.max_tokens=512",
            "train.lr=1e-3", "train.warmup_ratio=0.25", "data.num_workers=0", "checkpoint.every=2",
            "metrics.tensorboard=false", *extra]


@pytest.fixture(scope="session")
def demo_with_tokenizer(demo, toy_tokenizer_dir):
    (demo.parent / "tokenizer").symlink_to(toy_tokenizer_dir, target_is_directory=True)
    return demo


LAYOUTS = {"tp1": (1, []), "tp2": (2, ["model.parallel.tensor_parallel=2", "model.parallel.sequence_parallel=true"]),
           "pp2": (2, ["model.parallel.pipeline_parallel=2"]), "dp2": (2, []),
           "cp2": (2, ["model.parallel.context_parallel=2"])}


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, demo_with_tokenizer, init_ckpt):
    root = tmp_path_factory.mktemp("layouts")
    runs = {}
    for name, (nproc, extra) in LAYOUTS.items():
        sft(root / name, nproc, *common(demo_with_tokenizer, init_ckpt, *extra))
        runs[name] = root / name
    return runs


def test_two_nodes_through_the_launch_script_train_like_one_node(tmp_path, reference_runs, demo_with_tokenizer,
                                                               init_ckpt):
    """tools/launch/torchrun.sh on two "nodes" of one process (loopback, gloo), TP=2 across them:
    it prints the layout and the planner's verdict, and the losses are the single-node
    two-process run's."""
    from multinode import launch_two_nodes

    run_dir = tmp_path / "two_nodes"
    outputs = launch_two_nodes("megatron_vr1.sft", [f"checkpoint.dir={run_dir}", *common(
        demo_with_tokenizer, init_ckpt, *LAYOUTS["tp2"][1])], cwd=tmp_path)
    assert "launch: node 1 of 2, 1 processes per node (2 in all)" in outputs[1]
    assert "TP=2 x CP=1 x PP=1 x DP=1" in outputs[0] and "verdict: fits" in outputs[0]
    assert losses(run_dir) == losses(reference_runs["tp2"])


def test_the_launch_script_refuses_a_world_size_the_layout_does_not_fit(tmp_path, demo_with_tokenizer, init_ckpt):
    from multinode import launch_refused

    proc = launch_refused("megatron_vr1.sft", common(demo_with_tokenizer, init_ckpt, *LAYOUTS["tp2"][1]),
                          tmp_path, nnodes=1, per_node=3)
    assert proc.returncode == 2 and "use a multiple of 2" in proc.stderr and "launch: refused" in proc.stderr
    big = launch_refused("megatron_vr1.sft", ["recipe=sft_72b", "train.recompute=none", "data.train=x"], tmp_path,
                         nnodes=1, per_node=32)
    assert big.returncode == 1 and "does NOT fit" in big.stdout and "PLAN_CHECK=0" in big.stderr


def test_losses_are_the_same_at_every_layout(reference_runs):
    """Same seed, data and initial weights: TP=2 with sequence parallelism, PP=2, DP=2 and CP=2
    (each with several micro-batches per step) train exactly like one process."""
    base = losses(reference_runs["tp1"])
    assert len(base) == 4 and base[-1] < base[0]
    for name in ("tp2", "pp2", "dp2", "cp2"):
        assert losses(reference_runs[name]) == pytest.approx(base, rel=RTOL), name
    for name in LAYOUTS:  # records are counted once per replica, whatever its layout
        metrics = [json.loads(line) for line in (reference_runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert sum(m["samples"] for m in metrics) == 32, name
        assert [m["loss_tokens"] for m in metrics] == [
            json.loads(line)["loss_tokens"] for line in (reference_runs["tp1"] / "metrics.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (reference_runs["dp2"] / "metrics.jsonl").read_text().splitlines()]
    for key in ("grad_norm", "lr", "loss_tokens", "tokens_per_s", "time_data", "time_forward_backward",
                "time_optimizer"):
        assert all(key in m for m in metrics), key
    # one warmup step (warmup_ratio 0.25 of 4): the first step learns at half the rate, not at 0
    assert [m["lr"] for m in metrics[:2]] == pytest.approx([5e-4, 1e-3])


def test_a_context_parallel_run_resumes_from_its_checkpoint(tmp_path, reference_runs, demo_with_tokenizer, init_ckpt):
    """CP=2 shards the distributed optimizer over data- and context-parallel ranks: resumed from
    its step-2 checkpoint, it trains steps 3 and 4 as the uninterrupted run did."""
    import shutil

    run_dir = tmp_path / "cp2"
    run_dir.mkdir()
    shutil.copytree(reference_runs["cp2"] / "iter_0000002", run_dir / "iter_0000002")
    (run_dir / "metrics.jsonl").write_text("".join(
        (reference_runs["cp2"] / "metrics.jsonl").read_text().splitlines(keepends=True)[:2]))
    sft(run_dir, 2, *common(demo_with_tokenizer, init_ckpt, *LAYOUTS["cp2"][1]))
    assert losses(run_dir) == pytest.approx(losses(reference_runs["cp2"]), rel=RTOL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment to kill it:\n"
                        f"{proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the moment to kill the run")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_resume_after_sigkill_in_a_step_and_in_a_save(tmp_path, reference_runs, demo_with_tokenizer, init_ckpt,
                                                      layout):
    nproc, extra = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    command = _command(nproc, [f"checkpoint.dir={run_dir}", *common(demo_with_tokenizer, init_ckpt, *extra)])

    def start(**env):
        return subprocess.Popen(command, env=dict(_env(), **env), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    # killed during step 3, once the checkpoint of step 2 is complete
    _kill_when(start(), lambda: (run_dir / "iter_0000002" / "megatron_vr1.json").exists())
    # resumed from step 2, killed while it writes the checkpoint of step 4 (held before its final
    # rename, so that the kill lands inside the save however loaded the machine is)
    _kill_when(start(MEGATRON_VR1_PAUSE_BEFORE_RENAME="120"),
               lambda: any(run_dir.glob(".iter_0000004.incomplete-*")))
    assert not (run_dir / "iter_0000004").exists()  # the half-written checkpoint never took the name
    sft(run_dir, nproc, *common(demo_with_tokenizer, init_ckpt, *extra))  # resumes from step 2 again
    assert losses(run_dir) == pytest.approx(losses(reference_runs[layout]), rel=RTOL)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("iter", ".iter"))) == \
        ["iter_0000002", "iter_0000004"]


def test_sft_checkpoint_exports_and_loads_in_transformers(tmp_path, reference_runs, model_parallel_1):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.checkpoint import load_model
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.models.qwen2_5_vl import build_model
    from tiny import make_case

    ckpt = reference_runs["tp2"] / "iter_0000004"  # written at TP=2 with the optimizer beside the model
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "mcore-to-hf", "--mcore", str(ckpt),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()  # from hf_assets
    args, layout = model_from_conf(load_model_conf("toy"))
    ours = build_model(args, layout, backend="local").eval()
    load_model(ours, ckpt)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    batch = make_case("two_images")
    batch["input_ids"] = torch.where(batch["input_ids"] == 245, args.image_token_id, batch["input_ids"])
    with torch.no_grad():
        mine = ours(**batch)[..., : args.vocab_size]
    theirs = hf_logits(hf, batch, image_token=args.image_token_id)
    assert (mine - theirs).abs().max().item() <= 1e-4


def _greedy(model, args, sample, max_new: int, stop: int) -> list[int]:
    ids = sample.input_ids.tolist()
    start = len(ids)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=sample.pixel_values,
                           image_grid_thw=sample.image_grid_thw)
            ids.append(int(logits[0, -1, : args.vocab_size].argmax()))
            if ids[-1] == stop:
                break
    return ids[start:]


def test_sft_learns_the_reasoning_format(tmp_path, toy_tokenizer_dir, init_ckpt, model_parallel_1):
    """60 steps on four demo problems: the loss falls far below its start, and greedy decoding of
    the training prompts writes <think> ... </think><answer> ... </answer>."""
    from megatron_vr1.checkpoint import load_model
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import load_image, load_tokenizer, build_sample, process_images
    from megatron_vr1.data.demo import generate
    from megatron_vr1.data.formats import sft_messages
    from megatron_vr1.models.qwen2_5_vl import build_model

    generate(tmp_path / "demo", n_sft=4, n_rl=0, n_eval=0, seed=0)
    run_dir = tmp_path / "run"
    sft(run_dir, 1, f"data.train={tmp_path / 'demo' / 'sft.json'}", f"tokenizer={toy_tokenizer_dir}",
        f"init_from={init_ckpt}", "train.steps=60", "train.global_batch_size=4", "train.micro_batch_tokens=2048",
        "data.max_tokens=1024", "train.lr=5e-3", "train.lr_schedule=constant", "train.adam_beta2=0.95",
        "data.num_workers=0", "checkpoint.every=60", "metrics.tensorboard=false")
    curve = losses(run_dir)
    assert sum(curve[-5:]) / 5 < 0.25 * curve[0], curve
    args, layout = model_from_conf(load_model_conf("toy"))
    model = build_model(args, layout, backend="local").eval()
    load_model(model, run_dir / "iter_0000060")
    tok = load_tokenizer(toy_tokenizer_dir)
    formatted = 0
    for record in json.loads((tmp_path / "demo" / "sft.json").read_text()):
        messages, paths = sft_messages(record)
        pixels, grid = process_images([load_image(p, tmp_path / "demo") for p in paths])
        prompt = build_sample(tok, args, messages[:1], pixels, grid, add_generation_prompt=True)
        text = tok.decode(_greedy(model, args, prompt, 100, tok.convert_tokens_to_ids("<|im_end|>")))
        a, b, c = (text.find(tag) for tag in ("<think>", "</think>", "<answer>"))
        formatted += 0 <= a < b < c
    assert formatted >= 3, formatted


@pytest.mark.parametrize("overrides, nproc, message", [
    (["train.nonsense=3"], 1, "nonsense"),
    (["model.parallel.tensor_parallel=2"], 1, r"world size 1 is not divisible by tensor_parallel \(2\)"),
    (["init_from={other}"], 1, "holds another model than this one"),
    (["data.max_tokens=64", "train.micro_batch_tokens=64"], 1, r"sft.json\[\d+\].* exceeds max_tokens=64"),
    (["init_from={hf}"], 1, r"init_from=.*/hf is a Hugging Face folder: convert it first \(tools/convert.py hf-to-mcore"),
    (["init_from={missing}"], 1, r"init_from=.*/missing does not exist"),
    (["model=tiny"], 1, r"tokenizer in .* gives <\|image_pad\|> the id 502, but the model's config has image_token_id "
                        r"151655"),
], ids=["unknown-key", "layout-vs-world", "other-model", "too-long", "hf-folder-as-init", "missing-init",
        "tokenizer-of-another-model"])
def test_bad_input_is_one_clear_line(tmp_path, demo_with_tokenizer, init_ckpt, overrides, nproc, message):
    import re

    other = tmp_path / "other"
    if any("{other}" in o for o in overrides):
        _other_model(other)
    overrides = [o.format(other=other, hf=init_ckpt.parent / "hf", missing=tmp_path / "missing") for o in overrides]
    args = [a for a in common(demo_with_tokenizer, init_ckpt) if not any(a.split("=")[0] == o.split("=")[0]
                                                                          for o in overrides)]
    proc = sft(tmp_path / "run", nproc, *args, *overrides, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if message != "nonsense":  # Hydra words its own errors; ours are one line
        assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1, proc.stderr[-3000:]


def test_a_run_directory_as_init_from_takes_its_newest_checkpoint(tmp_path, reference_runs, demo_with_tokenizer,
                                                                 init_ckpt):
    args = [a for a in common(demo_with_tokenizer, init_ckpt, "train.steps=1") if not a.startswith("init_from=")]
    proc = sft(tmp_path / "run", 1, *args, f"init_from={reference_runs['tp1']}")
    assert (f"init_from={reference_runs['tp1']}: a run directory; taking its newest complete checkpoint, "
            f"iter_0000004") in proc.stdout
    assert f"from {reference_runs['tp1'] / 'iter_0000004'}" in proc.stdout
    console = (tmp_path / "run" / "console.log").read_text()  # what rank 0 printed, kept beside the metrics
    assert "taking its newest complete checkpoint" in console and "sft: done, 1 step; last checkpoint" in console
    assert "step 1/1 " in console


def test_the_time_to_go_leaves_out_the_first_step(tmp_path, monkeypatch, capsys):
    """A first step that takes 100 s (start-up, compilation) and later ones of 1 s: the time to go
    is counted at 1 s a step."""
    from megatron_vr1.training import metrics

    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    log = metrics.MetricsLog(tmp_path, total_steps=10, tensorboard=False, progress=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0, "skipped": 2 if step == 3 else 0})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("eta 0:00:08") and lines[2].endswith("skipped=2 eta 0:00:07"), lines


def test_a_resumed_run_takes_the_new_settings_and_says_what_changed(tmp_path, reference_runs, demo_with_tokenizer,
                                                                   init_ckpt):
    """Resumed from step 2 of 4 with a new learning rate and two more steps: steps 3 to 6 run at
    the new rate (not the one the optimizer state saved), the changes are printed, and a change of
    data order (another seed) is refused unless resume_allow_changes=true."""
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(reference_runs["tp1"] / "iter_0000002", run_dir / "iter_0000002")
    args = [a for a in common(demo_with_tokenizer, init_ckpt) if not a.startswith(("train.lr=", "train.steps="))]
    proc = sft(run_dir, 1, *args, "train.lr=3e-3", "train.steps=6", "train.lr_schedule=constant")
    assert "resuming" in proc.stdout and "train.lr: 0.001 -> 0.003" in proc.stdout and "train.steps: 4 -> 6" in proc.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 4, 5, 6]
    assert [m["lr"] for m in metrics] == pytest.approx([3e-3] * 4)
    refused = sft(run_dir, 1, *[a for a in args if not a.startswith("seed=")], "train.lr=3e-3", "train.steps=8",
                  "train.lr_schedule=constant", "seed=99", check=False)
    assert refused.returncode == 2 and "seed changed since it was saved" in refused.stderr, refused.stderr[-2000:]
    assert "resume_allow_changes=true" in refused.stderr
    allowed = sft(run_dir, 1, *args, "train.lr=3e-3", "train.steps=7", "train.lr_schedule=constant", "seed=99",
                  "resume_allow_changes=true")
    assert "seed: 1234 -> 99" in allowed.stdout


def test_bad_records_stop_the_run_before_its_first_step(tmp_path, demo_with_tokenizer, init_ckpt):
    """A malformed record, a missing image and a damaged one (in worker processes, data.num_workers=2):
    the pre-flight names them in one line before step 1, nothing is trained or saved; under
    data.skip_bad_samples=true the run says how many it will skip and trains on the rest."""
    import shutil

    records = json.loads((demo_with_tokenizer / "sft.json").read_text())
    shutil.copytree(demo_with_tokenizer / "images", tmp_path / "images")
    damaged = bytearray((tmp_path / records[9]["images"][0]).read_bytes())
    damaged[-40] ^= 0xFF
    (tmp_path / records[9]["images"][0]).write_bytes(bytes(damaged))
    del records[3]["messages"]
    records[6]["images"] = ["images/missing.png"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    args = [a for a in common(demo_with_tokenizer, init_ckpt, "train.steps=1") if not a.startswith(
        ("data.train=", "data.num_workers="))] + [f"data.train={tmp_path / 'bad.json'}", "data.num_workers=2"]
    proc = sft(tmp_path / "run", 1, *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "3 bad records of 12: bad.json[3]" in errors[0] and "data.image_root" in errors[0], errors
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    skipped = sft(tmp_path / "run2", 1, *args, "data.skip_bad_samples=true")
    assert "data check: 3 records of 12 will be skipped and counted" in skipped.stdout


def test_too_long_records_are_skipped_and_counted_when_asked(tmp_path, demo_with_tokenizer, init_ckpt):
    run_dir = tmp_path / "run"
    # at TP=2 both ranks of the replica see the skips; they are counted once
    proc = sft(run_dir, 2, *common(demo_with_tokenizer, init_ckpt, "train.steps=2", "data.max_tokens=160",
                                   "data.skip_bad_samples=true", *LAYOUTS["tp2"][1]))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["skipped"] for m in metrics) > 0
    assert all(m["samples"] + m["skipped"] == 8 for m in metrics)
    assert f"skipped={metrics[0]['skipped']}" in proc.stdout  # on the console too, not only in the metrics


def _other_model(path: Path) -> None:
    """A checkpoint of a different architecture (another rope theta) for the mismatch error."""
    from omegaconf import OmegaConf
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vr1.checkpoint import hf_to_mcore
    from megatron_vr1.config import load_model_conf

    hf = OmegaConf.to_container(load_model_conf("toy").hf_config)
    hf["rope_theta"] = 5000.0
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf)).save_pretrained(path.parent / "other_hf")
    hf_to_mcore(path.parent / "other_hf", path, dtype="fp32")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_128_plus_the_signal(tmp_path, demo_with_tokenizer, init_ckpt,
                                                                       sig, code):
    """SIGTERM (preemption) or Ctrl-C: the step finishes, a checkpoint is saved, and the exit
    status says the run stopped early (143, 130), so `sft ... && rl ...` does not go on."""
    run_dir = tmp_path / "run"
    command = _command(1, [f"checkpoint.dir={run_dir}", *common(demo_with_tokenizer, init_ckpt, "train.steps=50",
                                                                "checkpoint.every=100")])
    proc = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 1 <= stopped < 50 and (run_dir / f"iter_{stopped:07d}" / "megatron_vr1.json").exists()
    assert len(losses(run_dir)) == stopped
