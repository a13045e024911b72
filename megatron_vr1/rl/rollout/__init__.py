"""Rollout engines behind one interface: prompts in, ``n`` completions per prompt out.

    engine = make_engine("hf", args, tokenizer)         # or "vllm" on GPU
    engine.load_weights(iter_hf_weights(policy))         # after every policy update
    outs = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=4096, temperature=1.0, seed=s))
"""

from .base import Completion, RolloutEngine, SamplingParams, make_engine

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_engine"]
