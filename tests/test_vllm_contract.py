"""The vLLM adapter against a fake ``vllm`` that follows vLLM's documented sleep-mode semantics
(``tests/fake_vllm.py``): every rollout after a weight sync must come from the synced weights.
The order the adapter had before (sleep at level 1, load while asleep, wake everything) fails
here: level 1's wake-up restores the CPU backup over the new weights."""

from __future__ import annotations

import sys

import pytest
import torch

import fake_vllm
from megatron_vr1.data.template import Sample
from megatron_vr1.rl.rollout import SamplingParams, make_engine

SHAPES = {"model.embed_tokens.weight": (4, 3), "lm_head.weight": (4, 3)}


@pytest.fixture
def engine(monkeypatch, tokenizer, args):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(fake_vllm.LLM, "shapes", SHAPES)
    monkeypatch.setattr(fake_vllm.LLM, "instances", [])
    return make_engine("vllm", args, tokenizer, model_dir="unused")


def _weights(value: float) -> dict:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def _buckets(weights: dict) -> list:
    items = list(weights.items())
    return [items[:1], items[1:]]  # two buckets, as iter_hf_weights sends them


def _prompt(tokenizer, text: str) -> Sample:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return Sample(input_ids=ids, loss_mask=torch.zeros(len(ids), dtype=torch.bool),
                  position_ids=torch.arange(len(ids)).expand(3, -1),
                  pixel_values=torch.zeros(0, 1), image_grid_thw=torch.zeros(0, 3, dtype=torch.long))


def test_every_rollout_after_a_sync_uses_the_synced_weights(engine, tokenizer):
    """The trainer's order: sync, then per step wake -> generate -> sleep -> (update) -> sync."""
    prompts = [_prompt(tokenizer, "the same prompt every step")]  # the prefix cache would serve it stale
    params = SamplingParams(n=2, max_new_tokens=4, temperature=1.0, seed=0)
    engine.load_weights(_buckets(_weights(0.1)))
    for step, value in enumerate([0.1, 0.25, 0.5, 0.75]):
        if step:
            engine.load_weights(_buckets(_weights(value)))  # the weight sync after the update
        engine.wake()
        outs = engine.generate(prompts, params)
        engine.sleep()
        expected = fake_vllm.token_of(_weights(value))
        assert [c.token_ids for c in outs[0]] == [[expected]] * 2, f"step {step}: generated with stale weights"
    assert outs[0][0].logprobs == [-0.5]  # the engine's own log-prob of each sampled token
    llm = fake_vllm.LLM.instances[0]
    assert ("sleep", 2) in llm.calls and ("sleep", 1) not in llm.calls
    # after every load: both caches reset; the weights woke before the load, the KV cache after it
    loads = [i for i, c in enumerate(llm.calls) if c[0] == "apply_model"]
    for i in loads[2:]:
        assert llm.calls[i - 1] in (("wake_up", ("weights",)), ("apply_model",))
    assert llm.calls.count(("reset_prefix_cache",)) == 4 and llm.mm_cache_resets == 4
    assert llm.calls.count(("wake_up", ("kv_cache",))) == 3


def test_waking_without_a_sync_after_a_level_2_sleep_is_refused(engine):
    engine.load_weights(_buckets(_weights(0.1)))
    engine.sleep()
    with pytest.raises(RuntimeError, match="load_weights.*before wake"):
        engine.wake()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([], SamplingParams())


def test_the_fake_follows_the_documented_semantics():
    """The fake itself: level 1 restores its backup on wake (a load while asleep is lost), level 2
    discards the weights; tags wake one part."""
    fake = fake_vllm.LLM.__new__(fake_vllm.LLM)
    fake_vllm.LLM.shapes, saved = SHAPES, fake_vllm.LLM.shapes
    try:
        fake.__init__("m", enable_sleep_mode=True)
    finally:
        fake_vllm.LLM.shapes = saved
    fake.model.load_weights(_weights(0.1).items())
    fake.sleep(level=1)
    fake.model.load_weights(_weights(0.5).items())  # the old adapter's order
    fake.wake_up()
    assert fake_vllm.token_of(fake.model.params) == fake_vllm.token_of(_weights(0.1))
    fake.sleep(level=2)
    fake.wake_up(tags=["weights"])
    assert fake_vllm.token_of(fake.model.params) == -1 and fake.asleep["kv_cache"]
    fake.wake_up(tags=["kv_cache"])
    assert not any(fake.asleep.values())
