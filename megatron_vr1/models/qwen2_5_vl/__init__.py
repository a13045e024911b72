"""Qwen2.5-VL: args from config.json, the Megatron-Core model, its specs and HF mapping."""

from .args import ConfigError, Qwen25VLArgs, VisionArgs
from .hf_mapping import canonical_hf_name, load_hf_state_dict, param_mappings
from .model import ParallelLayout, Qwen25VLModel, build_model, language_config, vision_config
from .positions import ImageTokenError, get_rope_index, packed_position_ids, vision_layout

__all__ = [
    "ConfigError", "ImageTokenError", "ParallelLayout", "Qwen25VLArgs", "Qwen25VLModel", "VisionArgs",
    "build_model", "canonical_hf_name", "get_rope_index", "language_config", "load_hf_state_dict",
    "packed_position_ids", "param_mappings", "vision_config", "vision_layout",
]
