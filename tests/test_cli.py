import subprocess
import sys


def test_inspect_model_reports_every_stage_and_the_hf_total(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vr1.cli.inspect_model", "model=qwen2_5_vl_7b",
         "model.parallel.pipeline_parallel=2", "model.parallel.num_layers_in_first_pipeline_stage=12"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []  # no log or output file left where it ran
    out = proc.stdout
    assert "TP=2 x PP=2" in out
    assert "stage 0:  12 LM layers" in out and "stage 1:  16 LM layers" in out
    assert "total parameters: 8,292,166,656" in out  # Qwen2.5-VL-7B's published count


def test_inspect_model_rejects_a_layout_that_does_not_fit():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vr1.cli.inspect_model", "model=qwen2_5_vl_7b",
         "model.parallel.tensor_parallel=8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "tensor_parallel=8 does not divide num_attention_heads=28" in proc.stderr
