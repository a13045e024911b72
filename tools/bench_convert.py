#!/usr/bin/env python3
"""Benchmark tools/convert.py on a generated checkpoint with Qwen2.5-VL-7B layer shapes.

Writes a random bf16 HF checkpoint (the full 7B ViT, 7B-shaped embeddings and LM head, and
--layers 7B decoder layers), then times, each in its own process so peak RSS is its own:
copying the safetensors bytes, hf-to-mcore and mcore-to-hf. Prints a Markdown table.

  python tools/bench_convert.py --workdir /tmp/convert-bench --layers 4
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(hf_dir: Path, layers: int) -> tuple[int, int]:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from megatron_vr1.checkpoint.convert import expected_hf_shapes
    from megatron_vr1.config import load_model_conf
    from megatron_vr1.models.qwen2_5_vl import Qwen25VLArgs

    hf_config = OmegaConf.to_container(load_model_conf("qwen2_5_vl_7b").hf_config)
    hf_config["num_hidden_layers"] = layers
    args = Qwen25VLArgs.from_hf_config(hf_config)
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(args.to_hf_config() | {"torch_dtype": "bfloat16"}))
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, total, largest, n = {}, 0, {}, 0, 0, 0
    for name, shape in expected_hf_shapes(args).items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        total, largest = total + nbytes, max(largest, nbytes)
        if shard and size + nbytes > (1 << 30):
            n += 1
            save_file(shard, str(hf_dir / f"model-{n:05d}.safetensors"))
            weight_map.update(dict.fromkeys(shard, f"model-{n:05d}.safetensors"))
            shard, size = {}, 0
        shard[name], size = t, size + nbytes
    n += 1
    save_file(shard, str(hf_dir / f"model-{n:05d}.safetensors"))
    weight_map.update(dict.fromkeys(shard, f"model-{n:05d}.safetensors"))
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total, largest


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("could not attribute peak RSS: run each measurement in a fresh parent")
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/convert-bench")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--stage", choices=["all", "copy", "hf-to-mcore", "mcore-to-hf"], default="all")
    opts = parser.parse_args()
    work = Path(opts.workdir)
    convert = [sys.executable, str(ROOT / "tools" / "convert.py")]

    if opts.stage != "all":  # one measurement per process, so that ru_maxrss is that child's alone
        cmds = {
            "copy": [sys.executable, "-c", f"import shutil; shutil.copytree({str(work / 'hf')!r}, {str(work / 'copy')!r})"],
            "hf-to-mcore": convert + ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore"), "--tp", "2"],
            "mcore-to-hf": convert + ["mcore-to-hf", "--mcore", str(work / "mcore"), "--out", str(work / "back")],
        }
        print(json.dumps(timed(cmds[opts.stage])))
        return

    shutil.rmtree(work, ignore_errors=True)
    total, largest = generate(work / "hf", opts.layers)
    rows = {}
    for stage in ("copy", "hf-to-mcore", "mcore-to-hf"):
        out = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--stage", stage],
                             check=True, capture_output=True, text=True).stdout
        rows[stage] = json.loads(out.strip().splitlines()[-1])
    copy_s = rows["copy"][0]
    print(f"checkpoint: {total / 2**30:.2f} GiB bf16, largest tensor {largest / 2**30:.2f} GiB, "
          f"{opts.layers} LM layers of Qwen2.5-VL-7B shape + its ViT")
    print("| step | seconds | x copy time | peak RSS (GiB) |")
    print("| --- | --- | --- | --- |")
    for stage, (seconds, rss) in rows.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / copy_s:.2f} | {rss:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
