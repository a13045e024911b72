"""Everything between files on disk and the token batches the trainers consume."""

from .batch import Batch, collate_padded, packed_batch
from .formats import EvalDataset, Prompt, RecordError, RLDataset, SFTDataset, SkipReport, Skipped, read_records
from .images import ImageConfig, ImageError, image_size, load_image, process_image, process_images, smart_resize
from .loader import GlobalBatchLoader, ShardedLoader, StepData, epoch_order
from .packing import balance, fill_ratio, pack, pack_balanced
from .template import Sample, SampleError, build_sample, render, tokenize_chat
from .tokenizer import build_offline_tokenizer, build_toy_tokenizer, load_tokenizer

__all__ = [
    "Batch", "EvalDataset", "GlobalBatchLoader", "StepData", "ImageConfig", "ImageError", "Prompt", "RLDataset", "RecordError", "SFTDataset",
    "Sample", "SampleError", "ShardedLoader", "SkipReport", "Skipped", "balance", "build_offline_tokenizer", "build_toy_tokenizer",
    "build_sample", "collate_padded", "epoch_order", "fill_ratio", "image_size", "load_image", "load_tokenizer", "pack",
    "pack_balanced", "packed_batch", "process_image", "process_images", "read_records", "render", "smart_resize",
    "tokenize_chat",
]
