"""Qwen2.5-VL under megatron-core's static generation loop: the model's inference wrapper.

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
"""

from __future__ import annotations

import bisect
from typing import Any, Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper import (
    AbstractModelInferenceWrapper,
)

from ...data.template import Sample
from .positions import ImageTokenError


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
            positions[:, i, :n] = sample.position_ids
            positions[:, i, n:] = torch.arange(s - n) + int(sample.position_ids.max()) + 1
            cols = (sample.input_ids == image_id).nonzero()[:, 0]
            feature_index[i, cols] = torch.arange(rows, rows + len(cols))
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
