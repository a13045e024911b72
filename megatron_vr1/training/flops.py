"""Model FLOPs of a training step, vision and language, for MFU.

Counted as the matmul FLOPs of the model itself (2 per multiply-add; backward twice the forward;
no recomputation counted, as MFU conventionally is): the LM's linear layers and output layer per
token, its causal attention per packed sequence, the ViT's linear layers per patch and its
attention within windows and full-attention blocks, and the merger per merged token.
"""

from __future__ import annotations

from typing import Sequence

from ..models.qwen2_5_vl.args import Qwen25VLArgs


def lm_flops(args: Qwen25VLArgs, lengths: Sequence[int]) -> float:
    """Forward FLOPs of the language model over sequences of these lengths."""
    h, kv = args.hidden_size, args.num_kv_heads * args.head_dim
    q = args.num_heads * args.head_dim
    per_token_linear = 2 * args.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * args.intermediate_size)
    per_token_linear += 2 * h * args.vocab_size  # output layer
    tokens = sum(lengths)
    # causal attention: QK^T and AV, 2 FLOPs each, over (n + 1) / 2 keys on average
    attention = sum(2 * 2 * q * n * (n + 1) / 2 for n in lengths) * args.num_layers
    return per_token_linear * tokens + attention


def vision_flops(args: Qwen25VLArgs, grids: Sequence[Sequence[int]]) -> float:
    """Forward FLOPs of the ViT and merger over images with these (t, h, w) patch grids."""
    v = args.vision
    d, ffn = v.hidden_size, v.intermediate_size
    patches = sum(t * h * w for t, h, w in grids)
    per_patch = 2 * (v.patch_dim * d + v.depth * (d * 3 * d + d * d + 3 * d * ffn))
    merged = patches // v.merge_unit
    merger = 2 * merged * (d * v.merge_unit * d * v.merge_unit + d * v.merge_unit * v.out_hidden_size)
    window = v.window_merged_units * v.window_merged_units * v.merge_unit  # patches per full window
    attention = 0.0
    full_blocks = len(v.fullatt_block_indexes)
    for t, h, w in grids:
        n = h * w
        attention += t * 2 * 2 * d * n * n * full_blocks  # full attention over each frame
        attention += t * 2 * 2 * d * n * min(n, window) * (v.depth - full_blocks)  # within windows (upper bound)
    return per_patch * patches + merger + attention


def train_flops(args: Qwen25VLArgs, lengths: Sequence[int], grids: Sequence[Sequence[int]], *,
                vision_trained: bool = True) -> float:
    """Forward + backward FLOPs of one step: 3x the forward (2x for a frozen ViT's input-gradient
    pass is not needed, so a frozen ViT counts its forward only)."""
    return 3 * lm_flops(args, lengths) + (3 if vision_trained else 1) * vision_flops(args, grids)
