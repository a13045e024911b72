"""torchrun worker: load a converted Megatron checkpoint at TP x PP, compare with transformers,
export HF tensors through the rollout weight-sync path, and re-save in the trainers' format."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--mcore", required=True)
    parser.add_argument("--resave", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    opts = parser.parse_args()

    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vr1 import platform
    from megatron_vr1.checkpoint import iter_hf_weights, load_model, save_model
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model, canonical_hf_name
    from parity_worker import gather_vocab, run_forward
    from tiny import hf_logits, make_case

    platform.init_distributed(opts.tp, opts.pp)
    args = Qwen25VLArgs.from_hf_config(opts.hf)
    layout = ParallelLayout(opts.tp, opts.pp, num_layers_in_first_pipeline_stage=opts.first_stage_layers)
    model = build_model(args, layout, backend="local").eval()
    load_model(model, opts.mcore)
    result: dict = {"last_stage": ps.is_pipeline_last_stage()}

    batch = make_case("two_images")
    with torch.no_grad():
        out = run_forward(model, {k: v.to(platform.device()) for k, v in batch.items()}, batch["input_ids"].shape[1])
    if ps.is_pipeline_last_stage():
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(opts.hf, dtype=torch.float32).eval()
        ours = gather_vocab(out)[..., : args.vocab_size].cpu()
        result["logit_diff"] = (ours - hf_logits(hf, batch)).abs().max().item()

    reference = {canonical_hf_name(k): v for k, v in load_file(str(Path(opts.hf) / "model.safetensors")).items()}
    if args.tie_word_embeddings:
        reference.pop("lm_head.weight", None)  # the embedding itself; exported once
    bucket_bytes = 64 << 10  # small, so that some single tensors exceed it
    seen, mismatched, oversized, buckets = [], [], 0, 0
    # every collective of the sync, with the device of the tensor it moves
    import torch.distributed as dist

    calls: list[str] = []
    for name in ("all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast"):
        real = getattr(dist, name, None)
        if real is not None:
            def counting(*a, _real=real, _name=name, **k):
                tensor = a[0] if isinstance(a[0], torch.Tensor) else a[0][0]
                calls.append(f"{_name}:{tensor.device.type}")
                return _real(*a, **k)
            setattr(dist, name, counting)
    devices = set()
    for bucket in iter_hf_weights(model, bucket_bytes=bucket_bytes):
        devices.update(str(t.device.type) for _, t in bucket)
        buckets += 1
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        if size > bucket_bytes:
            assert len(bucket) == 1, "only a lone oversized tensor may exceed the bucket"
            oversized += 1
        for name, t in bucket:
            seen.append(name)
            if name not in reference or not torch.equal(reference[name], t.cpu()):
                mismatched.append(name)
    result.update(exported=seen, mismatched=mismatched, oversized=oversized, buckets=buckets,
                  reference=sorted(reference), collectives=calls, devices=sorted(devices),
                  platform_device=platform.device().type)
    save_model(model, opts.resave)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
