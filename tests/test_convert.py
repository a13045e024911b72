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
