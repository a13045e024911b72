"""The Qwen2.5-VL vision tower as Megatron-Core modules (tensor parallel).

Patch embedding (a Conv3d whose stride equals its kernel, so a matmul over flattened patches),
32 pre-norm blocks with 2-D rotary attention inside 112-px windows except the full-attention
blocks, and the patch merger (RMSNorm, 2x2 merge, Linear-GELU-Linear into the LM width).
Tokens are reordered into windows once, attention runs over packed blocks (THD), and the merged
tokens are put back into raster order at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from ..common.attention import packed_seq_params
from ..common.norm import RMSNorm
from .args import VisionArgs
from .positions import VisionLayout, vision_layout


class PatchEmbed(torch.nn.Module):
    def __init__(self, vision: VisionArgs, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (vision.hidden_size, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        self.proj = torch.nn.Module()
        self.proj.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))


class PatchMerger(MegatronModule):
    def __init__(self, config: TransformerConfig, vision: VisionArgs, tp_group=None) -> None:
        super().__init__(config=config)
        width = vision.hidden_size * vision.merge_unit
        self.width = width
        self.ln_q = RMSNorm(config, vision.hidden_size, eps=vision.norm_eps)
        self.fc1 = ColumnParallelLinear(width, width, config=config, init_method=config.init_method,
                                        bias=True, gather_output=False, tp_group=tp_group)
        self.fc2 = RowParallelLinear(width, vision.out_hidden_size, config=config,
                                     init_method=config.output_layer_init_method, bias=True,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(self.ln_q(x).reshape(-1, self.width))
        h, _ = self.fc2(F.gelu(h))
        return h


class Qwen25VisionModel(MegatronModule):
    def __init__(self, config: TransformerConfig, vision: VisionArgs, layer_spec: ModuleSpec,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        self.args = vision
        self.patch_embed = PatchEmbed(vision, config.params_dtype)
        # pg_collection: process groups other than megatron-core's global ones (a rollout copy)
        extra = {} if pg_collection is None else {"pg_collection": pg_collection}
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=i + 1, **extra) for i in range(vision.depth)
        )
        self.merger = PatchMerger(config, vision, tp_group=None if pg_collection is None else pg_collection.tp)
        self._full = set(vision.fullatt_block_indexes)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint layout with each block's tensor-parallel sharding (megatron-core's default
        treats a plain ``ModuleList`` as replicated)."""
        state = {}
        tp_group = parallel_state.get_tensor_model_parallel_group()  # replica ids of replicated tensors
        for name, child in self.named_children():
            if name == "layers":
                for i, layer in enumerate(child):
                    state.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
            else:
                state.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                        tp_group=tp_group))
        return state

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                layout: VisionLayout | None = None) -> torch.Tensor:
        """``[patches, C*T*P*P]`` pixels -> ``[patches / 4, lm_hidden]`` image embeddings (raster order).

        ``layout`` is the images' :class:`VisionLayout`, computed on the host by the data
        pipeline; without it, it is computed here from ``grid_thw`` (read on the host).
        """
        args = self.args
        n = pixel_values.shape[0]
        if layout is None:
            layout = vision_layout(grid_thw.cpu(), args)
        if pixel_values.dim() != 2 or pixel_values.shape[1] != args.patch_dim or n != layout.num_patches:
            raise ValueError(
                f"pixel_values shape {tuple(pixel_values.shape)} does not match image_grid_thw "
                f"{grid_thw.tolist()} (expected [{layout.num_patches}, {args.patch_dim}])"
            )
        layout = layout.to(pixel_values.device, non_blocking=True)
        unit = args.merge_unit

        x = self.patch_embed(pixel_values)
        x = x.view(n // unit, unit, -1)[layout.window_index].reshape(n, 1, -1)  # [s, b=1, h] in window order
        rotary = layout.rotary_angles.view(n, 1, 1, -1)
        full = packed_seq_params(layout.cu_seqlens, layout.image_bounds, layout.max_image)
        windowed = packed_seq_params(layout.cu_window_seqlens, layout.window_bounds, layout.max_window)
        # Full recomputation (``recompute_granularity="full"``) keeps each block's input only, as
        # megatron-core's TransformerBlock does for the LM; the ViT runs its blocks one by one.
        recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            def block(x, layer=layer, params=full if i in self._full else windowed):
                return layer(x, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params)[0]
            x = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        merged = self.merger(x.reshape(n, -1))
        return merged[layout.reverse_index]
