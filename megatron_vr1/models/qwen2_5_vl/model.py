"""Qwen2.5-VL on Megatron-Core: the ViT on the first pipeline stage, the LM a ``GPTModel`` with M-RoPE."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ... import platform
from .args import Qwen25VLArgs
from .parallel import ParallelLayout
from .positions import ImageTokenError, get_rope_index, image_token_counts
from .specs import decoder_block_spec, layer_spec, resolve_backend
from .vision import Qwen25VisionModel


def _common(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype) -> dict:
    return dict(
        tensor_model_parallel_size=layout.tensor_parallel,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not platform.has_cuda(),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        add_qkv_bias=True,
    )


def language_config(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                    **overrides) -> TransformerConfig:
    pp = layout.pipeline_parallel
    first = layout.num_layers_in_first_pipeline_stage if pp > 1 else None
    last = None
    if first is not None:
        # megatron-core wants both ends named once one is: the others share what is left.
        rest = (args.num_layers - first) // (pp - 1)
        last = rest if pp > 2 else args.num_layers - first
    kw = _common(args, layout, dtype)
    kw.update(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        kv_channels=args.head_dim,
        layernorm_epsilon=args.rms_norm_eps,
        add_bias_linear=False,
        attention_dropout=args.attention_dropout,
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        sequence_parallel=layout.sequence_parallel,
        mrope_section=list(args.mrope_section),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def vision_config(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                  **overrides) -> TransformerConfig:
    v = args.vision
    kw = _common(args, layout, dtype)
    kw.update(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        layernorm_epsilon=v.norm_eps,
        add_bias_linear=True,
        attention_dropout=0.0,
        pipeline_model_parallel_size=1,  # the whole tower sits on the first stage
        sequence_parallel=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


class Qwen25VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    ``forward`` takes ``input_ids [B, S]`` (``[1, T]`` when packed), 3-D ``position_ids [3, B, S]``
    (computed from ``input_ids`` and ``image_grid_thw`` when omitted), the images as flattened
    patches, and optional ``labels``; it returns vocab-parallel logits ``[B, S, V/TP]`` (or the
    per-token loss when labels are given) on the last stage and hidden states elsewhere.
    """

    def __init__(
        self,
        args: Qwen25VLArgs,
        layout: Optional[ParallelLayout] = None,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        parallel_output: bool = True,
        config_overrides: Optional[dict] = None,
        padded_vocab_size: Optional[int] = None,
    ) -> None:
        layout = layout or ParallelLayout()
        args.check_parallel(layout.tensor_parallel, layout.pipeline_parallel,
                            layout.num_layers_in_first_pipeline_stage)
        self.backend = resolve_backend(backend)
        config = language_config(args, layout, dtype, **(config_overrides or {}))
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.args = args
        self.layout = layout
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size or args.padded_vocab_size(
            layout.tensor_parallel, layout.make_vocab_size_divisible_by)
        if self.padded_vocab_size < args.vocab_size or self.padded_vocab_size % layout.tensor_parallel:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} must be >= vocab_size {args.vocab_size} "
                             f"and divisible by tensor_parallel {layout.tensor_parallel}")
        self.vision = (
            Qwen25VisionModel(vision_config(args, layout, dtype), args.vision, layer_spec(self.backend, causal=False))
            if pre_process else None
        )
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(self.backend, config),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=128000,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=args.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=int(args.rope_theta),
            scatter_embedding_sequence_parallel=False,
        )
        self.share_embeddings_and_output_weights = args.tie_word_embeddings
        self.layer_offset = get_transformer_layer_offset(config)  # global index of this stage's first LM layer

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
              image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings ``[S, B, H]`` with image features in the image-pad positions."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        is_image = input_ids == self.args.image_token_id  # [B, S]: images fill rows in batch order
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ImageTokenError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
            return emb
        if image_grid_thw is None:
            raise ImageTokenError("pixel_values given without image_grid_thw")
        needed = sum(image_token_counts(image_grid_thw, self.args.vision.spatial_merge_size))
        if n_tokens != needed:
            raise ImageTokenError(
                f"input_ids hold {n_tokens} image tokens but image_grid_thw {image_grid_thw.tolist()} "
                f"needs {needed}"
            )
        features = self.vision(pixel_values, image_grid_thw).to(emb.dtype)
        emb = emb.transpose(0, 1).clone()
        emb[is_image] = features
        return emb.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if position_ids is None:
            if packed_seq_params is not None:
                raise ValueError("packed batches need precomputed position_ids (positions.packed_position_ids)")
            position_ids, _ = get_rope_index(input_ids, image_grid_thw, self.args, attention_mask)
        if self.config.sequence_parallel and input_ids.shape[1] % self.layout.tensor_parallel:
            raise ValueError(
                f"sequence_parallel needs the sequence length ({input_ids.shape[1]}) to be a multiple of "
                f"tensor_parallel ({self.layout.tensor_parallel}); pad the batch"
            )
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        mask = None
        if attention_mask is not None and packed_seq_params is None:
            keep = attention_mask.bool()  # [B, S], True = real token
            mask = ~(keep[:, None, None, :])  # megatron: True = masked out
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )


def build_model(args: Qwen25VLArgs, layout: ParallelLayout, **kwargs) -> Qwen25VLModel:
    """This rank's stage, with pre/post-process taken from megatron-core's parallel state."""
    return Qwen25VLModel(
        args,
        layout,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        **kwargs,
    )
