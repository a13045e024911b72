"""The rollout engine interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ...data.template import Sample

STOP_STRINGS = ("</answer>",)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 4096  # the PTST stage's response budget
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = STOP_STRINGS  # besides the end-of-sequence tokens


@dataclass
class Completion:
    token_ids: list[int]  # the response's tokens, the end-of-sequence token included when produced
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (a stop string or EOS) or "length" (the token budget ran out)


class RolloutEngine:
    """Generates with (a copy of) the policy's weights.

    ``spmd``: every rank of a data-parallel replica calls :meth:`generate` together (vLLM under
    ``external_launcher``); otherwise only the replica's first rank does and shares the result.
    """

    spmd = False

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, buckets: Iterable[list]) -> int:
        """Take Hugging Face-named full tensors (``iter_hf_weights`` buckets); returns how many.
        Every rank calls it (the buckets are a collective); a rank without an engine passes."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free device memory for the training phase (no-op where nothing is held)."""

    def wake(self) -> None:
        """Take device memory back before generating."""


def make_engine(kind: str, args, tokenizer, **options) -> RolloutEngine:
    if kind == "hf":
        from .hf import HFEngine

        return HFEngine(args, tokenizer, **options)
    if kind == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(args, tokenizer, **options)
    from ...errors import UsageError

    raise UsageError(f"rl.engine must be hf or vllm, got {kind!r}")
