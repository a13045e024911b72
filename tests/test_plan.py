"""The memory planner (tools/plan.py, dry_run=true): parameter counts against the meta-device
model rank by rank, activation bytes against what a real forward and backward allocates, the
recipes, and its command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vr1.config import load_model_conf, model_from_conf
from megatron_vr1.models.qwen2_5_vl import ParallelLayout
from megatron_vr1.planning import ActivationSettings, GiB, rank_params, stage_bytes

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"3b_tp2_pp2_tied": ("qwen2_5_vl_3b", 2, 2, 16), "7b_tp2": ("qwen2_5_vl_7b", 2, 1, None), "32b_tp8_pp2": ("qwen2_5_vl_32b", 8, 2, 28),
           "72b_tp8_pp4": ("qwen2_5_vl_72b", 8, 4, 17)}
HF_COUNTS = {"qwen2_5_vl_7b": 8_292_166_656, "qwen2_5_vl_32b": 33_452_718_336, "qwen2_5_vl_72b": 73_410_777_344}


def _run(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def meta_ranks():
    proc = _run(str(ROOT / "tests" / "dist" / "plan_worker.py"), json.dumps(LAYOUTS), timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_planner_counts_equal_the_meta_device_model_at_every_rank(meta_ranks, key):
    name, tp, pp, first = LAYOUTS[key]
    args, _ = model_from_conf(load_model_conf(name))
    layout = ParallelLayout(tp, pp, num_layers_in_first_pipeline_stage=first)
    built = meta_ranks[key]
    assert len(built) == tp * pp
    for r in built:
        want = rank_params(args, layout, r["stage"], r["tp_rank"])
        assert (want.held, want.unique, want.lm_layers) == (r["held"], r["unique"], r["lm_layers"]), r
    if name in HF_COUNTS:
        assert sum(r["unique"] for r in built) == HF_COUNTS[name]


# ---- activations: the estimate against the memory a real forward and backward allocates


def _tiny(layers: int, depth: int):
    cfg = load_model_conf("tiny")
    cfg.hf_config.num_hidden_layers = layers
    cfg.hf_config.vision_config.depth = depth
    cfg.hf_config.vision_config.fullatt_block_indexes = [depth - 1]
    return model_from_conf(cfg)


def _batch(args):
    """Two packed samples with one image each: 454 tokens, 352 ViT patches."""
    from megatron_vr1.data import packed_batch
    from megatron_vr1.data.template import Sample
    from megatron_vr1.models.qwen2_5_vl.positions import get_rope_index

    g = torch.Generator().manual_seed(0)
    samples = []
    for (t, h, w), text in (((1, 16, 16), 100), ((1, 8, 12), 150)):
        ids = torch.tensor([args.vision_start_token_id] + [args.image_token_id] * (t * h * w // 4)
                           + [args.vision_end_token_id] + torch.randint(0, 1000, (text,), generator=g).tolist())
        grid = torch.tensor([[t, h, w]])
        positions, _ = get_rope_index(ids[None], grid, args)
        samples.append(Sample(ids, torch.ones(len(ids), dtype=torch.bool), positions[:, 0],
                              torch.randn(t * h * w, args.vision.patch_dim, generator=g), grid))
    return packed_batch(samples, args)


def measured_and_estimated(layers: int, depth: int, recompute: str) -> tuple[float, float]:
    """Peak bytes a forward and backward allocate beyond the weights and their gradients (torch's
    MemTracker follows every tensor), and the planner's activation estimate for the same batch."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from megatron_vr1.models.qwen2_5_vl import build_model
    from megatron_vr1.training.setup import recompute_config

    args, layout = _tiny(layers, depth)
    model = build_model(args, layout, backend="local", dtype=torch.float32,
                        config_overrides=recompute_config(recompute, 1))
    batch = _batch(args)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        out = model(**batch.model_inputs(with_labels=True))
        (out * batch.loss_mask).sum().backward()

    step()  # warm caches (attention block indices) outside the measurement
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    peak = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    measured = peak["Total"] - peak["PARAM"] - peak["GRAD"]
    tokens, patches = batch.input_ids.shape[1], batch.pixel_values.shape[0]
    settings = ActivationSettings(micro_batch_tokens=tokens, elem=4, recompute=recompute,
                                  image_fraction=patches / args.vision.merge_unit / tokens, fused_weight_grads=False)
    return measured, sum(stage_bytes(args, layout, 0, layers, settings).values())


@pytest.fixture(scope="module")
def memory(model_parallel_1):
    cases = [(4, 4, r) for r in ("none", "selective", "full")] + [(2, 4, r) for r in ("none", "selective", "full")]
    cases += [(4, 2, "none"), (4, 2, "full")]
    return {case: measured_and_estimated(*case) for case in cases}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_estimate_of_the_tiny_model_within_15_percent(memory, recompute):
    measured, estimated = memory[(4, 4, recompute)]
    assert estimated == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_per_layer_activations_within_15_percent(memory, recompute):
    """Two LM layers more: the logits, which dominate the tiny model's total, cancel out."""
    (m4, e4), (m2, e2) = memory[(4, 4, recompute)], memory[(2, 4, recompute)]
    assert m4 > m2
    assert e4 - e2 == pytest.approx(m4 - m2, rel=0.15)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_vision_activations_within_15_percent(memory, recompute):
    (m4, e4), (m2, e2) = memory[(4, 4, recompute)], memory[(4, 2, recompute)]
    assert e4 - e2 == pytest.approx(m4 - m2, rel=0.15)


def test_full_recompute_keeps_less_than_none(memory):
    assert memory[(4, 4, "full")][0] < memory[(4, 4, "none")][0]


# ---- memory model


def _settings(**kw):
    from megatron_vr1.planning import PlanSettings

    activation = ActivationSettings(micro_batch_tokens=16384, elem=2, recompute="full")
    return PlanSettings(activation=activation, **kw)


def test_optimizer_state_shards_over_data_parallel_and_context_parallel_splits_tokens():
    from megatron_vr1.planning import plan

    args, _ = model_from_conf(load_model_conf("qwen2_5_vl_7b"))
    layout = ParallelLayout(2, 1, sequence_parallel=True)
    one, four = plan(args, layout, _settings(gpus=2)), plan(args, layout, _settings(gpus=8))
    held = rank_params(args, layout, 0).held
    assert one.stages[0].bytes["optimizer"] == held * 12 and four.stages[0].bytes["optimizer"] == held * 3
    assert one.stages[0].bytes["weights"] == held * 2 and one.stages[0].bytes["grads"] == held * 4
    cp2 = plan(args, ParallelLayout(2, 1, sequence_parallel=True, context_parallel=2), _settings(gpus=4))
    assert cp2.stages[0].bytes["activations"] < 0.65 * one.stages[0].bytes["activations"]
    settings = _settings(gpus=2).activation
    whole, half = (stage_bytes(args, ParallelLayout(2, 1, sequence_parallel=True, context_parallel=cp), 0, 28,
                               settings) for cp in (1, 2))
    assert half["vision"] == whole["vision"]  # every context-parallel rank runs the ViT on all the images
    assert 0.5 * whole["layers"] < half["layers"] < 0.55 * whole["layers"]  # half the tokens, all the keys
    assert cp2.stages[0].bytes["optimizer"] == held * 6  # the distributed optimizer shards over DP x CP
    with pytest.raises(ValueError, match="whole replicas"):
        plan(args, layout, _settings(gpus=3))


def test_rollout_rows_is_the_kv_and_prefill_formula():
    from megatron_vr1.planning import rollout_rows

    args, _ = model_from_conf(load_model_conf("qwen2_5_vl_7b"))
    per_token_kv = 2 * (4 // 2) * 128 * 28 * 2  # K and V, 2 of 4 KV heads per rank, 28 layers, bf16
    per_seq = per_token_kv * (1000 + 3000) + 1000 * 152064 // 2 * 2  # + the prompt's logits on the last stage
    budget = 10.5 * per_seq
    rows = dict(prompt_tokens=1000, response_tokens=3000)
    assert rollout_rows(args, ParallelLayout(2), 2, max_batch=64, kv_cache_fraction=0.5, device_bytes=2 * budget,
                        **rows) == 10
    assert rollout_rows(args, ParallelLayout(2), 2, max_batch=8, kv_cache_fraction=0.5, device_bytes=2 * budget,
                        **rows) == 8
    assert rollout_rows(args, ParallelLayout(2), 2, max_batch=64, kv_cache_fraction=0.5, device_bytes=budget / 100,
                        **rows) == 1
    assert rollout_rows(args, ParallelLayout(2), 2, max_batch=64, kv_cache_fraction=None, device_bytes=budget,
                        **rows) == 64
    # pipeline stages cut the same batches: the deepest stage (16 of 28 layers) decides on every one
    pp2 = ParallelLayout(2, 2, num_layers_in_first_pipeline_stage=12)
    deep = 2 * (4 // 2) * 128 * 16 * 2 * 4000 + 1000 * 152064 // 2 * 2
    assert rollout_rows(args, pp2, 2, max_batch=64, kv_cache_fraction=1.0, device_bytes=3.5 * deep, **rows) == 3


# ---- recipes and the command line

RECIPES = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))


def test_every_model_has_sft_and_grpo_recipes():
    assert RECIPES == sorted(f"{k}_{s}" for k in ("sft", "grpo") for s in ("3b", "7b", "32b", "72b"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_fit_80gb_on_the_gpus_they_name(recipe):
    from megatron_vr1.planning import plan
    from megatron_vr1.planning.cli import compose_trainer_config
    from megatron_vr1.planning.report import settings_from_conf

    cfg, config = compose_trainer_config([f"recipe={recipe}", "data.train=x"])
    assert config == recipe.split("_")[0]
    args, layout, settings = settings_from_conf(cfg)
    result = plan(args, layout, settings)
    assert result.fits and settings.gpu_memory_gb == 80, result.peak / GiB
    pp = layout.pipeline_parallel
    assert pp == 1 or layout.num_layers_in_first_pipeline_stage < args.num_layers // pp  # the ViT's stage has fewer
    assert cfg.train.distributed_optimizer and cfg.train.recompute in ("selective", "full")
    text = (ROOT / "conf" / "recipe" / f"{recipe}.yaml").read_text()
    assert f"({settings.gpus} GPUs)" in text  # the comment says what it is for
    if config == "grpo":
        assert cfg.rl.engine == "megatron" and cfg.rl.engine_options.kv_cache_fraction > 0


def test_plan_cli_exit_status_says_fits_or_not():
    fits = _run("tools/plan.py", "recipe=sft_72b")
    assert fits.returncode == 0, fits.stderr
    assert "verdict: fits" in fits.stdout and "total parameters: 73,410,777,344" in fits.stdout
    assert "stage" in fits.stdout and "optimizer" in fits.stdout and "activations" in fits.stdout
    tight = _run("tools/plan.py", "recipe=grpo_72b", "gpus=32", "train.recompute=none")
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout
    for word in ("reference", "kv_cache", "rollout_logits"):
        assert word in tight.stdout
    wrong = _run("tools/plan.py", "recipe=sft_72b", "gpus=12")
    assert wrong.returncode == 2 and "use a multiple of 32" in wrong.stderr
    entry = _run("tools/plan.py", "entry=megatron_vr1.demo")
    assert entry.returncode == 2 and "entry='megatron_vr1.demo': choose one of" in entry.stderr
    unknown = _run("tools/plan.py", "train.no_such_option=1")
    assert unknown.returncode == 2 and unknown.stderr.startswith("plan: error:") and "no_such_option" in unknown.stderr


@pytest.mark.parametrize("argv, message", [
    (["entry=megatron_vr1.rl", "rl.micro_batch_tokens=64"], "must hold a prompt and a full response"),
    (["train.micro_batch_tokens=1024", "data.max_tokens=2048"], "must be at least data.max_tokens"),
    (["entry=megatron_vr1.rl", "recipe=grpo_7b", "gpus=8", "rl.rollout.prompts_per_step=10"],
     "10 prompts per step do not split over 4 data-parallel replicas"),
    (["entry=megatron_vr1.rl", "rl.loss.kl_max=0"], "rl.loss.kl_max must be > 0"),
    (["entry=megatron_vr1.rl", "rl.engine=megatron", "+rl.engine_options.batching=paged"],
     "rl.engine_options.batching must be one of continuous, static, got 'paged'"),
    (["entry=megatron_vr1.rl", "recipe=grpo_7b", "gpus=8", "rl.engine_options.kv_cache_fraction=0.0001"],
     "rl.engine_options.kv_cache_fraction=0.0001 of the GPU's 80 GiB cannot hold one request of 4096 prompt"),
], ids=["rl-micro-batch", "sft-micro-batch", "prompts-over-replicas", "rl-option", "batching-mode", "kv-share"])
def test_the_planner_refuses_what_the_trainers_refuse(argv, message):
    """One check (planning.validate.check_job) for the planner, dry_run and the trainers: a job a
    trainer would refuse at its start is refused by the planner too, with exit status 2."""
    out = _run("tools/plan.py", *argv)
    assert out.returncode == 2 and message in out.stderr and out.stderr.startswith("plan: error:"), out.stderr


def test_no_layout_found_and_a_dry_run_that_does_not_fit_exit_1():
    none = _run("tools/plan.py", "model=qwen2_5_vl_72b", "search=true", "gpus=1")
    assert none.returncode == 1 and "no layout fits" in none.stdout, none.stdout
    tight = _run("-m", "megatron_vr1.sft", "model=qwen2_5_vl_7b", "dry_run=true", "plan.gpus=2",
                 "plan.gpu_memory_gb=10", "data.train=x", "checkpoint.dir=y")
    assert tight.returncode == 1 and "verdict: does NOT fit in 10 GiB" in tight.stdout, tight.stderr[-2000:]
    helped = _run("tools/plan.py", "--help")
    assert helped.returncode == 0 and "Exit status: 0 fits, 1 does not fit" in helped.stdout


def test_the_launcher_says_when_the_planner_itself_failed(tmp_path):
    """A planner that crashes is not a verdict: the launcher says the planner failed, with its
    exit status, and starts nothing."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$1\" in */tools/plan.py) echo 'Traceback: boom' >&2; exit 3;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "launch" / "torchrun.sh"), "megatron_vr1.sft", "data.train=x"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake),
                                                               "GPUS_PER_NODE": "1"}, timeout=60)
    assert proc.returncode == 3 and "the planner itself failed (exit status 3" in proc.stderr, proc.stderr
    assert "does not fit" not in proc.stderr


def test_search_lists_layouts_that_fit():
    from megatron_vr1.planning import plan
    from megatron_vr1.planning.cli import compose_trainer_config
    from megatron_vr1.planning.report import settings_from_conf

    out = _run("tools/plan.py", "model=qwen2_5_vl_32b", "search=true", "top=3")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if "GPUs" in line and "model.parallel" in line]
    assert len(rows) == 3
    gpus = int(rows[0][0])
    assert gpus > 8  # 32B does not train on 8 GPUs at 16K tokens
    for row in rows:  # each layout it names fits when planned on its own
        overrides = [w for w in row if "=" in w and not w.startswith("DP=")]
        cfg, _ = compose_trainer_config(["model=qwen2_5_vl_32b", f"gpus={row[0]}", *overrides])
        assert plan(*settings_from_conf(cfg)).fits


def test_dry_run_of_the_72b_recipe_prints_every_stage_and_the_verdict():
    out = _run("-m", "megatron_vr1.sft", "recipe=sft_72b", "dry_run=true", "data.train=x", "checkpoint.dir=y")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built all 32 stage ranks" in out.stdout and "match the planner's" in out.stdout
    for stage, layers in enumerate((17, 21, 21, 21)):
        assert f"stage {stage}: {layers} LM layers" in out.stdout
    assert "stage 0: 17 LM layers + ViT" in out.stdout and "stage 3: 21 LM layers + output layer" in out.stdout
    assert "TP=8 x CP=1 x PP=4 x DP=1" in out.stdout and "verdict: fits in 80 GiB" in out.stdout
    assert not (ROOT / "y").exists()


def test_context_parallel_with_transformer_engine_is_a_clear_error():
    from megatron_vr1.errors import UsageError
    from megatron_vr1.training.setup import check_context_parallel

    check_context_parallel(1, "te")
    check_context_parallel(2, "local")
    with pytest.raises(UsageError, match=r"context_parallel=2 runs with the local layer spec; the 'te' backend's "
                                         r"context-parallel attention is not wired in: set backend=local"):
        check_context_parallel(2, "te")


def test_full_recompute_of_the_vit_and_lm_gives_the_same_gradients(model_parallel_1):
    """The ViT's blocks recompute under ``train.recompute=full`` like the LM's: same loss and
    gradients as without recomputation."""
    from megatron_vr1.models.qwen2_5_vl import build_model
    from megatron_vr1.training.setup import recompute_config

    args, layout = _tiny(2, 2)
    batch = _batch(args)
    grads = []
    for recompute in ("none", "full"):
        torch.manual_seed(0)
        model = build_model(args, layout, backend="local", dtype=torch.float32,
                            config_overrides=recompute_config(recompute, 1))
        out = model(**batch.model_inputs(with_labels=True))
        (out * batch.loss_mask).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def readme_training_commands() -> list[tuple[str, int, list[str]]]:
    """(entry module, GPUs, overrides) of every GPU training command in the README's code blocks:
    torchrun (``--nproc-per-node``) and tools/launch/torchrun.sh (``NNODES`` nodes of 8 GPUs)."""
    import re
    import shlex

    found = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            m = re.search(r"(?:-m |torchrun\.sh )(megatron_vr1\.(?:sft|rl))(?:\s|$)(.*)", line)
            if not m or "torchrun" not in line:
                continue
            nproc = re.search(r"--nproc-per-node[ =](\d+)", line)
            nodes = re.search(r"NNODES=(\d+)", line)
            gpus = int(nproc.group(1)) if nproc else 8 * int(nodes.group(1) if nodes else 1)
            words = shlex.split(m.group(2).split(" #")[0])
            found.append((m.group(1), gpus, [w for w in words if "=" in w]))
    return found


def test_every_gpu_training_command_in_the_readme_fits_by_the_planner():
    """The README's own commands, as a user would paste them: each fits its GPUs (exit status 0),
    the 7B SFT and GRPO of "Reproduce Vision-R1-7B" and the 32B and 72B lines among them."""
    from megatron_vr1.planning.cli import main

    commands = readme_training_commands()
    recipes = {next((w.split("=")[1] for w in o if w.startswith("recipe=")), None) for _, _, o in commands}
    assert {"sft_7b", "grpo_7b", "sft_32b", "grpo_32b", "sft_72b", "grpo_72b"} <= recipes, commands
    for entry, gpus, overrides in commands:
        assert main([f"entry={entry}", f"gpus={gpus}", *overrides]) == 0, (entry, gpus, overrides)
