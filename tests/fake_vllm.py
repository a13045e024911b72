"""A stand-in for the ``vllm`` package, following the semantics vLLM documents for what the RL
adapter uses (vLLM itself is CUDA-only and cannot be installed where the tests run):

* ``LLM.sleep(level=1)`` offloads the weights to a CPU backup and discards the KV cache;
  ``wake_up`` restores the weights *from that backup*. ``sleep(level=2)`` discards both; waking
  the weights re-allocates them with undefined contents (NaN here). While asleep the weights'
  memory is released: a load written there is lost when the memory is re-allocated.
* ``wake_up(tags=None)`` wakes everything; ``tags=["weights"]`` or ``["kv_cache"]`` one part.
* Generation needs weights and KV cache awake. The prefix cache keeps a prompt's result computed
  with the weights of the time until ``reset_prefix_cache()``.

The "model" has one parameter per Hugging Face name it is given; each prompt's completion is a
token derived from the weights (``token_of``), so a test sees which weights generated it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch


def token_of(weights: dict) -> int:
    """The token the fake model generates: a function of the sum of its weights (NaN: -1)."""
    total = sum(float(w.double().sum()) for w in weights.values())
    return -1 if total != total else 100 + int(round(total * 1000)) % 1000


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    include_stop_str_in_output: bool = False
    stop_token_ids: list = field(default_factory=list)
    logprobs: Optional[int] = None


class _Model:
    def __init__(self, shapes: dict) -> None:
        self.params = {name: torch.zeros(shape) for name, shape in shapes.items()}

    def load_weights(self, weights) -> set:
        loaded = set()
        for name, tensor in weights:
            self.params[name].copy_(tensor)  # into whatever memory backs the parameter now
            loaded.add(name)
        return loaded


class LLM:
    shapes: dict = {}  # set by the test: the parameters the fake model has
    instances: list = []

    def __init__(self, model: str, *, enable_sleep_mode: bool = False, **options) -> None:
        self.options = dict(options, model=model, enable_sleep_mode=enable_sleep_mode)
        self.model = _Model(self.shapes)
        self.asleep = {"weights": False, "kv_cache": False}
        self.level = 0
        self.backup: Optional[dict] = None
        self.prefix_cache: dict = {}
        self.mm_cache_resets = 0
        self.calls: list = []
        # the V0 engine's path to the model, which older adapters load through
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.model))))
        LLM.instances.append(self)

    # ---- sleep mode
    def sleep(self, level: int = 1) -> None:
        assert self.options["enable_sleep_mode"], "sleep mode was not enabled"
        self.calls.append(("sleep", level))
        self.level = level
        self.backup = {k: v.clone() for k, v in self.model.params.items()} if level == 1 else None
        self.asleep = {"weights": True, "kv_cache": True}
        self.prefix_cache.clear()  # the KV cache is discarded at either level
        # the weights' device memory is released: what is written there now is lost on wake-up
        self.model.params = {k: torch.full_like(v, float("nan")) for k, v in self.model.params.items()}

    def wake_up(self, tags: Optional[list] = None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        tags = list(tags) if tags else ["weights", "kv_cache"]
        if "weights" in tags and self.asleep["weights"]:
            if self.level == 1:
                self.model.params = {k: v.clone() for k, v in self.backup.items()}
            else:  # re-allocated, contents undefined
                self.model.params = {k: torch.full_like(v, float("nan")) for k, v in self.model.params.items()}
            self.asleep["weights"] = False
        if "kv_cache" in tags:
            self.asleep["kv_cache"] = False

    # ---- weights and caches
    def apply_model(self, func):
        self.calls.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        self.prefix_cache.clear()
        return True

    def reset_mm_cache(self) -> None:
        self.calls.append(("reset_mm_cache",))
        self.mm_cache_resets += 1

    # ---- generation
    def generate(self, prompts, params: SamplingParams, use_tqdm: bool = True):
        if self.asleep["weights"] or self.asleep["kv_cache"]:
            raise RuntimeError("generate() on a sleeping engine")
        outputs = []
        for prompt in prompts:
            key = prompt["prompt"]
            if key not in self.prefix_cache:
                self.prefix_cache[key] = token_of(self.model.params)
            token = self.prefix_cache[key]
            logprobs = [{token: types.SimpleNamespace(logprob=-0.5)}] if params.logprobs is not None else None
            outputs.append(types.SimpleNamespace(outputs=[
                types.SimpleNamespace(token_ids=[token], text=str(token), finish_reason="length", logprobs=logprobs)
                for _ in range(params.n)]))
        return outputs
