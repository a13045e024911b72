"""torchrun worker: weight sync from a TP x PP policy into the hf engine, then the engine's token
log-probs against the policy's own (vocab-parallel) forward. Rank 0 writes ``result.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    tokenizer_dir, out, tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    from megatron.core import parallel_state as ps

    from megatron_vr1 import platform
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, build_model
    from megatron_vr1.rl.grpo import CaptureLogprobs, micro_batches
    from megatron_vr1.rl.rollout import make_engine
    from megatron_vr1.training.step import run_micro_batches
    from test_grpo import _sequences

    platform.init_distributed(tp, 1, seed=3)
    args, _ = model_from_conf(load_model_conf("toy"))
    model = build_model(args, ParallelLayout(tensor_parallel=tp), backend="local").eval()
    tok = load_tokenizer(tokenizer_dir)
    leader = torch.distributed.get_rank() == 0
    engine = make_engine("hf", args, tok) if leader else None
    buckets = iter_hf_weights(model, bucket_bytes=1 << 16)
    if engine is not None:
        engine.load_weights(buckets)
    else:
        for _ in buckets:
            pass
    seqs = _sequences(args, tok)
    (batch,) = micro_batches(seqs, args, max_tokens=512, pad_to=1, pad_id=490)
    run_micro_batches(model, [batch], CaptureLogprobs("logp", 1.0), forward_only=True)
    if leader:
        ours, cu, worst = batch.extras["logp"][0], batch.cu_seqlens.tolist(), 0.0
        for i, seq in enumerate(seqs):
            ids = seq.sample.input_ids[None]
            with torch.no_grad():
                logits = engine.model(input_ids=ids, pixel_values=seq.sample.pixel_values,
                                      image_grid_thw=seq.sample.image_grid_thw,
                                      mm_token_type_ids=(ids == args.image_token_id).int()).logits[0]
            rows = slice(cu[i], cu[i + 1])
            theirs = torch.log_softmax(logits.float(), -1).gather(-1, batch.labels[0, rows].clamp(min=0)[:, None])[:, 0]
            keep = batch.loss_mask[0, rows]
            worst = max(worst, (theirs[keep] - ours[rows][keep]).abs().max().item())
        out.write_text(json.dumps({"tp": ps.get_tensor_model_parallel_world_size(), "max_diff": worst,
                                   "tokens": int(batch.loss_mask.sum())}))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
