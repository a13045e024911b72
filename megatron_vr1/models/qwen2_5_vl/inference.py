"""Qwen2.5-VL under megatron-core's generation loops: the model's inference wrapper and its
paged (dynamic) context.

megatron-core's VLM wrapper is written for LLaVA (tiles, one image token expanded inside the
model, batch size 1). Qwen2.5-VL's prompts already hold one ``<|image_pad|>`` per merged patch,
so this wrapper keeps the token grid as it is and, per batch:

* computes the 3-D M-RoPE ids of every row up front: the prompt's own (``Sample.position_ids``),
  then text positions continuing from the prompt's largest id for every generated column. The
  static KV cache keeps keys before rotary, so each step gets the whole history ``[3, B, 0:end]``
  and attention slices the query's rows from it;
* runs the vision tower once over all the batch's images (first pipeline stage) and keeps, for
  every ``(row, column)``, which feature row fills it. The loop prefills up to the shortest
  prompt and then feeds one column per step, so a longer prompt's images can arrive in any step:
  each step's embeddings take the features of the columns it feeds.

Under continuous batching (:class:`Qwen25VLDynamicContext`, megatron-core's paged KV cache) every
step packs the active requests' new tokens into one row: :meth:`Qwen25VLInferenceWrapper.dynamic_step_input`
gives each its request's M-RoPE ids and, for prompt tokens that are image tokens, their feature
rows; the context applies the rotary rows as given.
"""

from __future__ import annotations

import bisect
from typing import Any, Optional, Sequence

import torch
from megatron.core.inference.contexts import DynamicInferenceContext, StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper import (
    AbstractModelInferenceWrapper,
)

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from ...data.template import Sample
from .positions import ImageTokenError


def request_positions(sample: Sample, new_tokens: int, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's M-RoPE ids followed by text positions for ``new_tokens`` generated tokens (all
    three sections equal, continuing from the prompt's largest id: transformers' ``rope_deltas``),
    and the feature row of each image token in the prompt's own features (-1 elsewhere)."""
    n = len(sample)
    positions = torch.empty(3, n + new_tokens, dtype=torch.long)
    positions[:, :n] = sample.position_ids
    positions[:, n:] = torch.arange(new_tokens) + int(sample.position_ids.max()) + 1
    index = torch.full((n,), -1, dtype=torch.long)
    cols = (sample.input_ids == image_id).nonzero()[:, 0]
    index[cols] = torch.arange(len(cols))
    return positions, index


class Qwen25VLInferenceWrapper(AbstractModelInferenceWrapper):
    """``model``: one pipeline stage (:class:`Qwen25VLModel`), used as it is (its weights are the
    policy's or a refit copy's)."""

    def prep_inference_input(self, prompts_tokens: torch.Tensor, samples: Sequence[Sample] = ()) -> dict[str, Any]:
        """``prompts_tokens [B, S]``: the prompts right-padded to ``S = longest prompt + new
        tokens``; ``samples``: the rows' prompts (ids, positions, images), in row order."""
        if len(samples) != prompts_tokens.shape[0]:
            raise ValueError(f"{prompts_tokens.shape[0]} prompt rows but {len(samples)} samples")
        b, s = prompts_tokens.shape
        device = prompts_tokens.device
        # a fresh cache per batch, sized to it (freed with the batch)
        self.inference_context = StaticInferenceContext(b, s)
        positions = torch.empty(3, b, s, dtype=torch.long)
        feature_index = torch.full((b, s), -1, dtype=torch.long)
        image_columns: set[int] = set()
        image_id = self.model.args.image_token_id
        rows = 0
        for i, sample in enumerate(samples):
            n = len(sample)
            positions[:, i], index = request_positions(sample, s - n, image_id)
            cols = (index >= 0).nonzero()[:, 0]
            feature_index[i, cols] = index[cols] + rows
            image_columns.update(cols.tolist())
            rows += len(cols)
        features = self._image_features(samples, rows, device)
        return {"tokens": prompts_tokens, "position_ids": positions.to(device), "attention_mask": None,
                "feature_index": feature_index.to(device), "features": features,
                "image_columns": sorted(image_columns)}

    def _image_features(self, samples: Sequence[Sample], rows: int, device) -> Optional[torch.Tensor]:
        """The vision tower's features for every image token of the batch, in row order."""
        if not self.model.pre_process:
            return None
        with_images = [x for x in samples if x.image_grid_thw.numel()]
        grid = torch.cat([x.image_grid_thw for x in with_images]) if with_images else torch.zeros(0, 3, dtype=torch.long)
        features = None
        if with_images:
            features = self.model.vision(torch.cat([x.pixel_values for x in with_images]).to(device), grid)
        if (0 if features is None else features.shape[0]) != rows:
            raise ImageTokenError(f"the prompts hold {rows} image tokens but image_grid_thw {grid.tolist()} "
                                  f"gives {0 if features is None else features.shape[0]} features")
        return features

    def dynamic_step_input(self, requests: dict) -> dict[str, Any]:
        """The packed input of one continuous-batching step. ``requests``: request id -> an object
        with ``positions [3, prompt + new tokens]`` (the request's M-RoPE ids), ``feature_index
        [prompt]`` (a row of its ``features`` per image token, -1 elsewhere) and ``features``
        (``None`` once prefilled or without images)."""
        ctx = self.inference_context
        live = slice(ctx.paused_request_count, ctx.total_request_count)
        tokens, _ = ctx.current_input_and_position_ids()
        n = tokens.shape[1]
        positions = torch.zeros(3, 1, n, dtype=torch.long)
        index = torch.full((1, n), -1, dtype=torch.long)
        features, rows, at = [], 0, 0
        for rid, start, count in zip(ctx.request_ids[live].tolist(), ctx.request_kv_length_offsets[live].tolist(),
                                     ctx.request_query_lengths[live].tolist()):
            request = requests[rid]
            positions[:, 0, at:at + count] = request.positions[:, start:start + count]
            if request.features is not None and start < len(request.feature_index):
                picks = request.feature_index[start:start + count]
                index[0, at:at + len(picks)] = torch.where(picks >= 0, picks + rows, picks)
                features.append(request.features)
                rows += request.features.shape[0]
            at += count
        if at != ctx.active_token_count:
            raise RuntimeError(f"the context holds {ctx.active_token_count} active tokens, the requests {at}")
        device = tokens.device
        return {"tokens": tokens, "position_ids": positions.to(device), "attention_mask": None,
                "feature_index": index.to(device) if features else None,
                "features": torch.cat(features) if features else None}

    def request_features(self, samples: Sequence[Sample]) -> list[Optional[torch.Tensor]]:
        """Each prompt's image features (one vision-tower pass over all of them), ``None`` for a
        prompt without images or off the first pipeline stage."""
        counts = [int((x.input_ids == self.model.args.image_token_id).sum()) for x in samples]
        if not self.model.pre_process or not any(counts):
            return [None] * len(samples)
        features = self._image_features(samples, sum(counts), platform_device(self.model))
        out, at = [], 0
        for n in counts:
            out.append(features[at:at + n] if n else None)
            at += n
        return out

    def get_batch_for_context_window(self, inference_input: dict[str, Any], context_start_position: int,
                                     context_end_position: int) -> dict[str, Any]:
        start, end = context_start_position, context_end_position
        cols = inference_input["image_columns"]
        has_images = bisect.bisect_left(cols, start) < bisect.bisect_left(cols, end)  # host ints: no sync
        return {"tokens": inference_input["tokens"][:, start:end],
                "position_ids": inference_input["position_ids"][:, :, :end],  # rotary needs the history
                "attention_mask": None,
                "feature_index": inference_input["feature_index"][:, start:end] if has_images else None,
                "features": inference_input["features"]}

    def _forward(self, inference_input: dict[str, Any]) -> torch.Tensor:
        model, tokens = self.model, inference_input["tokens"]
        decoder_input = None
        if model.pre_process:
            decoder_input = model.language_model.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
            index = inference_input["feature_index"]
            if index is not None:
                features = inference_input["features"].to(decoder_input.dtype)
                picked = features[index.clamp(min=0)].transpose(0, 1)  # [s, b, h]
                decoder_input = torch.where((index >= 0).t()[..., None], picked, decoder_input)
        return model.language_model(input_ids=tokens, position_ids=inference_input["position_ids"],
                                    attention_mask=None, decoder_input=decoder_input,
                                    inference_context=self.inference_context, runtime_gather_output=True)


def platform_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Qwen25VLDynamicContext(DynamicInferenceContext):
    """megatron-core's paged KV cache context with M-RoPE.

    megatron-core's dynamic context rotates each active token by one looked-up position
    (``rotary[token_to_pos_ids]``). Qwen2.5-VL's positions are 3-D, so the dynamic wrapper passes
    the model one M-RoPE row per active token (``position_ids [3, 1, tokens]``: a prompt token's
    own ids, a generated token's request offset plus its step in all three sections) and the rows
    are applied as they come."""

    def apply_rotary_emb_query(self, query, query_emb, config, cu_seqlens_q, cp_group, mscale: float = 1.0):
        n = self.padded_active_token_count
        query[:n] = apply_rotary_pos_emb(t=query[:n], freqs=query_emb[:n], config=config, cp_group=cp_group,
                                         mscale=mscale)
        return query

    def apply_rotary_emb_key(self, key, key_emb, config, cp_group, mscale: float = 1.0):
        n = self.padded_active_token_count
        rotated = apply_rotary_pos_emb(t=key[:n], freqs=key_emb[:n], config=config, cp_group=cp_group, mscale=mscale)
        if self.is_decode_only():
            return rotated
        key[:n] = rotated
        return key
