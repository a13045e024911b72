"""Checkpoints: Megatron-Core distributed checkpoints, Hugging Face folders, conversion, export."""

from .convert import hf_to_mcore, mcore_to_hf, verify
from .export import iter_hf_weights
from .hf_files import CheckpointError
from .megatron_files import load_model, save_model

__all__ = ["CheckpointError", "hf_to_mcore", "iter_hf_weights", "load_model", "mcore_to_hf",
           "save_model", "verify"]
