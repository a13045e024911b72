"""Compile the Triton kernels for a GPU without having one, and read what that GPU would run.

Triton's interpreter, which runs the kernels in the tests on CPU, checks their arithmetic but
not their code generation. This module records the launches the kernel wrappers make on example
inputs (the same arguments, block size and warps as a real call), specialises them the way
Triton's JIT does at launch (dtypes, 16-byte alignment), compiles them with Triton's own LLVM and
ptxas for a chosen architecture (sm_80: A100, sm_90: H100/H200), and reads back per kernel the
registers and the shared and local (spilled) memory per thread, from cuobjdump, and the widths
of the global loads and stores, from the SASS. Nothing here runs a kernel.

    python -m megatron_vr1.kernels.compile_check                 # sm_90 and sm_80, Markdown
    python -m megatron_vr1.kernels.compile_check --configs 2048x4 8192x16 --json

Run it without TRITON_INTERPRET: under the interpreter the kernels are not JIT functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import group_advantage as _adv
from . import fused_grpo_loss as _loss
from . import rmsnorm as _norm
from . import rope as _rope

KERNELS = {"row_stats": _loss._row_stats_kernel, "token_terms": _loss._token_terms_kernel,
           "grad_logits": _loss._grad_logits_kernel, "group_advantage": _adv._group_advantage_kernel,
           "rms_norm": _norm._rms_norm_forward_kernel, "rms_norm_backward": _norm._rms_norm_backward_kernel,
           "rotary": _rope._rope_kernel}
NORM_HIDDEN = 3584  # Qwen2.5-VL-7B's width: not a power of two, so the row block is ragged
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_RESOURCES = re.compile(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)")
_GLOBAL_OP = re.compile(r"\b((LDG|STG)(?:\.[A-Z0-9_]+)*)")


@dataclass(frozen=True)
class Launch:
    name: str
    kernel: JITFunction
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    arch: int
    dtype: str
    block: int
    num_warps: int
    registers: int
    shared_bytes: int
    local_bytes: int  # per thread; anything above 0 is spilled registers
    loads: dict[str, int]  # SASS global-load opcode -> count, e.g. {"LDG.E.128": 2}
    stores: dict[str, int]

    @property
    def widest_load_bits(self) -> int:
        return max((_access_bits(op) for op in self.loads), default=0)

    @property
    def widest_store_bits(self) -> int:
        return max((_access_bits(op) for op in self.stores), default=0)


def _access_bits(opcode: str) -> int:
    """LDG.E.128 -> 128, LDG.E.U16 -> 16, plain LDG.E -> 32."""
    for part in reversed(opcode.split(".")[2:]):
        digits = re.sub(r"^[US]", "", part)
        if digits.isdigit():
            return int(digits)
    return 32


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, launching one of KERNELS records it instead of running it."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not all(isinstance(k, JITFunction) for k in KERNELS.values()):
        raise RuntimeError("compile_check needs the JIT kernels: run it in a process without TRITON_INTERPRET=1")
    launches: list[Launch] = []
    for name, kernel in KERNELS.items():
        # an instance attribute shadows JITFunction.run, which kernel[grid](...) calls
        kernel.run = lambda *args, grid, warmup, _n=name, _k=kernel, **kwargs: launches.append(
            Launch(_n, _k, args, kwargs))
    try:
        yield launches
    finally:
        for kernel in KERNELS.values():
            del kernel.run


def example_launches(dtype: torch.dtype, vocab: int, tokens: int = 64) -> list[Launch]:
    """The launches one GRPO step makes, recorded: advantages; the token ratio's forward (row
    statistics with the per-token algebra in their epilogue); GSPO's (log-probs, then the
    element-wise algebra on the sequence ratio); under TP, the element-wise kernel combining two
    shards' statistics; the gradient, with all three outputs used; and the fused RMSNorm's and
    rotary's forward and backward (the latter one launch, named once)."""
    logits = torch.zeros(tokens, vocab, dtype=dtype)
    labels = torch.zeros(tokens, dtype=torch.int64)
    mask = torch.ones(tokens, dtype=torch.int8)
    per_token = torch.zeros(tokens)
    rewards = torch.zeros(16)
    offsets = torch.tensor([0, 8, 16])
    clips = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_beta=0.01, kl_log_ratio_max=20.0, kl_max=10.0)
    with recorded_launches() as launches:
        _adv.group_advantages_triton(rewards, offsets, std="unbiased", eps=1e-6, max_group=8)
        _loss.policy_forward(logits, labels, mask, per_token, per_token, per_token, 1.0, clips,
                             rollout_weights=per_token)
        _loss.policy_forward(logits, labels, mask, per_token, per_token, per_token, 1.0,
                             dict(clips, clip_ratio_c=None), sequence=torch.zeros(tokens, dtype=torch.int64),
                             num_sequences=1)
        out = dict(zip(("lse", "logp", "loss", "k3", "dloss", "dk3"), torch.zeros(6, tokens)))
        _loss._launch_tokens(mask, 2, from_stats=True, terms=True, flags=_loss._terms_flags(clips, None),
                             stats=torch.zeros(2, 3, tokens), old=per_token, ref=per_token, adv=per_token, **out)
        _loss.grad_logits(logits, labels, mask, per_token, (per_token,) * 3, (per_token, per_token), 1.0)
        x = torch.zeros(tokens, NORM_HIDDEN, dtype=dtype, requires_grad=True)
        _norm.RMSNormFunction.apply(x, torch.ones(NORM_HIDDEN, dtype=dtype), 1e-6).sum().backward()
        q = torch.zeros(tokens, 1, 16, 128, dtype=dtype, requires_grad=True)  # the LM's heads: 128 channels
        _rope.RotaryFunction.apply(q, torch.zeros(tokens, 1, 1, 128)).sum().backward()
    # launches of one kernel that differ in what they compute: name them apart
    renamed = {("row_stats", _loss.TERMS): "row_stats+terms", ("rotary", True): "rotary_backward"}
    return [dataclasses.replace(l, name=renamed.get((l.name, l.kwargs.get("OUT", l.kwargs.get("BACKWARD"))), l.name))
            for l in launches]


def compile_launch(launch: Launch, arch: int) -> tuple[Any, dict]:
    """Specialise and compile as the JIT would on an ``sm_<arch>`` device; returns (kernel, options)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    block_arg = next(a for a in ("BLOCK", "BLOCK_HALF") if a in fn.arg_names)  # the row block's width
    block = constexprs.get((fn.arg_names.index(block_arg),), 0)
    return compiled, dict(block=block, num_warps=options.num_warps)


def _tool(name: str) -> str:
    tool = getattr(triton.knobs.nvidia, name)
    if tool is None:
        raise RuntimeError(f"Triton ships no {name} on this platform; compile_check needs it")
    return tool.path


def report(launch: Launch, arch: int, dtype: str) -> KernelReport:
    compiled, info = compile_launch(launch, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    found = _RESOURCES.search(usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {launch.name}:\n{usage}")
    registers, shared, local = map(int, found.groups())
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    for op, kind in _GLOBAL_OP.findall(sass):
        table = loads if kind == "LDG" else stores
        table[op] = table.get(op, 0) + 1
    return KernelReport(launch.name, arch, dtype, info["block"], info["num_warps"], registers, shared, local, loads, stores)


def reports(archs: list[int], dtypes: list[str], vocab: int,
            configs: list[tuple[int, int]] | None = None) -> list[KernelReport]:
    """Reports for every (arch, logits dtype, GRPO-loss block x warps) combination."""
    configs = configs or [(_loss.BLOCK_V, _loss.NUM_WARPS)]
    saved = _loss.BLOCK_V, _loss.NUM_WARPS
    out = []
    try:
        for block, warps in configs:
            _loss.BLOCK_V, _loss.NUM_WARPS = block, warps
            for dtype in dtypes:
                for launch in example_launches(DTYPES[dtype], vocab):
                    if launch.name in ("group_advantage", "token_terms") and (dtype != dtypes[0] or (block, warps) != configs[0]):
                        continue  # independent of the logits' dtype and the loss's vocab block size
                    out.extend(report(launch, arch, dtype) for arch in archs)
    finally:
        _loss.BLOCK_V, _loss.NUM_WARPS = saved
    return out


def parse_launch_config(text: str) -> tuple[int, int]:
    """``'4096x8'`` -> (BLOCK, num_warps); an argparse type, also used by kernels/bench."""
    block, _, warps = text.partition("x")
    if not (block.isdigit() and warps.isdigit()):
        raise argparse.ArgumentTypeError(f"a config is BLOCKxWARPS, e.g. 4096x8; got {text!r}")
    return int(block), int(warps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions, e.g. 90 (H100/H200)")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--vocab", type=int, default=152064, help="vocab columns per rank (the local shard)")
    parser.add_argument("--configs", type=parse_launch_config, nargs="+", default=None,
                        help=f"GRPO-loss BLOCKxWARPS to compile (default {_loss.BLOCK_V}x{_loss.NUM_WARPS})")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    opts = parser.parse_args(argv)
    found = reports(opts.arch, opts.dtype, opts.vocab, opts.configs)
    if opts.json:
        for r in found:
            print(json.dumps(dataclasses.asdict(r)))
        return
    print(f"vocab {opts.vocab} per rank; compiled offline with Triton {triton.__version__} (no kernel was run)")
    print("| kernel | sm | logits | block x warps | registers | shared B | spill B | widest load | widest store |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in found:
        print(f"| {r.kernel} | {r.arch} | {r.dtype} | {r.block} x {r.num_warps} | {r.registers} | {r.shared_bytes} "
              f"| {r.local_bytes} | {r.widest_load_bits} bit | {r.widest_store_bits} bit |")


if __name__ == "__main__":
    main()
