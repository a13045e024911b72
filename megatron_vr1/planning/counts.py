"""Parameters each rank holds, from the architecture alone (no model is built).

The search over layouts needs this for hundreds of layouts; the tests check it against the
meta-device model, rank by rank, for 7B to 72B layouts. The parallel split is the one of
:mod:`megatron_vr1.models.qwen2_5_vl`: the ViT and the embedding on the first pipeline stage,
the final norm and the output layer on the last; column- and row-parallel weights split over
tensor-parallel ranks, norms and row-parallel biases replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs


@dataclass(frozen=True)
class RankParams:
    """Parameters of one rank's stage."""

    held: int  # tensors this rank allocates (replicas, vocab padding, a tied copy included)
    unique: int  # its share of the model: summed over ranks it gives the Hugging Face count
    vision: int  # of ``held``, the ViT's (patch embedding, blocks, merger)
    lm_layers: int  # LM decoder layers on this stage


def stage_layers(args: Qwen25VLArgs, layout: ParallelLayout) -> list[int]:
    """LM layers on each pipeline stage (the first one also carries the ViT)."""
    pp, first = layout.pipeline_parallel, layout.num_layers_in_first_pipeline_stage
    if pp == 1:
        return [args.num_layers]
    if first is None:
        return [args.num_layers // pp] * pp
    return [first] + [(args.num_layers - first) // (pp - 1)] * (pp - 1)


def _vision_params(args: Qwen25VLArgs, tp: int) -> tuple[int, int]:
    """(held per TP rank, replicated part of it) of the ViT."""
    v = args.vision
    h, f, width = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    # per block: QKV (+bias), proj, FC1 (+bias), FC2
    sharded = v.depth * (3 * h * h + 3 * h + h * h + 2 * f * h + 2 * f + f * h) // tp
    sharded += (width * width + width + args.hidden_size * width) // tp  # merger fc1(+bias), fc2
    # patch embedding; per block two norms and two row-parallel biases; ln_q and the merger's FC2 bias
    replicated = h * v.patch_dim + v.depth * (2 * h + h + h) + h + args.hidden_size
    return sharded + replicated, replicated


def _layer_params(args: Qwen25VLArgs, tp: int) -> tuple[int, int]:
    """(held per TP rank, replicated part of it) of one LM decoder layer."""
    h, d = args.hidden_size, args.head_dim
    qkv = (args.num_heads + 2 * args.num_kv_heads) * d
    sharded = (qkv * h + qkv + h * args.num_heads * d + 3 * args.intermediate_size * h) // tp
    return sharded + 2 * h, 2 * h  # the two RMSNorm weights


def rank_params(args: Qwen25VLArgs, layout: ParallelLayout, stage: int, tp_rank: int = 0) -> RankParams:
    """Parameters of the rank at pipeline ``stage`` and tensor-parallel rank ``tp_rank`` (context-
    and data-parallel replicas hold the same)."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if not (0 <= stage < pp and 0 <= tp_rank < tp):
        raise ValueError(f"stage {stage} / tp_rank {tp_rank} outside TP={tp} x PP={pp}")
    layers = stage_layers(args, layout)[stage]
    first, last = stage == 0, stage == pp - 1
    padded = args.padded_vocab_size(tp, layout.make_vocab_size_divisible_by)
    rows = padded // tp
    real_rows = max(0, min(rows, args.vocab_size - rows * tp_rank))  # vocab padding is never a parameter
    h = args.hidden_size

    layer_held, layer_rep = _layer_params(args, tp)
    held = layers * layer_held
    unique = layers * (layer_held - (layer_rep if tp_rank else 0))
    vision = 0
    if first:
        vision, vision_rep = _vision_params(args, tp)
        held += vision + rows * h
        unique += vision - (vision_rep if tp_rank else 0) + real_rows * h
    if last:
        held += h  # final norm
        unique += 0 if tp_rank else h
        if not (first and args.tie_word_embeddings):  # one shared tensor when tied on a single stage
            held += rows * h
            unique += 0 if args.tie_word_embeddings else real_rows * h
    return RankParams(held=held, unique=unique, vision=vision, lm_layers=layers)
