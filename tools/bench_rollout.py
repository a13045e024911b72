#!/usr/bin/env python3
"""Generation throughput of the rollout engines on one process: ``megatron`` (megatron-core's
generation loop on the policy itself), ``hf`` (transformers' generate on a synced copy) and a
no-cache loop (the Megatron model's full forward over the whole sequence for every new token).

    python tools/bench_rollout.py [--model toy] [--prompts 16] [--max-new-tokens 64] [--repeats 3]

Random weights (spread so that decoding does not collapse onto one token), greedy decoding, no
stop strings: every sequence generates ``--max-new-tokens`` tokens. Prompts alternate text-only
and image ones. Reports generated tokens per second (best of ``--repeats``, after a warm-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the engine tests' prompts and weight spread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy", help="conf/model/<name>.yaml (toy: the 512-token tokenizer)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["megatron", "hf", "no-cache"])
    opts = parser.parse_args()

    from megatron_vr1 import platform
    from megatron_vr1.checkpoint import iter_hf_weights
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import build_offline_tokenizer, build_toy_tokenizer, load_tokenizer
    from megatron_vr1.models.qwen2_5_vl import build_model
    from megatron_vr1.rl.rollout import SamplingParams, make_engine
    from megatron_vr1.rl.rollout.base import VISION_TOKENS
    from test_megatron_engine import engine_prompts, spread_weights

    import tempfile

    platform.init_distributed(1, 1)
    args, layout = model_from_conf(load_model_conf(opts.model))
    dtype = torch.bfloat16 if platform.has_cuda() else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        build = build_toy_tokenizer if args.vocab_size <= 512 else build_offline_tokenizer
        tokenizer = load_tokenizer(build(Path(tmp)))
    model = build_model(args, layout, backend="local", dtype=dtype)
    if platform.has_cuda():
        model = model.cuda()
    spread_weights(model)
    prompts = [engine_prompts(args, tokenizer)[i % 4] for i in range(opts.prompts)]
    params = SamplingParams(n=1, max_new_tokens=opts.max_new_tokens, temperature=0, stop=())
    device = platform.device()
    print(f"{opts.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"{opts.prompts} prompts x {opts.max_new_tokens} new tokens, on {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if platform.has_cuda() else ''}")
    print("| engine | tokens/s | seconds |")
    print("| --- | --- | --- |")
    for name in opts.engines:
        if name == "no-cache":
            blocked = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
            run = lambda: no_cache_greedy(model, args, prompts, opts.max_new_tokens, device, blocked)  # noqa: E731
        else:
            options = {"policy": model} if name == "megatron" else {}
            engine = make_engine(name, args, tokenizer, dtype=dtype, max_batch=opts.prompts, **options)
            if name == "hf":
                engine.load_weights(iter_hf_weights(model))
            run = lambda engine=engine: sum(len(g[0].token_ids) for g in engine.generate(prompts, params))  # noqa: E731
        run()  # warm-up
        best = None
        for _ in range(opts.repeats):
            platform.synchronize()
            start = time.perf_counter()
            tokens = run()
            platform.synchronize()
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        print(f"| {name} | {tokens / best:.0f} | {best:.3f} |", flush=True)
    platform.shutdown_distributed()


@torch.no_grad()
def no_cache_greedy(model, args, prompts, new_tokens: int, device, blocked: list[int]) -> int:
    """Greedy decoding by a full forward of every sequence so far, for each new token (left
    padding, M-RoPE ids recomputed from the whole sequence each time; vision tokens never chosen,
    as the engines do)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_vr1.data.batch import collate_padded

    batch = collate_padded(prompts, 0, args, side="left")
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    pixels = None if batch.pixel_values is None else batch.pixel_values.to(device)
    model.eval()
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=batch.image_grid_thw)
        last = gather_from_tensor_model_parallel_region(logits[:, -1])[:, :args.vocab_size]
        nxt = last.index_fill(1, torch.tensor(blocked, device=last.device), float("-inf")).argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    model.train()
    return len(prompts) * new_tokens


if __name__ == "__main__":
    main()
