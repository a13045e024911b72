"""Qwen2.5-VL on Megatron-Core: the ViT on the first pipeline stage, the LM a ``GPTModel`` with M-RoPE."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ... import platform
from ..common import rope
from .args import Qwen25VLArgs
from .parallel import ParallelLayout
from .positions import ImageTokenError, VisionLayout, get_rope_index
from .specs import decoder_block_spec, layer_spec, resolve_backend, supports_padding_mask
from .vision import Qwen25VisionModel

rope.install()


def _common(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype, backend: str) -> dict:
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
        add_qkv_bias=True,
        **platform.fusion_config(backend),
    )


def language_config(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                    backend: str = "local", **overrides) -> TransformerConfig:
    pp = layout.pipeline_parallel
    first = layout.num_layers_in_first_pipeline_stage if pp > 1 else None
    last = None
    if first is not None:
        # megatron-core wants both ends named once one is: the others share what is left.
        rest = (args.num_layers - first) // (pp - 1)
        last = rest if pp > 2 else args.num_layers - first
    kw = _common(args, layout, dtype, backend)
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
        context_parallel_size=layout.context_parallel,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        sequence_parallel=layout.sequence_parallel,
        mrope_section=list(args.mrope_section),
    )
    kw.update(overrides)
    config = TransformerConfig(**kw)
    # packed micro-batches differ in length: pipeline stages send each one's shape first. Set after
    # construction: the config's check refuses it for the MoE all-gather dispatcher, unused here.
    config.variable_seq_lengths = True
    return config


def vision_config(args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                  backend: str = "local", **overrides) -> TransformerConfig:
    v = args.vision
    kw = _common(args, layout, dtype, backend)
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


# TransformerConfig fields a caller may override for the whole model, ViT included
_VISION_OVERRIDABLE = frozenset({"use_cpu_initialization", "perform_initialization", "bias_activation_fusion",
                                 "bias_dropout_fusion", "gradient_accumulation_fusion", "recompute_granularity",
                                 "recompute_method", "recompute_num_layers", "recompute_modules"})


class Qwen25VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    ``forward`` takes ``input_ids [B, S]`` (``[1, T]`` when packed), 3-D ``position_ids [3, B, S]``
    (computed from ``input_ids`` and ``image_grid_thw`` when omitted), the images as flattened
    patches, and optional ``labels``; it returns vocab-parallel logits ``[B, S, V/TP]`` (or the
    per-token cross-entropy when labels are given, 0 where a label is negative, i.e. ignored) on
    the last stage and hidden states elsewhere. ``model(**batch.model_inputs())`` runs a
    :class:`megatron_vr1.data.Batch`, whose host-side bookkeeping (positions, the ViT layout, the
    image-token positions) keeps the forward free of host synchronisation.
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
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        layout = layout or ParallelLayout()
        args.check_parallel(layout.tensor_parallel, layout.pipeline_parallel,
                            layout.num_layers_in_first_pipeline_stage)
        self.backend = resolve_backend(backend)
        config = language_config(args, layout, dtype, self.backend, **(config_overrides or {}))
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
        # build-time switches (e.g. meta-device builds) hold for the ViT too; its shape does not change
        vision_overrides = {k: v for k, v in (config_overrides or {}).items() if k in _VISION_OVERRIDABLE}
        self.vision = (
            Qwen25VisionModel(vision_config(args, layout, dtype, self.backend, **vision_overrides), args.vision,
                              layer_spec(self.backend, causal=False), pg_collection=pg_collection)
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
            pg_collection=pg_collection,
        )
        # M-RoPE is computed from this rank's own positions (a context-parallel batch arrives split,
        # see data.Batch.context_shard): megatron-core must not cut it again along the sequence.
        self.language_model.rotary_pos_emb.cp_group = None
        # megatron-core's weight refit (megatron.core.resharding) reads the owning module's groups
        self.pg_collection = self.language_model.pg_collection
        self.share_embeddings_and_output_weights = args.tie_word_embeddings
        self.layer_offset = get_transformer_layer_offset(config)  # global index of this stage's first LM layer

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
              image_grid_thw: Optional[torch.Tensor], image_positions: Optional[torch.Tensor] = None,
              vision_layout: Optional[VisionLayout] = None,
              image_feature_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings ``[S, B, H]`` with image features in the image-pad positions.

        ``image_positions``: flat indices (into ``B * S``, batch-major) of the image tokens, as
        the data pipeline records them; found here (a host sync) when not given. A batch
        without images (``pixel_values`` None or with no rows) never runs the ViT.
        ``image_feature_index``: which of the ViT's features each image token takes, when the
        tokens are a context-parallel rank's share of the images' (the ViT sees them all).
        """
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        image_id = self.args.image_token_id
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        if image_positions is None:
            image_positions = (input_ids == image_id).reshape(-1).nonzero()[:, 0]
            if not has_images and image_positions.numel():
                raise ImageTokenError(f"input_ids hold {image_positions.numel()} image tokens but no "
                                      f"pixel_values were given")
        if not has_images:
            if image_positions.numel():
                raise ImageTokenError(f"image_positions name {image_positions.numel()} image tokens but no "
                                      f"pixel_values were given")
            return emb
        if image_grid_thw is None:
            raise ImageTokenError("pixel_values given without image_grid_thw")
        features = self.vision(pixel_values, image_grid_thw, vision_layout).to(emb.dtype)  # checks pixels vs grids
        if image_feature_index is not None:
            features = features.index_select(0, image_feature_index.to(features.device))
        if image_positions.numel() != features.shape[0]:
            raise ImageTokenError(f"input_ids hold {image_positions.numel()} image tokens but image_grid_thw "
                                  f"{image_grid_thw.tolist()} needs {features.shape[0]}")
        s, b, h = emb.shape
        flat = emb.transpose(0, 1).reshape(b * s, h)  # batch-major, as image_positions count
        flat = flat.index_copy(0, image_positions.to(flat.device), features)
        return flat.view(b, s, h).transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        image_positions: Optional[torch.Tensor] = None,
        vision_layout: Optional[VisionLayout] = None,
        image_feature_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.config.context_parallel_size > 1 and packed_seq_params is None:
            raise ValueError("context parallelism needs packed batches split over its ranks (Batch.context_shard)")
        if position_ids is None:
            if packed_seq_params is not None:
                raise ValueError("packed batches need precomputed position_ids (positions.packed_position_ids)")
            position_ids, _ = get_rope_index(input_ids, image_grid_thw, self.args, attention_mask)
        if self.config.sequence_parallel and input_ids.shape[1] % self.layout.tensor_parallel:
            raise ValueError(
                f"sequence_parallel needs the sequence length ({input_ids.shape[1]}) to be a multiple of "
                f"tensor_parallel ({self.layout.tensor_parallel}); pad the batch (Batch pad_to_multiple_of)"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, "
                             f"got {list(labels.shape)}")
        mask = None
        if attention_mask is not None and packed_seq_params is None:
            if not supports_padding_mask(self.backend):
                raise ValueError(f"the {self.backend!r} layer spec builds causal attention that ignores a padding "
                                 f"mask; give packed batches (cu_seqlens) or build with backend='local'")
            keep = attention_mask.bool()  # [B, S], True = real token
            mask = ~(keep[:, None, None, :])  # megatron: True = masked out
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, image_positions, vision_layout,
                                       image_feature_index)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        out = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=decoder_input,
            labels=None if labels is None else labels.clamp(min=0),
            packed_seq_params=packed_seq_params,
        )
        if labels is not None and self.post_process:
            out = torch.where(labels < 0, 0.0, out)  # ignored rows (e.g. -100): no loss
        return out


def build_model(args: Qwen25VLArgs, layout: ParallelLayout, **kwargs) -> Qwen25VLModel:
    """This rank's stage, with pre/post-process taken from megatron-core's parallel state."""
    return Qwen25VLModel(
        args,
        layout,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        **kwargs,
    )
