"""Checkpoints survive a crash at any point of an overwrite (megatron_vr1.checkpoint.atomic)."""

import json
import subprocess
import sys

import torch

from conftest import TESTS
from tiny import tiny_hf_config


def test_sigkill_during_an_overwrite_leaves_a_loadable_checkpoint(tmp_path):
    """A save over an existing checkpoint is SIGKILLed inside megatron's writer, before our metadata,
    before the switch, between the two renames of the fallback path and just after the switch;
    each time a fresh reader loads a whole checkpoint, the old one until the switch has happened."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(TESTS / "dist" / "save_kill_worker.py"), str(tmp_path / "ckpt"),
                           str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = json.loads(report.read_text())
    killed = {s["kill"]: s["killed"] for s in steps if s["kill"]}
    assert all(killed.values()) and len(killed) == 5, killed
    # what each save found before it started: the value of the last save that reached the switch
    assert [s["loaded_before"] for s in steps] == [None, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0, 7.0]
    assert all(s["exit"] == 0 for s in steps if not s["kill"])
    assert steps[-1]["beside"] == ["ckpt"]  # the next complete save cleared what the killed ones left


class _FP8Metadata(torch.nn.Module):
    """Stands in for a Transformer Engine module: its state carries an ``_extra_state`` entry."""

    def get_extra_state(self):
        return {"fp8_scales": None}

    def set_extra_state(self, state):
        self.loaded = state


def test_a_checkpoint_without_extra_state_loads_into_a_model_that_carries_it(tmp_path, model_parallel_1):
    """A converted (local-spec) checkpoint has no TE ``_extra_state``; a TE-built model asks for it."""
    from megatron_vr1.checkpoint import load_model, save_model
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model

    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    saved = build_model(args, ParallelLayout(), backend="local")
    save_model(saved, tmp_path / "ckpt")
    model = build_model(args, ParallelLayout(), backend="local")
    model.language_model.decoder.layers[0].self_attention.linear_qkv.fp8 = _FP8Metadata()
    assert any(k.endswith("_extra_state") for k in model.sharded_state_dict())
    load_model(model, tmp_path / "ckpt")
    for a, b in zip(saved.parameters(), model.parameters()):
        assert torch.equal(a, b)
