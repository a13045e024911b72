"""Continuous batching for the megatron engine (``rl.engine_options.batching=continuous``).

The KV cache is megatron-core's paged one (``DynamicInferenceContext``: fixed-size blocks, its
block allocator and request bookkeeping, attention over block tables), extended for M-RoPE by
:class:`Qwen25VLDynamicContext`. This module is the scheduler around it, written for rollout
rather than serving (megatron-core's ``DynamicInferenceEngine`` adds an asyncio loop, chunked
prefill and eviction, and one end token per request):

* a request is admitted when a slot is free and the cache holds the blocks of its whole budget
  (prompt + ``max_new_tokens``), so a running request is never paused or evicted;
* every step feeds each running request's new tokens (a new prompt's whole prompt, one token
  for the others) as one packed row, samples one token per request, and frees the slot and
  blocks of every request that ended, for the next prompt in line.

The end conditions, masking, log-probs and seeded sampling are the static loop's (the engine's
``_Controller``); the greedy tokens are the same as the static loop's and the hf engine's.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage
from megatron.core.inference.inference_request import DynamicInferenceRequest
from megatron.core.inference.sampling_params import SamplingParams as MegatronSampling

from ...data.template import Sample
from ...models.qwen2_5_vl.inference import Qwen25VLDynamicContext, request_positions
from ...planning.memory import kv_bytes_per_token
from .base import Completion, SamplingParams, finish

DEFAULT_BLOCK_SIZE = 256  # tokens per KV block: flash-attn's paged kernels want a multiple of 256


@dataclass
class _Live:
    """A request while it runs: its M-RoPE ids, image features (until prefilled) and output."""

    row: int
    sample: Sample
    positions: torch.Tensor
    feature_index: torch.Tensor
    features: Optional[torch.Tensor]
    blocks: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class BatchStats:
    """What one call did: generated tokens, forward steps and the slot-steps they occupied."""

    tokens: int = 0
    steps: int = 0
    slot_steps: int = 0
    slots: int = 0

    @property
    def slot_utilisation(self) -> float:
        """Useful tokens per slot-step: 1.0 when every slot produces a token at every step."""
        return self.tokens / max(self.slot_steps, 1)


def generate_continuous(engine, rows: list[Sample], sampling: MegatronSampling, params: SamplingParams,
                        slots: int, block_size: int, stats: Optional[BatchStats] = None) -> list[Completion]:
    """Generate one completion per row, ``slots`` requests at a time, refilling slots as requests
    end. ``engine``: the :class:`MegatronEngine` (model, wrapper and controller)."""
    model, ctl, args = engine.model, engine.controller, engine.args
    wrapper = ctl.inference_wrapped_model
    new = params.max_new_tokens
    longest = max(len(r) for r in rows)
    need = [math.ceil((len(r) + new) / block_size) for r in rows]
    slots = max(1, min(slots, len(rows)))
    layers = len(model.language_model.decoder.layers)
    tp = model.pg_collection.tp.size()
    block_bytes = kv_bytes_per_token(args, tp, layers, model.config.params_dtype.itemsize) * block_size
    # the cache holds ``slots`` requests of the longest budget, plus megatron-core's dummy block
    blocks = slots * math.ceil((longest + new) / block_size) + 1
    groups = copy.copy(model.pg_collection)  # the context asks for an expert group; this model has none
    groups.ep = getattr(groups, "ep", None)
    ctx = Qwen25VLDynamicContext(
        params_dtype=model.config.params_dtype, num_layers=layers, kv_channels=args.head_dim,
        num_attention_heads=args.num_kv_heads, max_sequence_length=longest + new,
        buffer_size_gb=(blocks + 0.5) * block_bytes / 1024**3, max_requests=slots,
        max_tokens=Qwen25VLDynamicContext.round_up_tokens(slots * (longest + 1), tp), block_size_tokens=block_size,
        pg_collection=groups, materialize_only_last_token_logits=True, unified_memory_level=0)
    capacity = ctx.block_allocator.active_count
    wrapper.inference_context = ctx
    wrapper.prep_model_for_inference()  # eval mode; megatron-core's dynamic path never sets it
    stats = stats if stats is not None else BatchStats()
    stats.slots = slots
    waiting, running = deque(range(len(rows))), {}
    reserved, done = 0, [None] * len(rows)
    image_id = args.image_token_id
    ctl.reset_stop_tails()
    try:
        while waiting or running:
            admitted = []
            while waiting and len(running) + len(admitted) < slots and reserved + need[waiting[0]] <= capacity \
                    and ctx.active_token_count + sum(len(rows[i]) for i in admitted) + len(rows[waiting[0]]) \
                    <= ctx.max_tokens:
                i = waiting.popleft()
                admitted.append(i)
                reserved += need[i]
            if admitted:
                features = wrapper.request_features([rows[i] for i in admitted])
                for i, feats in zip(admitted, features):
                    positions, index = request_positions(rows[i], new, image_id)
                    running[i] = _Live(i, rows[i], positions, index, feats, need[i])
                    ctx.add_request(DynamicInferenceRequest(
                        request_id=i, prompt_tokens=rows[i].input_ids.to(ctx.token_to_input_ids.device),
                        sampling_params=MegatronSampling(num_tokens_to_generate=new, termination_id=-1)))
            if not running:
                raise RuntimeError(f"one request ({len(rows[waiting[0]])} prompt + {new} new tokens) does not fit "
                                   f"the KV cache of {capacity} blocks of {block_size} tokens")
            ctx.initialize_attention_state()
            live = ctx.request_ids[ctx.paused_request_count:ctx.total_request_count].tolist()
            step_input = wrapper.dynamic_step_input(running)
            for rid in live:  # image features are needed for the prefill only
                running[rid].features = None
            logits = wrapper.run_one_forward_step(step_input)
            if ctl.model_is_pipeline_parallel:
                logits = broadcast_from_last_pipeline_stage([1, len(live), model.padded_vocab_size],
                                                            dtype=wrapper.inference_wrapper_config.params_dtype,
                                                            tensor=logits, pp_group=ctl.pp_group)
            token, logp = ctl.pick(logits[0, :len(live)], sampling)
            ended = torch.isin(token, ctl.end_ids)
            if ctl.stop:
                ended |= ctl.stop_hits(token, live)
            keep = torch.ones(len(live), dtype=torch.uint8)
            stats.steps += 1
            stats.slot_steps += slots
            stats.tokens += len(live)
            for j, (rid, t, lp, end) in enumerate(zip(live, token.tolist(), logp.tolist(), ended.tolist())):
                request = running[rid]
                request.tokens.append(t)
                request.logprobs.append(lp)
                if end or len(request.tokens) >= new:
                    keep[j] = 0
                    done[rid] = finish(request.tokens, engine.tokenizer, engine.end_ids, params.stop,
                                       request.logprobs)
                    reserved -= request.blocks
                    del running[rid]
            ctx.update_requests(keep.to(token.device), token.clone())
            if ctx.paused_request_count:
                raise RuntimeError("a running request was paused: the KV reservation is wrong")
    finally:
        wrapper.inference_context = None
        del ctx
    return done
