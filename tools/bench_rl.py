"""RL benchmarks: reward throughput, and where the time of a GRPO step goes.

    python tools/bench_rl.py reward [--responses 2000] [--workers 1 2 4]
    python tools/bench_rl.py step [--steps 6] [--prompts 16] [--group 8] [--max-response-tokens 64]

``reward`` scores a mix of typical responses with the reward pool at each worker count: right
and wrong answers of every kind the reward tells apart (numbers, fractions, expressions,
multiple-choice letters, word answers and their anagrams, hedges), broken formats and a few
pathological ones. ``step`` runs the real trainer
(``python -m megatron_vr1.rl``) on the demo generator's colour task with the toy model and
reports the median time of each phase (the first step, which warms up, left out).
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
import time
from pathlib import Path

PHASES = ("rollout", "reward", "old_logprobs", "ref_logprobs", "update", "sync")


# (answer as written, gold): each kind of answer the reward tells apart, right and wrong
ANSWER_KINDS = [("5", "5"), ("\\frac{1}{2}", "0.5"), ("x = 3", "3"), ("(B)", "B"), ("12.50", "12.5"),
                ("\\sqrt{8}", "2\\sqrt{2}"), ("7", "8"), ("30^\\circ", "30"), ("-\\frac{3}{4}", "-0.75"),
                ("a+b", "b+a"), ("red", "red"), ("Light Blue", "light blue"), ("erd", "red"), ("C", "B"),
                ("5 or 6", "5"), ("\\pm 4", "4"), ("A or B", "A"), ("6 = 5", "5"), ("\\text{yes}", "Yes")]


def typical_responses(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds = [], []
    for _ in range(n):
        pred, gold = rng.choice(ANSWER_KINDS)
        think = " ".join(rng.choice(("so", "the", "angle", "is", "we", "get", "3", "+", "4")) for _ in range(200))
        r = rng.random()
        if r < 0.1:
            text = f"{think} <answer> {pred} </answer>"  # broken format
        elif r < 0.12:
            text = f"<think> {think} </think><answer> Final Answer: 9^{{9^{{9}}}} </answer>"  # pathological
        else:
            text = f"<think> {think} </think><answer> Final Answer: {pred} </answer>"
        responses.append(text)
        golds.append(gold)
    return responses, golds


def bench_reward(opts) -> None:
    from megatron_vr1.rl.reward import RewardPool

    responses, golds = typical_responses(opts.responses)
    print(f"{opts.responses} responses (~200-word think; {len(ANSWER_KINDS)} answer kinds: numbers, fractions, "
          f"expressions, letters, words, anagrams, hedges; 10% broken format, 2% pathological):")
    print("| workers | responses/s |")
    print("| --- | --- |")
    for workers in opts.workers:
        with RewardPool(workers=workers) as pool:  # forks warm: nothing to warm up here
            start = time.perf_counter()
            pool.score(responses, golds)
            print(f"| {workers} | {opts.responses / (time.perf_counter() - start):.0f} |")


def bench_step(opts) -> None:
    from megatron_vr1.data import build_offline_tokenizer, build_toy_tokenizer
    from megatron_vr1.data.demo import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", n_sft=0, n_rl=max(64, opts.prompts), n_eval=0, seed=0, kinds=("colour",))
        tokenizer = (build_toy_tokenizer if opts.model == "toy" else build_offline_tokenizer)(tmp / "tokenizer")
        stages = f"[{{max_response_tokens: {opts.max_response_tokens}, group_size: {opts.group}, steps: {opts.steps}}}]"
        cmd = [sys.executable, "-m", "megatron_vr1.rl", f"data.train={tmp / 'data' / 'rl.jsonl'}",
               f"tokenizer={tokenizer}", f"checkpoint.dir={tmp / 'run'}", f"rl.stages={stages}",
               f"rl.rollout.prompts_per_step={opts.prompts}", "rl.mini_batches=1", "data.max_prompt_tokens=128",
               f"rl.micro_batch_tokens={max(1024, 128 + opts.max_response_tokens)}", "metrics.tensorboard=false",
               f"checkpoint.every={opts.steps + 1}", "checkpoint.at_end=false", "data.num_workers=0", f"model={opts.model}", *opts.overrides]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        steps = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    total = statistics.median(s["time_step"] for s in steps)
    gen = statistics.median(s.get("rollout_tokens_per_s", 0.0) for s in steps)
    print(f"{opts.model} model, {opts.prompts} prompts x {opts.group} rollouts of up to {opts.max_response_tokens} "
          f"tokens, median of {len(steps)} steps after the first: {total:.2f} s per step, "
          f"generation {gen:.0f} tokens/s")
    print("| phase | seconds | share |")
    print("| --- | --- | --- |")
    for phase in PHASES:
        t = statistics.median(s.get(f"time_{phase}", 0.0) for s in steps)
        print(f"| {phase} | {t:.3f} | {100 * t / total:.0f}% |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(
            model=opts.model, trainer_overrides=cmd[3:], time_step=total, rollout_tokens_per_s=gen,
            phases={p: statistics.median(s.get(f"time_{p}", 0.0) for s in steps) for p in PHASES},
            memory_peak_gb=max((s["memory_peak_gb"] for s in steps if "memory_peak_gb" in s), default=None)),
            indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    reward = sub.add_parser("reward")
    reward.add_argument("--responses", type=int, default=2000)
    reward.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    step = sub.add_parser("step")
    step.add_argument("--steps", type=int, default=6)
    step.add_argument("--prompts", type=int, default=16)
    step.add_argument("--group", type=int, default=8)
    step.add_argument("--max-response-tokens", type=int, default=64)
    step.add_argument("--model", default="toy")
    step.add_argument("--json", default=None, help="also write the medians and the peak memory here")
    step.add_argument("overrides", nargs="*", help="more Hydra overrides for the trainer")
    opts = parser.parse_args()
    (bench_reward if opts.what == "reward" else bench_step)(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
