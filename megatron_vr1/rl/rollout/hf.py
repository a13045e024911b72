"""Rollout with transformers' Qwen2.5-VL ``generate``: the default on CPU, usable on a GPU.

The engine holds its own Hugging Face-layout copy of the model, filled by weight sync through the
one name mapping (``iter_hf_weights``). Prompts are left-padded into batches; sampling is
reproducible from the seed (the caller's RNG state is left as it was). Each sampled token's
log-prob at the rollout temperature is recorded as it is drawn (:class:`_SampledLogprobs`), from
the model's raw logits, the quantity the trainer's old log-probs are compared with.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ... import platform
from ...data.batch import collate_padded
from ...data.template import Sample
from ...models.qwen2_5_vl import canonical_hf_name
from .base import END_TOKENS, VISION_TOKENS, Completion, RolloutEngine, SamplingParams, finish



def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class HFEngine(RolloutEngine):
    def __init__(self, args, tokenizer, *, dtype: torch.dtype = torch.float32, max_batch: int = 64,
                 attn_implementation: str = "sdpa") -> None:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        self.args, self.tokenizer, self.max_batch = args, tokenizer, max_batch
        self.end_ids = [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]
        self.pad_id = self.end_ids[-1]
        self.suppressed = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        config = Qwen2_5_VLConfig(**dict(args.to_hf_config(), bos_token_id=self.pad_id, eos_token_id=self.end_ids[0],
                                         pad_token_id=self.pad_id))
        config._attn_implementation = attn_implementation
        # weights arrive by load_weights: skip initialising them (buffers such as the rotary
        # frequencies are still computed)
        with torch.device(platform.device()), _no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.tie_weights()  # skipped with the initialisation: a tied lm_head must be the embedding itself
        # every buffer on the device: some (the vision rotary's frequencies) are made on the host
        self.model = model.to(device=platform.device(), dtype=dtype).eval()
        self._takes_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self._params = {canonical_hf_name(k): p for k, p in self.model.named_parameters()}  # tied ones once
        if args.tie_word_embeddings and "lm_head.weight" in self._params:
            raise RuntimeError("the engine's lm_head is not tied to its embedding")

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[list]) -> int:
        loaded = set()
        for bucket in buckets:
            for name, tensor in bucket:
                target = self._params.get(name)
                if target is None:
                    raise KeyError(f"weight sync sent {name!r}, which the {type(self).__name__} model lacks")
                target.copy_(tensor)
                loaded.add(name)
        missing = sorted(set(self._params) - loaded)
        if missing:
            raise KeyError(f"weight sync left {len(missing)} tensors unset, e.g. {missing[:3]}")
        return len(loaded)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        per_batch = max(1, self.max_batch // params.n)
        devices = [torch.cuda.current_device()] if platform.has_cuda() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(params.seed)
            for start in range(0, len(prompts), per_batch):
                out += self._generate(prompts[start:start + per_batch], params)
        return out

    def _generate(self, prompts: Sequence[Sample], params: SamplingParams) -> list[list[Completion]]:
        recorder = _SampledLogprobs(self.model.lm_head, params.temperature if params.temperature > 0 else 1.0)
        try:
            return self._generate_recorded(prompts, params, recorder)
        finally:
            recorder.close()

    def _generate_recorded(self, prompts: Sequence[Sample], params: SamplingParams,
                           recorder: "_SampledLogprobs") -> list[list[Completion]]:
        batch = collate_padded(prompts, self.pad_id, self.args, side="left").to(platform.device())
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
            if params.temperature > 0 else dict(do_sample=False)
        # the batch keeps the grid on the host (the trainer's bookkeeping); transformers wants it beside the pixels
        images = {} if batch.pixel_values is None else dict(pixel_values=batch.pixel_values,
                                                            image_grid_thw=batch.image_grid_thw.to(platform.device()))
        if images and self._takes_token_types:
            # transformers 5 finds the image tokens (hence the M-RoPE ids) through these: without
            # them generate() gives an image prompt text positions
            images["mm_token_type_ids"] = (batch.input_ids == self.args.image_token_id).int()
        greedy = params.temperature <= 0  # one decode per prompt: its n completions are the same
        sequences = self.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **images, **sampling,
            max_new_tokens=params.max_new_tokens, num_return_sequences=1 if greedy else params.n,
            eos_token_id=self.end_ids, suppress_tokens=self.suppressed, pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None, tokenizer=self.tokenizer,
            logits_processor=LogitsProcessorList([recorder]))
        new = sequences[:, batch.input_ids.shape[1]:]
        logps = recorder.finish(new).tolist()
        completions = [finish(ids, self.tokenizer, self.end_ids, params.stop, lp) for ids, lp in zip(new.tolist(), logps)]
        if greedy:
            return [[Completion(list(c.token_ids), c.text, c.finish_reason, c.logprobs) for _ in range(params.n)]
                    for c in completions]
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]


class _SampledLogprobs(LogitsProcessor):
    """Records ``log_softmax(raw_logits / T)`` of every sampled token, as generation runs.

    A forward hook on the output layer keeps each step's raw last-position logits (before any
    processor: suppression, temperature, top-p); the processor, called once per step with the
    tokens drawn so far, scores the token drawn from the previous step's logits. Only one step's
    logits are held: never ``steps x rows x vocab``."""

    def __init__(self, lm_head: torch.nn.Module, temperature: float) -> None:
        self.temperature = temperature
        self.current: torch.Tensor | None = None  # this step's raw logits [rows, V]
        self.previous: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []  # per step: [rows] log-probs of the drawn tokens
        self.handle = lm_head.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.previous, self.current = self.current, output[:, -1, :].float()

    def _score(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits / self.temperature, dim=-1).gather(1, tokens[:, None])[:, 0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:  # input_ids' last column was drawn from the previous step's logits
            self.columns.append(self._score(self.previous, input_ids[:, -1]))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs of ``new_tokens`` (the columns generate() appended)."""
        if new_tokens.shape[1] > len(self.columns):  # the last token: drawn from the last logits seen
            self.columns.append(self._score(self.current, new_tokens[:, -1].to(self.current.device)))
        out = torch.stack(self.columns, dim=1) if self.columns else torch.zeros(new_tokens.shape[0], 0)
        return out[:, :new_tokens.shape[1]].cpu()

    def close(self) -> None:
        self.handle.remove()
