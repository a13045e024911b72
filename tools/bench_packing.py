#!/usr/bin/env python3
"""How full ``megatron_vr1.data.packing.pack`` packs micro-batches on PTST-like rollout lengths.

Lengths are a prompt (uniform 200-1200 tokens, image tokens included) plus a long-tailed response
(log-normal, capped at the stage's generation budget), for PTST's stages. Prints a Markdown table
of the fill ratio (tokens / token budget of the micro-batches used).

  python tools/bench_packing.py
"""

from __future__ import annotations

import random
import time

from megatron_vr1.data.packing import balance, fill_ratio, pack, pack_balanced

STAGES = {"PTST stage 1 (4K x 16)": (4096, 16), "PTST stage 2 (8K x 8)": (8192, 8), "stage 3 (16K x 4)": (16384, 4)}


def lengths(budget: int, n: int, rng: random.Random) -> list[int]:
    mu = 6.0 + 0.5 * (budget // 4096).bit_length()  # longer budgets, longer typical replies
    return [rng.randint(200, 1200) + min(budget, int(rng.lognormvariate(mu, 0.9))) for _ in range(n)]


def main() -> None:
    rng = random.Random(0)
    print("| rollouts | max_tokens per micro-batch | samples | fill | bins | DP=8 spread (balance) "
          "| fill, DP=8 spread (pack_balanced) | pack time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (budget, group) in STAGES.items():
        ls = lengths(budget, 128 * group, rng)  # 128 prompts x group size per step
        for max_tokens in (16384, 32768):
            if max_tokens < max(ls):
                continue
            start = time.perf_counter()
            bins = pack(ls, max_tokens)
            seconds = time.perf_counter() - start
            spread = _spread(balance(bins, ls, 8), ls)
            even = pack_balanced(ls, max_tokens, 8)
            even_bins = [b for r in even for b in r]
            print(f"| {name} | {max_tokens} | {len(ls)} | {fill_ratio(bins, ls, max_tokens):.2%} | {len(bins)} | "
                  f"{spread:.2%} | {fill_ratio(even_bins, ls, max_tokens):.2%}, {_spread(even, ls):.2%} | "
                  f"{seconds * 1e3:.0f} ms |")


def _spread(ranks: list[list[list[int]]], ls: list[int]) -> float:
    loads = [sum(ls[i] for b in r for i in b) for r in ranks]
    return (max(loads) - min(loads)) / max(loads)


if __name__ == "__main__":
    main()
