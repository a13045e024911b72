"""Layer specs of Qwen2.5-VL: one builder, three backends: ``local`` (megatron-core's local
layers, torch norms), ``fused`` (the same with our Triton RMSNorm and rotary: one launch per
direction where the torch ops make six to a dozen) and ``te`` (Transformer Engine).

The backend is a spec choice, never a branch in model code: the LM decoder layers and the ViT
blocks are the same ``TransformerLayer`` built from different submodules.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                        get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from ..common.attention import TorchSDPAttention
from ..common.norm import FusedRMSNorm, RMSNorm
from ..common.rope import FusedRotarySelfAttention
from ... import platform

BACKENDS = ("local", "fused", "te")
LOCAL_FAMILY = ("local", "fused")  # megatron-core's local layers and attention, whatever the norm
# The LM layers are built with a causal mask type. Our SDPA core attention reads the padding
# mask it is given as well; under TE a causal-type layer ignores it, so a left-padded batch
# would attend to its padding. TE takes packed (THD) batches only.
_PADDING_MASK = {"local": True, "fused": True, "te": False}
_NORM = {"local": RMSNorm, "fused": FusedRMSNorm}
_ATTENTION = {"local": SelfAttention, "fused": FusedRotarySelfAttention, "te": SelfAttention}


def supports_padding_mask(backend: str) -> bool:
    """Whether layers of ``backend`` honour a padding ``attention_mask`` (``[B, S]`` batches)."""
    return _PADDING_MASK[resolve_backend(backend)]


def resolve_backend(backend: str) -> str:
    """``auto`` picks Transformer Engine where the platform has it."""
    if backend == "auto":
        return "te" if platform.has_transformer_engine() else "local"
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend == "te" and not platform.has_transformer_engine():
        raise RuntimeError("backend 'te' needs CUDA and transformer_engine")
    return backend


def layer_spec(backend: str, *, causal: bool) -> ModuleSpec:
    """A pre-norm transformer layer: RMSNorm, attention (+rotary), RMSNorm, SwiGLU MLP."""
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if resolve_backend(backend) == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        attention = SelfAttentionSubmodules(
            linear_qkv=TELayerNormColumnParallelLinear,
            core_attention=TEDotProductAttention,
            linear_proj=TERowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        )
        mlp = MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)
        input_norm = pre_mlp_norm = IdentityOp
        keys_map = {}
    else:
        attention = SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=TorchSDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        )
        mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        input_norm = pre_mlp_norm = _NORM[resolve_backend(backend)]
        # Checkpoints use TE's names, so one dist-checkpoint loads under either backend.
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(module=_ATTENTION[resolve_backend(backend)], params={"attn_mask_type": mask},
                                      submodules=attention),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=mlp),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def decoder_block_spec(backend: str, config: TransformerConfig) -> ModuleSpec:
    """This pipeline stage's causal LM layers and the final norm (megatron-core's default final
    norm is torch's, which rejects sequence parallelism; ours follows the backend)."""
    if resolve_backend(backend) == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = _NORM[resolve_backend(backend)]
    layers = [layer_spec(backend, causal=True)] * get_num_layers_to_build(config)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm))
