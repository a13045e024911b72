"""Rollout with vLLM, colocated in the trainer's torchrun processes (a GPU extra).

NOT YET RUN on a real vLLM: its wheels are CUDA-only and pin another torch, so it cannot be
installed on the machines this project is tested on. It is written against vLLM's documented
public API and checked against a fake ``vllm`` module that follows those documented semantics
(``tests/test_vllm_contract.py``): ``LLM`` with ``distributed_executor_backend="external_launcher"``
(every torchrun rank of a data-parallel replica runs it, SPMD) and sleep mode around training.

The RL weight-update order, which sleep mode makes easy to get wrong:

* ``sleep()`` puts vLLM to sleep at **level 2**: weights and KV cache are discarded. (Level 1
  keeps a CPU backup of the weights and *restores it on wake-up*: weights loaded while asleep at
  level 1 are overwritten by the old ones, or written into released memory.)
* ``load_weights()`` wakes only the weights (``wake_up(tags=["weights"])``), loads the new ones
  into the live model, then resets the prefix cache and the multimodal cache, so no response is
  generated from a stale prompt's KV blocks or a stale image encoding.
* ``wake()`` wakes the KV cache (``wake_up(tags=["kv_cache"])``) for generation. Waking without a
  load since a level-2 sleep is refused: the weights would be garbage.

Loading goes through ``LLM.apply_model`` where the installed vLLM has it (the V1 engine), else
through the V0 driver worker's model; vLLM's ``load_weights`` takes full Hugging Face-named
tensors and shards them for its own TP.
"""

from __future__ import annotations

import inspect
import re
from typing import Iterable, Sequence

from ...data.template import Sample
from .base import END_TOKENS, Completion, RolloutEngine, SamplingParams

_IMAGE_PAD = "<|image_pad|>"
SLEEP_LEVEL = 2  # weights and KV cache discarded while training; the new weights are loaded into a woken model


class VLLMEngine(RolloutEngine):
    spmd = True
    wants_pil_images = True

    def __init__(self, args, tokenizer, *, model_dir: str, tensor_parallel: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 16384, max_images: int = 4,
                 seed: int = 0, enforce_eager: bool = False) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rl.engine=vllm needs vLLM (the `gpu` extra, CUDA only)") from e
        self.args, self.tokenizer = args, tokenizer
        self.end_ids = [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]
        options = dict(model=model_dir, tokenizer=model_dir, tensor_parallel_size=tensor_parallel,
                       distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": max_images}, seed=seed, enforce_eager=enforce_eager)
        if _takes_logprobs_mode(LLM):  # log-probs after temperature: the quantity GRPO compares
            options["logprobs_mode"] = "processed_logprobs"
        # the weights in model_dir only shape the engine; every sync overwrites them
        self.llm = LLM(**options)
        self.weights_awake = self.kv_awake = True
        self.loaded_since_sleep = True

    def _inputs(self, sample: Sample, images) -> dict:
        # vLLM expands each image placeholder itself: give it one <|image_pad|> per image
        text = self.tokenizer.decode(sample.input_ids.tolist(), skip_special_tokens=False)
        text = re.sub(f"(?:{re.escape(_IMAGE_PAD)})+", _IMAGE_PAD, text)
        return {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}

    def generate(self, prompts: Sequence[Sample], params: SamplingParams, images: Sequence[list] = ()) -> list:
        from vllm import SamplingParams as VParams

        if not (self.weights_awake and self.kv_awake):
            raise RuntimeError("the vLLM engine is asleep: call wake() before generate()")
        vparams = VParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                          max_tokens=params.max_new_tokens, seed=params.seed, stop=list(params.stop),
                          include_stop_str_in_output=True, stop_token_ids=self.end_ids, logprobs=0)
        images = list(images) or [[] for _ in prompts]
        outputs = self.llm.generate([self._inputs(p, im) for p, im in zip(prompts, images)], vparams,
                                    use_tqdm=False)
        return [[Completion(list(c.token_ids), c.text, "length" if c.finish_reason == "length" else "stop",
                            _sampled_logprobs(c)) for c in out.outputs] for out in outputs]

    # ---- weights
    def load_weights(self, buckets: Iterable[list]) -> int:
        if not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        count = 0
        for bucket in buckets:
            bucket = list(bucket)
            self._load(bucket)
            count += len(bucket)
        self.loaded_since_sleep = True
        self.llm.reset_prefix_cache()
        resets = [getattr(owner, name) for owner in (self.llm, getattr(self.llm, "llm_engine", None))
                  for name in ("reset_mm_cache", "reset_multimodal_cache") if hasattr(owner, name)]
        if resets:  # the LLM's own where it has one, else its engine's
            resets[0]()
        return count

    def _load(self, bucket: list) -> None:
        if hasattr(self.llm, "apply_model"):  # V1: runs on every worker of this process's engine
            self.llm.apply_model(lambda model: model.load_weights(bucket))
            return
        worker = self.llm.llm_engine.model_executor.driver_worker  # V0
        worker = getattr(worker, "worker", worker)
        worker.model_runner.model.load_weights(bucket)

    # ---- memory
    def sleep(self) -> None:
        self.llm.sleep(level=SLEEP_LEVEL)
        self.weights_awake = self.kv_awake = False
        self.loaded_since_sleep = False

    def wake(self) -> None:
        if not self.loaded_since_sleep:
            raise RuntimeError(f"the vLLM engine slept at level {SLEEP_LEVEL}, which discards its weights: "
                               f"load_weights() (a weight sync) must come before wake()")
        if not self.kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.kv_awake = True


def _sampled_logprobs(completion) -> list[float] | None:
    """The sampled token's log-prob per position (``logprobs=0`` asks vLLM for it alone)."""
    steps = getattr(completion, "logprobs", None)
    if not steps:
        return None
    return [float(step[token].logprob) for token, step in zip(completion.token_ids, steps)]


def _takes_logprobs_mode(llm_class) -> bool:
    """Whether this vLLM takes ``logprobs_mode`` (an engine argument since about 0.10.2)."""
    try:
        if "logprobs_mode" in inspect.signature(llm_class).parameters:
            return True
    except (TypeError, ValueError):
        pass
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    return "logprobs_mode" in getattr(EngineArgs, "__dataclass_fields__", {})
