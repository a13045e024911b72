"""Convert Qwen2.5-VL checkpoints between Hugging Face and Megatron-Core, and check the result.

  hf-to-mcore  HF folder (config.json + safetensors)  ->  Megatron-Core distributed checkpoint
  mcore-to-hf  Megatron-Core distributed checkpoint    ->  HF folder for transformers / vLLM
  verify       both folders -> max logit difference on a fixed text+image prompt

The Megatron checkpoint stores global tensors, so one written for a TP/PP layout loads at any
other; --tp/--pp choose the vocab padding and record the intended layout. Tensors stream one at
a time (peak memory ~ the largest tensor), and an output folder appears only when complete.

Examples:
  python -m megatron_vr1.cli.convert hf-to-mcore --hf Qwen2.5-VL-7B-Instruct --out ckpt/7b --tp 2
  python -m megatron_vr1.cli.convert mcore-to-hf --mcore ckpt/7b-sft --out export/7b-sft
  python -m megatron_vr1.cli.convert verify --hf export/7b-sft --mcore ckpt/7b-sft
"""

from __future__ import annotations

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

import argparse
import math
import sys
import time


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> Megatron-Core distributed checkpoint")
    h2m.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    h2m.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    h2m.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size the checkpoint is laid out for")
    h2m.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    h2m.add_argument("--first-stage-layers", type=int, default=None,
                     help="LM layers on the first pipeline stage (which also holds the ViT)")
    h2m.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                     help="auto (default): keep the checkpoint's own dtype; otherwise cast every tensor")
    h2m.add_argument("--vocab-divisible-by", type=positive_int, default=1,
                     help="pad the vocab to a multiple of this x TP (1: pad only if TP needs it)")
    h2m.add_argument("--overwrite", action="store_true")

    m2h = sub.add_parser("mcore-to-hf", help="Megatron-Core distributed checkpoint -> Hugging Face folder")
    m2h.add_argument("--mcore", required=True, help="Megatron checkpoint folder (any TP/PP)")
    m2h.add_argument("--out", required=True, help="HF folder to create")
    m2h.add_argument("--hf-config", default=None,
                     help="HF folder whose config must match and whose tokenizer/processor files to copy")
    m2h.add_argument("--max-shard-size-gb", type=float, default=2.0)
    m2h.add_argument("--overwrite", action="store_true")

    ver = sub.add_parser("verify", help="max logit difference between a HF folder and a Megatron checkpoint")
    ver.add_argument("--hf", required=True)
    ver.add_argument("--mcore", required=True)
    ver.add_argument("--tolerance", type=float, default=None,
                     help="exit 1 if the difference exceeds this (a NaN or inf difference always does)")

    opts = parser.parse_args(argv)
    from megatron_vr1.checkpoint import CheckpointError
    from megatron_vr1.models.qwen2_5_vl import ConfigError
    from megatron_vr1.errors import UsageError

    try:
        return run(opts)
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, UsageError) as e:
        print(f"convert {opts.command}: error: {e}", file=sys.stderr)  # a user error: one line, exit 2
        return 2


def run(opts: argparse.Namespace) -> int:
    from megatron_vr1.checkpoint import hf_to_mcore, mcore_to_hf, verify
    from megatron_vr1.training.checkpoint import resolve_checkpoint

    start = time.perf_counter()
    if getattr(opts, "mcore", None):  # a run directory: its newest complete checkpoint
        opts.mcore = str(resolve_checkpoint(opts.mcore, "--mcore"))
    if opts.command == "hf-to-mcore":
        info = hf_to_mcore(opts.hf, opts.out, tensor_parallel=opts.tp, pipeline_parallel=opts.pp,
                           num_layers_in_first_pipeline_stage=opts.first_stage_layers, dtype=opts.dtype,
                           make_vocab_size_divisible_by=opts.vocab_divisible_by, overwrite=opts.overwrite)
        print(f"wrote {opts.out}: {info['tensors']} HF tensors ({info['dtype']}), vocab padded to "
              f"{info['padded_vocab_size']}, "
              f"{time.perf_counter() - start:.1f}s")
    elif opts.command == "mcore-to-hf":
        info = mcore_to_hf(opts.mcore, opts.out, hf_config=opts.hf_config,
                           max_shard_bytes=int(opts.max_shard_size_gb * 2**30), overwrite=opts.overwrite)
        print(f"wrote {opts.out}: {info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB, "
              f"{time.perf_counter() - start:.1f}s")
    else:
        diff = verify(opts.hf, opts.mcore)
        print(f"max |logit difference| = {diff:.3e}")
        if not math.isfinite(diff):
            print("the logits are not finite (NaN or inf in one of the checkpoints)", file=sys.stderr)
            return 1
        if opts.tolerance is not None and diff > opts.tolerance:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
