"""TP / PP parity with transformers: each topology runs as its own torchrun job on CPU (gloo)."""

import json

import pytest

from conftest import run_torchrun

TOL = 1e-4
CASES = {"untied/no_image", "untied/one_image", "untied/two_images", "tied/two_images"}


def _results(tmp_path, nproc, *args):
    run_torchrun("dist/parity_worker.py", nproc, *args, "--out", str(tmp_path))
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == nproc
    return results


@pytest.mark.parametrize(
    "nproc, args",
    [
        (2, ["--tp", "2", "--grad"]),
        (2, ["--tp", "2", "--sequence-parallel", "--grad"]),
        (2, ["--pp", "2", "--first-stage-layers", "1"]),
        (4, ["--tp", "2", "--pp", "2", "--first-stage-layers", "1"]),
    ],
    ids=["tp2", "tp2-sequence-parallel", "pp2", "tp2xpp2"],
)
def test_parallel_logits_match_transformers(tmp_path, nproc, args):
    results = _results(tmp_path, nproc, *args)
    last = [r for r in results if r["last_stage"]]
    assert len(last) == results[0]["tp"]  # every TP rank of the last stage checked
    for r in last:
        assert set(r["logits"]) == CASES
        worst = max(r["logits"].values())
        assert worst <= TOL, r["logits"]
    if "--grad" in args:
        for r in results:
            assert r["grad_params"] >= 60
            assert r["grad_max_rel"] <= 1e-5, r["grad"]
