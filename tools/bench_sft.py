"""SFT step-time benchmark: the real trainer (``python -m megatron_vr1.sft``) on generated data.

Writes synthetic cold-start records (one image per sample, replies of a chosen length), runs the
trainer for a few steps and reports the median step time, its split into data loading,
forward-backward and optimizer, tokens/s and, on a GPU, MFU (vision and language FLOPs).

    python tools/bench_sft.py                                  # tiny model on CPU
    python tools/bench_sft.py --model toy                      # the toy model (512-token vocabulary)
    python tools/bench_sft.py --model qwen2_5_vl_3b --nproc 1 --samples 16 --reply-words 900 \\
        --image 896x672 --global-batch 16 --micro-batch-tokens 16384 --steps 6   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("the", "angle", "triangle", "so", "therefore", "side", "equals", "we", "compute", "area", "is", "of",
         "and", "by", "Pythagoras", "answer", "x", "=", "3", "4", "5", "+", "because", "image", "shows")


def write_data(out: Path, samples: int, reply_words: int, image: tuple[int, int], seed: int) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True)
    records = []
    for i in range(samples):
        img = Image.new("RGB", image, (250, 250, 245))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randrange(image[0]), rng.randrange(image[1])
            draw.ellipse([x, y, x + 40, y + 40], fill=(rng.randrange(256), 90, 160))
        img.save(out / "images" / f"{i}.png")
        reply = " ".join(rng.choice(WORDS) for _ in range(reply_words))
        records.append({"messages": [{"role": "user", "content": "<image>Find x."},
                                     {"role": "assistant", "content": f"<think> {reply} </think><answer> 5 </answer>"}],
                        "images": [f"images/{i}.png"]})
    (out / "sft.json").write_text(json.dumps(records))
    return out / "sft.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--reply-words", type=int, default=120)
    parser.add_argument("--image", default="336x252", help="WxH of each sample's image")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile-step", type=int, default=None,
                        help="profile this step and print where its device time goes")
    parser.add_argument("--json", default=None, help="also write the medians (and the profile's summary) here")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for the trainer")
    opts = parser.parse_args()

    from megatron_vr1.data import build_offline_tokenizer, build_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w, h = (int(x) for x in opts.image.split("x"))
        data = write_data(tmp / "data", opts.samples, opts.reply_words, (w, h), seed=0)
        # the toy model has its own 512-token vocabulary; every other config Qwen's
        tokenizer = (build_toy_tokenizer if opts.model == "toy" else build_offline_tokenizer)(tmp / "tokenizer")
        run = tmp / "run"
        trainer = ["-m", "megatron_vr1.sft", f"model={opts.model}", f"data.train={data}", f"tokenizer={tokenizer}",
                   f"checkpoint.dir={run}", f"train.steps={opts.steps}", f"train.global_batch_size={opts.global_batch}",
                   f"train.micro_batch_tokens={opts.micro_batch_tokens}",
                   f"data.max_tokens={opts.micro_batch_tokens}", f"checkpoint.every={opts.steps + 1}", "checkpoint.at_end=false",
                   "metrics.tensorboard=false", "train.lr=1e-5", *opts.overrides]
        if opts.profile_step:
            trainer.append(f"metrics.profile_step={opts.profile_step}")
        launcher = [sys.executable] if opts.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.nproc}"]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run(launcher + trainer, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            return proc.returncode
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]  # warm-up
        profile = run / "profile" / f"step_{opts.profile_step}.json"
        profile = json.loads(profile.read_text()) if opts.profile_step and profile.exists() else None
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    print(f"model {opts.model}, {opts.nproc} process(es), {opts.global_batch} samples/step of ~{med('tokens') / opts.global_batch:.0f}"
          f" tokens, median of {len(steps)} steps after the first:")
    print("| step (s) | data (s) | forward-backward (s) | optimizer (s) | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    mfu = f"{100 * med('mfu'):.1f}%" if all("mfu" in s for s in steps) else "n/a (CPU)"
    print(f"| {med('time_step'):.2f} | {med('time_data'):.3f} | {med('time_forward_backward'):.2f} | "
          f"{med('time_optimizer'):.3f} | {med('tokens_per_s'):.0f} | {mfu} |")
    if profile is not None:
        print_profile(profile, opts.profile_step)
    if opts.json:
        write_json(opts, steps, profile, trainer[2:])
    return 0


def write_json(opts, steps: list[dict], profile: list[dict] | None, overrides: list[str]) -> None:
    from megatron_vr1.training.profile import host_syncs, time_categories

    med = lambda key: statistics.median(s[key] for s in steps) if all(key in s for s in steps) else None  # noqa: E731
    out = dict(model=opts.model, trainer_overrides=overrides, micro_batch_tokens=opts.micro_batch_tokens,
               global_batch=opts.global_batch, steps=len(steps), tokens_per_step=med("tokens"),
               time_step=med("time_step"), tokens_per_s=med("tokens_per_s"), mfu=med("mfu"),
               memory_peak_gb=max((s["memory_peak_gb"] for s in steps if "memory_peak_gb" in s), default=None),
               profile_seconds=time_categories(profile) if profile is not None else None,
               host_syncs=host_syncs(profile) if profile is not None else None)
    Path(opts.json).write_text(json.dumps(out, indent=1))


def print_profile(entries: list[dict], step: int) -> None:
    from megatron_vr1.training.profile import time_categories

    cats = time_categories(entries)
    total = sum(cats.values())
    if not total:
        print(f"step {step} profile: no device time recorded (CPU run)")
        return
    print(f"\nstep {step}, device time by kind of kernel ({total:.2f} s in all):")
    print("| kind | seconds | share |")
    print("| --- | --- | --- |")
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {t:.3f} | {100 * t / total:.0f}% |")
    print("\nlongest kernels:")
    for e in [e for e in entries if e["kernel"] and e["device_us"] > 0][:15]:
        print(f"  {e['device_us'] / 1e3:9.1f} ms  {e['calls']:6d} x  {e['name'][:110]}")


if __name__ == "__main__":
    sys.exit(main())
