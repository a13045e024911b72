#!/usr/bin/env python3
"""GRPO loss forward+backward: our Triton kernel vs the torch reference (eager and
torch.compile) vs Liger-Kernel's ``triton_grpo_loss``, at Qwen's vocab (152064).

Reports per implementation: time (ms, fwd+bwd), peak extra memory (GiB, above the inputs), and
achieved bandwidth as a fraction of the device's, counting the bytes a fused fwd+bwd must move
(read the logits twice, write their gradient once). Prints a Markdown table with the device.

  python kernels/bench/bench_grpo_loss.py                       # on a GPU: T in {4K, 16K, 64K}
  python kernels/bench/bench_grpo_loss.py --configs 2048x4 4096x8 8192x16   # tune block x warps
  python kernels/bench/bench_grpo_loss.py --tokens 64 --vocab 4096 --no-compile   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch

if not torch.cuda.is_available():  # a CPU smoke run: Triton's interpreter, chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

# HBM bandwidth (bytes/s) by device name fragment; pass --peak-bw to override.
PEAK_BW = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
           "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.555e12}


def device_peak_bw(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def make_inputs(t: int, v: int, device: str, seed: int = 0):
    """``t`` tokens to score, as a causal LM produces them: logits have t+1 rows, and row t+1
    predicts nothing (label -100, masked). Every implementation takes the whole logits tensor, as
    it would straight from the output layer: a slice would make autograd write a zero-filled copy
    of the gradient (SliceBackward), which would dominate the time and memory measured."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(t + 1, v, device=device, generator=g).mul_(2).to(torch.bfloat16)
    labels = torch.randint(0, v, (t + 1,), device=device, generator=g)
    labels[-1] = -100
    old = -torch.rand(t + 1, device=device, generator=g) * 5
    ref = old + 0.05 * torch.randn(t + 1, device=device, generator=g)
    adv = torch.randn(t + 1, device=device, generator=g)
    mask = torch.rand(t + 1, device=device, generator=g) > 0.1
    mask[-1] = False
    return logits, labels, old, ref, adv, mask


def implementations(compile_ref: bool, configs: list[tuple[int, int]]) -> dict[str, Callable]:
    from megatron_vr1.kernels import fused_grpo_loss, grpo_loss

    kw = dict(temperature=1.0, clip_low=0.2, clip_high=0.28, kl_beta=0.04)

    def ours(inplace, block, warps):
        def run(logits, labels, old, ref, adv, mask):
            # the kernel wrappers read the launch config at call time
            fused_grpo_loss.BLOCK_V, fused_grpo_loss.NUM_WARPS = block, warps
            loss, _, _ = grpo_loss(logits, labels, old, ref, adv, mask, backend="triton",
                                   inplace_backward=inplace, **kw)
            return (loss.sum() / mask.sum()).backward()
        return run

    def reference(logits, labels, old, ref, adv, mask):
        loss, _, _ = grpo_loss(logits, labels, old, ref, adv, mask, backend="torch", **kw)
        return (loss.sum() / mask.sum()).backward()

    impls = {}
    for block, warps in configs:
        tag = "" if len(configs) == 1 else f" {block}x{warps}"
        impls[f"triton (ours{tag})"] = ours(False, block, warps)
        impls[f"triton (ours{tag}, in-place grad)"] = ours(True, block, warps)
    impls["torch eager"] = reference
    if compile_ref:
        from megatron_vr1.kernels import reference as ref_mod

        compiled = torch.compile(ref_mod.grpo_loss, dynamic=False)

        def reference_compiled(logits, labels, old, ref, adv, mask):
            loss, _, _ = compiled(logits, labels, old, ref, adv, mask, **kw)
            return (loss.sum() / mask.sum()).backward()

        impls["torch.compile"] = reference_compiled
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(logits, labels, old, ref, adv, mask):
            # Liger takes [B, L+1, V] logits and one advantage per sequence (B=1 here)
            out = triton_grpo_loss(logits[None], old[None, :-1], ref[None, :-1], labels[None, :-1], adv[:1],
                                   mask[None, :-1].contiguous(),
                                   temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=True)
            loss = out[0] if isinstance(out, tuple) else out
            loss.sum().backward()

        impls["liger triton_grpo_loss (in-place)"] = liger
    except ImportError:
        pass
    return impls


def measure(fn: Callable, inputs, iters: int, device: str) -> tuple[float, float]:
    logits = inputs[0]
    cuda = device == "cuda"
    times = []
    for i in range(iters + 1):
        x = logits.detach().clone().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn(x, *inputs[1:])
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first call compiles / autotunes
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        del x
    times.sort()
    return times[len(times) // 2] * 1e3, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    from megatron_vr1.kernels import fused_grpo_loss
    from megatron_vr1.kernels.compile_check import parse_launch_config

    parser.add_argument("--configs", type=parse_launch_config, nargs="+", default=None, metavar="BLOCKxWARPS",
                        help="launch configs of our kernel to compare (default: the shipped one)")
    parser.add_argument("--peak-bw", type=float, default=None, help="device memory bandwidth in bytes/s")
    parser.add_argument("--json", default=None, help="also write the rows here (tools/gpu_bench.sh reads them)")
    opts = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (not a GPU figure)"
    peak_bw = opts.peak_bw or (device_peak_bw(name) if device == "cuda" else None)
    print(f"device: {name}; vocab {opts.vocab}; bf16 logits; median of {opts.iters} fwd+bwd")
    print("| tokens | implementation | ms | peak extra GiB | GB/s | of peak bandwidth |")
    print("| --- | --- | --- | --- | --- | --- |")
    configs = opts.configs or [(fused_grpo_loss.BLOCK_V, fused_grpo_loss.NUM_WARPS)]
    impls = implementations(not opts.no_compile, configs)
    rows = []
    for t in opts.tokens:
        inputs = make_inputs(t, opts.vocab, device)
        moved = 3 * t * opts.vocab * inputs[0].element_size()  # read logits twice, write the gradient once
        for label, fn in impls.items():
            try:
                ms, peak = measure(fn, inputs, opts.iters, device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # torch.compile's autotuner raises others
                oom = "out of memory" in str(e).lower()
                print(f"| {t} | {label} | {'OOM' if oom else 'error: ' + str(e).splitlines()[0][:80]} | | | |")
                rows.append(dict(tokens=t, implementation=label, error="OOM" if oom else str(e).splitlines()[0]))
                torch.cuda.empty_cache()
                continue
            gbs = moved / (ms / 1e3) / 1e9
            frac = f"{moved / (ms / 1e3) / peak_bw:.0%}" if peak_bw else "n/a"
            print(f"| {t} | {label} | {ms:.2f} | {peak:.2f} | {gbs:.0f} | {frac} |")
            rows.append(dict(tokens=t, implementation=label, ms=ms, peak_extra_gib=peak, gb_per_s=gbs,
                             bandwidth_fraction=moved / (ms / 1e3) / peak_bw if peak_bw else None))
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(device=name, vocab=opts.vocab, peak_bw=peak_bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
