"""Weight-sync benchmark: the policy's weights into a rollout engine, through the one name mapping.

Builds the policy (Megatron-Core, this process's TP/PP stage) and an ``hf`` engine for a model
config, then times ``engine.load_weights(iter_hf_weights(policy))``: the gather into HF layout
(TP all-gather, PP broadcast, QKV and gate/up splits) and the copy into the engine. Weights are
random; after each sync one tensor per bucket is checked against a fresh export.

    python tools/bench_sync.py --model qwen2_5_vl_7b                  # one GPU
    torchrun --nproc-per-node 2 tools/bench_sync.py --model qwen2_5_vl_7b --tp 2
    python tools/bench_sync.py --model tiny                           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result here")
    opts = parser.parse_args()

    from megatron_vr1 import platform
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import build_offline_tokenizer, build_toy_tokenizer, load_tokenizer
    from megatron_vr1.models.qwen2_5_vl import build_model
    from megatron_vr1.rl.rollout import make_engine

    platform.init_distributed(opts.tp, opts.pp)
    args, layout = model_from_conf(load_model_conf(opts.model))
    layout.tensor_parallel, layout.pipeline_parallel, layout.sequence_parallel = opts.tp, opts.pp, False
    dtype = torch.bfloat16 if platform.has_cuda() else torch.float32
    rank = torch.distributed.get_rank()
    policy = build_model(args, layout, dtype=dtype, backend="local")
    with tempfile.TemporaryDirectory() as tmp:
        make_tok = build_toy_tokenizer if opts.model == "toy" else build_offline_tokenizer
        tokenizer = load_tokenizer(make_tok(Path(tmp) / "tokenizer"))
    # the engine lives on the rank that generates (TP and PP rank 0), as in the trainer
    engine = make_engine("hf", args, tokenizer, dtype=dtype) if rank == 0 else None
    bucket_bytes = opts.bucket_mb << 20
    n_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    totals = torch.tensor([float(n_bytes)], device=platform.device())
    torch.distributed.all_reduce(totals)

    times = []
    for _ in range(opts.repeats + 1):  # the first warms the allocator up
        platform.synchronize()
        torch.distributed.barrier()
        start = time.perf_counter()
        buckets = iter_hf_weights(policy, bucket_bytes)
        if engine is not None:
            engine.load_weights(buckets)
        else:
            for _ in buckets:
                pass
        platform.synchronize()
        times.append(time.perf_counter() - start)
    checked = 0
    for bucket in iter_hf_weights(policy, bucket_bytes):
        if engine is not None:
            name, tensor = bucket[0]
            if not torch.equal(engine._params[name], tensor):
                raise SystemExit(f"weight sync: {name} differs from the policy's export")
            checked += 1
    if rank == 0:
        t = statistics.median(times[1:])
        gb = float(totals[0]) / 1e9
        device = torch.cuda.get_device_name() if platform.has_cuda() else "CPU"
        print(f"{opts.model} ({gb:.1f} GB of weights), TP={opts.tp} PP={opts.pp}, {opts.bucket_mb} MiB buckets, "
              f"{device}: sync {t:.3f} s median of {opts.repeats} ({gb / t:.1f} GB/s); {checked} buckets checked")
        if opts.json:
            Path(opts.json).write_text(json.dumps(dict(model=opts.model, device=device, tp=opts.tp, pp=opts.pp,
                                                       weights_gb=gb, seconds=t, buckets_checked=checked), indent=1))
    platform.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
