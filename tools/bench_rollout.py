#!/usr/bin/env python3
"""Generation throughput and slot utilisation of the rollout engines on one process: the megatron
engine with continuous batching (megatron-core's paged KV cache) and with megatron-core's
static-batch loop, ``hf`` (transformers' generate on a synced copy) and a no-cache loop (the
Megatron model's full forward over the whole sequence for every new token).

    python tools/bench_rollout.py [--model toy] [--prompts 48] [--slots 16] [--max-new-tokens 128]

Random weights (spread so that decoding does not collapse onto one token), no stop strings.
``--lengths long-tail`` (the default) draws response lengths like a reasoning model's: every
engine samples at temperature 1 from the policy with the end token's probability set to
``--end-prob`` at every step (the rest renormalised), so most responses are short and some run
to the budget; ``--lengths fixed`` decodes greedily to the budget. Prompts alternate text-only
and image ones. Reports generated tokens per second (best of ``--repeats``, after a warm-up) and
slot utilisation: generated tokens / (slots x decoding steps), 1.0 when no slot ever idles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the engine tests' prompts and weight spread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy", help="conf/model/<name>.yaml (toy: the 512-token tokenizer)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--slots", type=int, default=16, help="sequences generated at once (max_batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lengths", choices=["long-tail", "fixed"], default="long-tail")
    parser.add_argument("--end-prob", type=float, default=0.03)
    parser.add_argument("--block-size", type=int, default=16, help="KV block of the continuous engine (tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["continuous", "static", "hf"],
                        help="continuous, static, hf, no-cache")
    parser.add_argument("--json", default=None, help="also write the rows here")
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
    tail = opts.lengths == "long-tail"
    params = SamplingParams(n=1, max_new_tokens=opts.max_new_tokens, temperature=1.0 if tail else 0, stop=(),
                            seed=1)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    device = platform.device()
    print(f"{opts.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"{opts.prompts} prompts x {opts.max_new_tokens} new tokens, on {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if platform.has_cuda() else ''}")
    print(f"lengths: {opts.lengths}" + (f" (end token p={opts.end_prob} per step)" if tail else "")
          + f", {opts.slots} slots")
    print("| engine | tokens/s | seconds | slot utilisation | mean / max response |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name in opts.engines:
        if name == "no-cache":
            blocked = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
            run = lambda: no_cache_greedy(model, args, prompts, opts.max_new_tokens, device, blocked)  # noqa: E731
            usage = lambda lengths: ""  # noqa: E731
        else:
            if name in ("continuous", "static"):
                engine = make_engine("megatron", args, tokenizer, dtype=dtype, max_batch=opts.slots, policy=model,
                                     batching=name, block_size=opts.block_size)
                if tail:
                    length_model(engine.controller, end_id, opts.end_prob)
                usage = lambda lengths, engine=engine: f"{engine.last_stats.slot_utilisation:.2f}"  # noqa: E731
            else:
                engine = make_engine(name, args, tokenizer, dtype=dtype, max_batch=opts.slots)
                engine.load_weights(iter_hf_weights(model))
                if tail:
                    hf_length_model(engine, end_id, opts.end_prob)
                usage = lambda lengths: f"{static_utilisation(lengths, opts.slots):.2f}"  # noqa: E731
            run = lambda engine=engine: [len(g[0].token_ids) for g in engine.generate(prompts, params)]  # noqa: E731
        run()  # warm-up
        best = None
        for _ in range(opts.repeats):
            platform.synchronize()
            start = time.perf_counter()
            lengths = run()
            platform.synchronize()
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        tokens = sum(lengths) if isinstance(lengths, list) else lengths
        shape = f"{tokens / len(prompts):.0f} / {max(lengths)}" if isinstance(lengths, list) else "-"
        print(f"| {name} | {tokens / best:.0f} | {best:.3f} | {usage(lengths) or '-'} | {shape} |", flush=True)
        rows.append(dict(engine=name, tokens_per_s=tokens / best, seconds=best,
                         slot_utilisation=float(usage(lengths)) if usage(lengths) else None))
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(model=opts.model, device=str(device), prompts=opts.prompts,
                                                   slots=opts.slots, max_new_tokens=opts.max_new_tokens,
                                                   rows=rows), indent=1))
    platform.shutdown_distributed()


def end_with_probability(logits: torch.Tensor, end_id: int, p: float) -> torch.Tensor:
    """Log-probabilities with the end token at ``p`` and the other tokens' softmax scaled by 1 - p."""
    logp = torch.log_softmax(logits.float().index_fill(-1, torch.tensor([end_id], device=logits.device),
                                                       float("-inf")), dim=-1) + torch.log1p(torch.tensor(-p))
    logp[..., end_id] = torch.log(torch.tensor(p))
    return logp


def length_model(controller, end_id: int, p: float) -> None:
    """The megatron engine's sampler (both batching modes) draws from :func:`end_with_probability`."""
    pick = controller.pick
    controller.pick = lambda logits, *a, **k: pick(end_with_probability(logits, end_id, p), *a, **k)


def hf_length_model(engine, end_id: int, p: float) -> None:
    """transformers' generate draws from :func:`end_with_probability` (a logits processor run first)."""
    generate = engine.model.generate

    def with_lengths(*a, logits_processor=None, **k):
        from transformers import LogitsProcessorList

        first = lambda ids, scores: end_with_probability(scores, end_id, p)  # noqa: E731
        return generate(*a, logits_processor=LogitsProcessorList([first, *(logits_processor or [])]), **k)

    engine.model.generate = with_lengths


def static_utilisation(lengths: list[int], slots: int) -> float:
    """A static-batch loop over batches of ``slots`` rows: each batch steps until its longest ends."""
    batches = [lengths[i:i + slots] for i in range(0, len(lengths), slots)]
    return sum(lengths) / sum(len(b) * max(b) for b in batches) if lengths else 0.0


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
