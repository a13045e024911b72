"""Rollout with vLLM, colocated in the trainer's torchrun processes (a GPU extra).

NOT YET RUN: vLLM cannot be installed on the machines this project is tested on (its wheels
are CUDA-only and pin another torch). It is written against vLLM's public API only: ``LLM``
with ``distributed_executor_backend="external_launcher"`` (every torchrun rank of a
data-parallel replica runs it, SPMD), sleep mode around the training phase, weights loaded from
``iter_hf_weights`` buckets, and the prefix and multimodal caches reset after each load, so no
response is generated from a stale image encoding or a stale prompt's KV cache.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from ...data.template import Sample
from .base import END_TOKENS, Completion, RolloutEngine, SamplingParams

_IMAGE_PAD = "<|image_pad|>"


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
        # the weights in model_dir only shape the engine; every sync overwrites them
        self.llm = LLM(model=model_dir, tokenizer=model_dir, tensor_parallel_size=tensor_parallel,
                       distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": max_images}, seed=seed, enforce_eager=enforce_eager)

    def _inputs(self, sample: Sample, images) -> dict:
        # vLLM expands each image placeholder itself: give it one <|image_pad|> per image
        text = self.tokenizer.decode(sample.input_ids.tolist(), skip_special_tokens=False)
        text = re.sub(f"(?:{re.escape(_IMAGE_PAD)})+", _IMAGE_PAD, text)
        return {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}

    def generate(self, prompts: Sequence[Sample], params: SamplingParams, images: Sequence[list] = ()) -> list:
        from vllm import SamplingParams as VParams

        vparams = VParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                          max_tokens=params.max_new_tokens, seed=params.seed, stop=list(params.stop),
                          include_stop_str_in_output=True, stop_token_ids=self.end_ids)
        images = list(images) or [[] for _ in prompts]
        outputs = self.llm.generate([self._inputs(p, im) for p, im in zip(prompts, images)], vparams,
                                    use_tqdm=False)
        return [[Completion(list(c.token_ids), c.text, "length" if c.finish_reason == "length" else "stop")
                 for c in out.outputs] for out in outputs]

    def load_weights(self, buckets: Iterable[list]) -> int:
        model = self._model()
        count = 0
        for bucket in buckets:
            model.load_weights(bucket)
            count += len(bucket)
        self.llm.reset_prefix_cache()
        engine = getattr(self.llm, "llm_engine", None)
        for reset in ("reset_mm_cache", "reset_multimodal_cache"):
            if hasattr(engine, reset):
                getattr(engine, reset)()
        return count

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()
