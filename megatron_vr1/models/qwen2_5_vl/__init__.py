"""Qwen2.5-VL: args from config.json, the Megatron-Core model, its specs and HF mapping.

The model itself (and megatron-core with it) is imported on first use, so the data pipeline and
its worker processes can use the pure pieces here (args, positions, the HF mapping) cheaply.
"""

from importlib import import_module

from .args import ConfigError, Qwen25VLArgs, VisionArgs
from .hf_mapping import canonical_hf_name, load_hf_state_dict, param_mappings
from .parallel import ParallelLayout
from .positions import ImageTokenError, VisionLayout, get_rope_index, packed_position_ids, vision_layout

_FROM_MODEL = ("Qwen25VLModel", "build_model", "language_config", "vision_config")

__all__ = [
    "ConfigError", "ImageTokenError", "ParallelLayout", "Qwen25VLArgs", "Qwen25VLModel", "VisionArgs",
    "VisionLayout", "build_model", "canonical_hf_name", "get_rope_index", "language_config", "load_hf_state_dict",
    "packed_position_ids", "param_mappings", "vision_config", "vision_layout",
]


def __getattr__(name: str):
    if name in _FROM_MODEL:
        return getattr(import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
