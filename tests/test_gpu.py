"""The model, the batch and weight sync on CUDA (runs where a GPU is; CPU runs skip it and say so)."""

import json

import pytest
import torch

from conftest import run_torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; this machine has none")


def test_packed_batch_trains_on_cuda(model_parallel_1, tmp_path):
    """The data layer's batch on the GPU: forward, loss kernels and backward. The project's own hot
    path (image embedding, loss kernels, aggregation) runs with CUDA's sync debug mode set to error,
    so a host synchronisation there fails the test. (megatron-core's THD rotary embedding reads
    ``cu_seqlens`` on the host once per layer; that one is megatron-core's.)"""
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import build_offline_tokenizer, build_sample, load_tokenizer, packed_batch, process_images
    from megatron_vr1.kernels import aggregate_loss, grpo_loss, token_logprobs
    from megatron_vr1.models.qwen2_5_vl import build_model
    from PIL import Image

    args, layout = model_from_conf(load_model_conf("tiny"))
    model = build_model(args, layout, backend="local").cuda()
    tok = load_tokenizer(build_offline_tokenizer(tmp_path / "tok"))
    pixels, grid = process_images([Image.new("RGB", (84, 56), (200, 30, 30))])
    samples = [build_sample(tok, args, [{"role": "user", "content": "<image>Colour?"},
                                        {"role": "assistant", "content": "red"}], pixels, grid),
               build_sample(tok, args, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}],
                            *process_images([]))]
    batch = packed_batch(samples, args, pad_to_multiple_of=8).pin_memory().to("cuda", non_blocking=True)
    text_only = packed_batch(samples[1:], args).to("cuda")
    logits = model(**batch.model_inputs())
    per_sequence = torch.tensor([1.0, -1.0]).cuda()  # the test's own input: a host copy, before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.embed(text_only.input_ids, None, None, text_only.image_positions, None)
        old = token_logprobs(logits.detach(), batch.labels, mask=batch.loss_mask)
        adv = batch.per_token(per_sequence)
        loss, _, _ = grpo_loss(logits, batch.labels, old, old, adv, batch.loss_mask, kl_beta=0.01)
        part = aggregate_loss(loss, batch.loss_mask, mode="seq-mean-token-mean", cu_seqlens=batch.cu_seqlens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    (part.total / part.count).backward()
    assert torch.isfinite(loss).all() and all(p.grad is not None for p in model.language_model.parameters())


def test_weight_sync_buckets_live_on_the_gpu(model_parallel_1):
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model
    from tiny import tiny_hf_config

    model = build_model(Qwen25VLArgs.from_hf_config(tiny_hf_config()), ParallelLayout(), backend="local").cuda()
    devices = {t.device.type for bucket in iter_hf_weights(model, bucket_bytes=1 << 16) for _, t in bucket}
    assert devices == {"cuda"}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="PP=2 over NCCL needs two GPUs")
def test_weight_sync_at_pp2_over_nccl(tmp_path):
    """NCCL cannot broadcast CPU tensors: the export at PP > 1 must allocate on the GPU."""
    from megatron_vr1.checkpoint import hf_to_mcore
    from tiny import hf_model, tiny_hf_config

    hf_model(tiny_hf_config()).save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", pipeline_parallel=2, num_layers_in_first_pipeline_stage=1,
                dtype="fp32")
    run_torchrun("dist/ckpt_worker.py", 2, "--hf", str(tmp_path / "hf"), "--mcore", str(tmp_path / "mcore"),
                 "--resave", str(tmp_path / "resaved"), "--out", str(tmp_path / "results"), "--pp", "2",
                 "--first-stage-layers", "1")
    for path in (tmp_path / "results").glob("rank*.json"):
        r = json.loads(path.read_text())
        assert r["mismatched"] == [] and r["devices"] == ["cuda"]
