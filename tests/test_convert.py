"""tools/convert.py: HF <-> Megatron-Core distributed checkpoints, streaming, at any TP/PP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_torchrun
from megatron_vr1.checkpoint import CheckpointError, hf_to_mcore, mcore_to_hf, verify
from megatron_vr1.models.qwen2_5_vl import canonical_hf_name
from tiny import hf_logits, hf_model, make_case, tiny_hf_config

ROOT = Path(__file__).resolve().parents[1]


def _save_hf(path: Path, tied: bool = False) -> Path:
    model = hf_model(tiny_hf_config(tied=tied))
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({canonical_hf_name(k): v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir = _save_hf(tmp_path / "hf", tied)
    hf_to_mcore(hf_dir, tmp_path / "mcore", tensor_parallel=2, pipeline_parallel=2,
                num_layers_in_first_pipeline_stage=1, dtype="fp32")
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=200_000)
    original, back = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert set(back) == set(original)
    for name in original:
        assert original[name].dtype == back[name].dtype and torch.equal(original[name], back[name]), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (tmp_path / "back" / "tokenizer_config.json").exists()
    assert (tmp_path / "back" / "generation_config.json").exists()

    batch = make_case("two_images")
    a = hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval(), batch)
    b = hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back", dtype=torch.float32).eval(), batch)
    assert torch.equal(a, b)
    assert verify(tmp_path / "back", tmp_path / "mcore") <= 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpoint_loads_at_tp2_pp2_exports_and_resaves(tmp_path, tied):
    """Converted for TP=1, loaded at TP=2 x PP=2 (4 ranks): logits match transformers, the rollout
    export gives every HF tensor bit-exact, and the trainers' re-save converts back exactly."""
    hf_dir = _save_hf(tmp_path / "hf", tied)
    hf_to_mcore(hf_dir, tmp_path / "mcore", dtype="fp32")
    run_torchrun("dist/ckpt_worker.py", 4, "--hf", str(hf_dir), "--mcore", str(tmp_path / "mcore"),
                 "--resave", str(tmp_path / "resaved"), "--out", str(tmp_path / "results"),
                 "--tp", "2", "--pp", "2", "--first-stage-layers", "1")
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("rank*.json"))]
    assert len(results) == 4
    for r in results:
        assert r["mismatched"] == []
        assert sorted(r["exported"]) == r["reference"] and len(r["exported"]) == len(set(r["exported"]))
        assert r["oversized"] >= 1 and r["buckets"] > r["oversized"]
        # weight sync moves flat buckets, each on the platform's device (NCCL cannot move CPU
        # tensors): per bucket one TP all-gather on its stage and one PP broadcast
        assert r["devices"] == [r["platform_device"]]
        assert all(c.endswith(":" + r["platform_device"]) for c in r["collectives"]), r["collectives"]
        assert len(r["collectives"]) <= 2 * r["buckets"] and r["buckets"] < len(r["exported"]) / 2
        if r["last_stage"]:
            assert r["logit_diff"] <= 1e-4
    # the trainers' checkpoint (saved at TP=2 x PP=2) converts back to the original tensors
    meta = json.loads((tmp_path / "resaved" / "megatron_vr1.json").read_text())
    assert meta["parallel"]["tensor_parallel"] == 2 and meta["source"] == "training"
    mcore_to_hf(tmp_path / "resaved", tmp_path / "back", hf_config=hf_dir)
    original, back = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)


def _no_output(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.incomplete-*"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
        (lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), r"unexpected tensors \['model.extra.weight'\]"),
        (lambda t: t.__setitem__("visual.blocks.0.attn.qkv.bias", torch.zeros(95)),
         r"tensor 'visual.blocks.0.attn.qkv.bias' has shape \[95\], expected \[96\]"),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_bad_hf_checkpoint_is_named_and_leaves_no_output(tmp_path, damage, message):
    hf_dir = _save_hf(tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight" in tensors  # transformers writes the published layout
    damage(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        hf_to_mcore(hf_dir, tmp_path / "mcore")
    _no_output(tmp_path, "mcore")


def test_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    from megatron_vr1.checkpoint import hf_files

    hf_dir = _save_hf(tmp_path / "hf")
    real_get = hf_files.HFCheckpointReader.get

    def flaky(self, name):
        if name == "model.layers.2.self_attn.o_proj.weight":
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(hf_files.HFCheckpointReader, "get", flaky)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_mcore(hf_dir, tmp_path / "mcore")
    _no_output(tmp_path, "mcore")


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
    hf_dir = _save_hf(tmp_path / "hf", tied=True)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    emb = [k for k in tensors if k.endswith("embed_tokens.weight")][0]
    tensors["lm_head.weight"] = tensors[emb] + 1
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf_to_mcore(hf_dir, tmp_path / "mcore")


def test_cli_help_and_end_to_end(tmp_path):
    script = str(ROOT / "tools" / "convert.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    assert "hf-to-mcore" in help_text and "mcore-to-hf" in help_text and "verify" in help_text
    hf_dir = _save_hf(tmp_path / "hf")
    steps = [
        ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mcore"), "--tp", "2", "--dtype", "fp32"],
        ["mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "back")],
        ["verify", "--hf", str(tmp_path / "back"), "--mcore", str(tmp_path / "mcore"), "--tolerance", "1e-4"],
    ]
    for step in steps:
        proc = subprocess.run([sys.executable, script, *step], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit difference|" in proc.stdout
    proc = subprocess.run([sys.executable, script, *steps[0]], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exists and is not empty" in proc.stderr


def test_reads_the_nested_transformers_key_layout(tmp_path):
    """Checkpoints re-saved by transformers 4.52-4.x use model.language_model.* / model.visual.*."""
    hf_dir = _save_hf(tmp_path / "hf")
    published = load_file(str(hf_dir / "model.safetensors"))
    nested = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
               "model.visual." + k[len("visual."):] if k.startswith("visual.") else k): v for k, v in published.items()}
    assert any(k.startswith("model.language_model.") for k in nested) and any(k.startswith("model.visual.") for k in nested)
    save_file(nested, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_to_mcore(hf_dir, tmp_path / "mcore", dtype="fp32")
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    back = load_file(str(next((tmp_path / "back").glob("*.safetensors"))))
    assert set(back) == set(published)  # written in the published layout
    assert all(torch.equal(back[k], published[k]) for k in published)


def test_export_keeps_the_source_config_and_dtype(tmp_path):
    """Fields the model does not read (video's tokens_per_second, token ids) survive the round trip,
    and the default dtype is the checkpoint's own: an fp16 source comes back fp16, bit for bit."""
    from transformers import AutoConfig

    config = tiny_hf_config()
    config["vision_config"]["tokens_per_second"] = 2  # what the published configs say; transformers defaults to 4
    hf_model(config).to(torch.float16).save_pretrained(tmp_path / "hf")
    info = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    assert info["dtype"] == "float16"
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], original[k]) for k in original)
    exported = AutoConfig.from_pretrained(tmp_path / "back")
    assert exported.vision_config.tokens_per_second == 2
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float16"


def test_outputs_are_never_clobbered(tmp_path, monkeypatch):
    from megatron_vr1.checkpoint import hf_files

    hf_dir = _save_hf(tmp_path / "hf")
    out = tmp_path / "mcore"
    real_get = hf_files.HFCheckpointReader.get

    def racing(self, name):  # another job writes into the output while we convert
        out.mkdir(exist_ok=True)
        (out / "precious_step_1000.pt").write_text("keep me")
        return real_get(self, name)

    monkeypatch.setattr(hf_files.HFCheckpointReader, "get", racing)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        hf_to_mcore(hf_dir, out, dtype="fp32")
    monkeypatch.undo()
    assert (out / "precious_step_1000.pt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore"]  # no hidden leftovers

    with pytest.raises(FileExistsError, match="is, or contains, the input"):
        hf_to_mcore(hf_dir, hf_dir, overwrite=True)
    with pytest.raises(FileExistsError, match="is, or contains, the input"):
        hf_to_mcore(hf_dir, tmp_path, overwrite=True)

    real = tmp_path / "real"
    real.mkdir()
    (real / "x").write_text("x")
    link = tmp_path / "latest"
    link.symlink_to(real)
    hf_to_mcore(hf_dir, link, dtype="fp32", overwrite=True)  # replaces the link, not what it points to
    assert not link.is_symlink() and (link / "megatron_vr1.json").exists() and (real / "x").exists()


def test_load_and_save_check_what_they_touch(tmp_path, model_parallel_1, monkeypatch):
    from megatron.core import dist_checkpointing

    from megatron_vr1.checkpoint import load_model, save_model
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model

    hf_dir = _save_hf(tmp_path / "hf")
    hf_to_mcore(hf_dir, tmp_path / "mcore", dtype="fp32")
    other = tiny_hf_config()
    other["rope_theta"] = 1e6
    model = build_model(Qwen25VLArgs.from_hf_config(other), ParallelLayout(), backend="local")
    with pytest.raises(ValueError, match="rope_theta differ"):
        load_model(model, tmp_path / "mcore")

    model = build_model(Qwen25VLArgs.from_hf_config(tiny_hf_config()), ParallelLayout(), backend="local")
    load_model(model, tmp_path / "mcore")
    with pytest.raises(FileExistsError, match="not empty"):
        save_model(model, tmp_path / "mcore")
    save_model(model, tmp_path / "mcore", overwrite=True)
    load_model(model, tmp_path / "mcore")

    def preempted(*args, **kwargs):
        raise OSError("node preempted")

    monkeypatch.setattr(dist_checkpointing, "save", preempted)
    with pytest.raises(OSError, match="preempted"):
        save_model(model, tmp_path / "mcore", overwrite=True)
    load_model(model, tmp_path / "mcore")  # a save that died leaves the previous checkpoint in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore"]  # and nothing half-written beside it
    (tmp_path / "mcore" / "megatron_vr1.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete megatron-vr1 checkpoint"):
        load_model(model, tmp_path / "mcore")  # a folder without the metadata is never taken for a checkpoint


def test_cli_user_errors_are_one_line_and_nan_fails_verify(tmp_path, capsys):
    import importlib.util

    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "tools" / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hf_dir = _save_hf(tmp_path / "hf")
    base = ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--tp", "0"])
    assert exit_info.value.code == 2
    assert cli.main(base + ["--first-stage-layers", "2"]) == 2  # needs --pp > 1
    assert "needs pipeline_parallel > 1" in capsys.readouterr().err
    assert cli.main(base + ["--pp", "2", "--first-stage-layers", "3"]) == 2  # the last stage would be empty
    assert not (tmp_path / "m").exists()

    broken = tmp_path / "broken"
    _save_hf(broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["hf-to-mcore", "--hf", str(broken), "--out", str(tmp_path / "nan")]) == 0
    assert cli.main(["verify", "--hf", str(hf_dir), "--mcore", str(tmp_path / "nan"), "--tolerance", "1e-4"]) == 1


def test_a_short_vocab_table_is_refused():
    from megatron_vr1.models.qwen2_5_vl import Qwen25VLArgs
    from megatron_vr1.models.qwen2_5_vl.hf_mapping import param_mappings

    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    embed = param_mappings(args, 256)["language_model.embedding.word_embeddings.weight"]
    with pytest.raises(ValueError, match="has 200 rows, the config's vocab_size is 250"):
        embed.shard([torch.zeros(200, 64)], 0, 1)
