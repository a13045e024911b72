"""Rollout engines behind one interface: prompts in, ``n`` completions per prompt out.

    engine = make_engine("hf", args, tokenizer)         # or "vllm" on GPU
    engine.sync_from(policy, bucket_bytes)               # after every policy update (every rank)
    engine = make_engine("megatron", args, tokenizer, policy=policy)  # megatron-core's loop on the policy itself
    outs = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=4096, temperature=1.0, seed=s))
"""

from .base import Completion, RolloutEngine, SamplingParams, make_engine

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_engine"]
