"""The rollout engine interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from ...data.template import Sample
from ...errors import UsageError

STOP_STRINGS = ("</answer>",)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 4096  # the PTST stage's response budget
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = STOP_STRINGS  # besides the end-of-sequence tokens


END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# a response holding these would claim image slots the prompt's pixels do not fill: never sampled
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass
class Completion:
    token_ids: list[int]  # the response's tokens, the end-of-sequence token included when produced
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (a stop string or EOS) or "length" (the token budget ran out)
    # per token: log-softmax(logits / T) of the sampled token (T = 1 for greedy), where the engine gives it
    logprobs: Optional[list[float]] = None


def finish(ids: list[int], tokenizer, end_ids: Sequence[int], stop: Sequence[str],
           logprobs: Optional[list[float]] = None) -> Completion:
    """The response up to what ended it: its first end token, or the token that completed a stop
    string, whichever comes first (a batch may have run on past either)."""
    end = next((k + 1 for k, token in enumerate(ids) if token in end_ids), None)
    if end is not None:
        ids = ids[:end]
    decode = lambda n: tokenizer.decode(ids[:n], skip_special_tokens=True)  # noqa: E731
    if stop and any(s in decode(len(ids)) for s in stop):
        lo, hi = 1, len(ids)  # the fewest tokens whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in decode(mid) for s in stop) else (mid + 1, hi)
        ids, end = ids[:lo], lo
    return Completion(ids, decode(len(ids)), "stop" if end is not None else "length",
                      None if logprobs is None else logprobs[:len(ids)])


class RolloutEngine:
    """Generates with (a copy of) the policy's weights.

    ``spmd``: every rank of a data-parallel replica calls :meth:`generate` together (vLLM under
    ``external_launcher``); otherwise only the replica's first rank does and shares the result.
    """

    spmd = False
    wants_pil_images = False  # generate() also takes the prompts' images as PIL (``images=``)

    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, buckets: Iterable[list]) -> int:
        """Take Hugging Face-named full tensors (``iter_hf_weights`` buckets); returns how many.
        Every rank calls it (the buckets are a collective); a rank without an engine passes."""
        raise NotImplementedError

    def sync_from(self, policy, bucket_bytes: int) -> None:
        """Take the policy's current weights. Every rank calls it; an engine that generates with
        the policy itself has nothing to do."""
        from ...checkpoint import iter_hf_weights

        self.load_weights(iter_hf_weights(policy, bucket_bytes))

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
    if kind == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(args, tokenizer, **options)
    from ...errors import UsageError

    raise UsageError(f"rl.engine must be hf, megatron or vllm, got {kind!r}")


BATCHING = ("continuous", "static")


def check_batching(batching: str, block_size: int) -> None:
    """``rl.engine_options.batching`` and ``block_size``: a one-line error for a bad value."""
    if batching not in BATCHING:
        raise UsageError(f"rl.engine_options.batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    if int(block_size) < 1:
        raise UsageError(f"rl.engine_options.block_size must be at least 1, got {block_size}")
