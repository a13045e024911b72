"""72B and 32B at TP=8 x PP=4, built rank by rank on the meta device under a fake process group."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

LAYOUTS = {"qwen2_5_vl_72b": 17, "qwen2_5_vl_32b": 13}  # LM layers on the first (ViT) stage
LAYERS = {"qwen2_5_vl_72b": 80, "qwen2_5_vl_32b": 64}


@pytest.fixture(scope="module")
def report():
    worker = Path(__file__).parent / "dist" / "meta_worker.py"
    proc = subprocess.run([sys.executable, str(worker), json.dumps(LAYOUTS)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parameter_count_over_ranks_equals_transformers(report, name):
    r = report[name]
    assert len(r["counts"]) == 32
    assert sum(r["counts"]) == r["hf_count"]
    if name == "qwen2_5_vl_72b":
        assert r["hf_count"] == 73_410_777_344  # the published checkpoint's parameter count


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_chosen_ranks_have_their_stage_and_hf_mapped_shapes(report, name):
    first, total = LAYOUTS[name], LAYERS[name]
    later = (total - first) // 3
    ranks = report[name]["ranks"]
    r0, r3 = ranks["3"], ranks["29"]
    assert (r0["pp_rank"], r0["tp_rank"], r3["pp_rank"], r3["tp_rank"]) == (0, 3, 3, 5)
    assert r0["has_vision"] and not r0["has_output_layer"] and r0["lm_layers"] == first and r0["layer_offset"] == 0
    assert not r3["has_vision"] and r3["has_output_layer"] and r3["lm_layers"] == later
    assert r3["layer_offset"] == first + 2 * later
    for r in (r0, r3):
        assert r["device"] == "meta"
        assert r["checked"] > 50 and r["mismatched"] == []
