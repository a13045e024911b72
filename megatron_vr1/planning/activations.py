"""Bytes a forward and backward keep alive per token: the activation model of the planner.

Counted from what each op of our layers saves for its backward (megatron-core 0.16's
``TransformerLayer`` with the local spec; Transformer Engine's fused layers save about the
same), in the model's dtype (``elem`` bytes) except where the code works in fp32. The tests
check the totals against the memory a real forward and backward of the tiny model allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs

RECOMPUTE = ("none", "selective", "full")
FP32 = 4


def _norm(width: int, elem: int) -> int:
    # RMSNorm in fp32: the fp32 input, 1/rms, and the normalised value before the weight
    return FP32 * width + FP32 + elem * width


def layer_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, *, tp: int, elem: int,
                sequence_parallel: bool, recompute: str) -> float:
    """One transformer layer, per token of the sequence it runs on (``recompute`` none or
    selective; under full recomputation a layer keeps only its input, see :func:`stage_bytes`)."""
    seq = tp if sequence_parallel else 1  # norms and linear inputs hold 1/TP of the tokens under SP
    q, kv = heads * head_dim // tp, kv_heads * head_dim // tp
    per_seq = 2 * _norm(hidden, elem) + 2 * elem * hidden  # two norms; QKV and FC1 inputs
    rope = 4 * head_dim * FP32  # cos and sin for queries and keys
    if recompute == "selective":  # core attention keeps its inputs: rotated q, k and the QKV output (v)
        attention = elem * (q + kv + (q + 2 * kv))
    else:  # q, k, v blocks, the output and its log-sum-exp, block indices
        attention = elem * (2 * q + 2 * kv) + FP32 * heads // tp + 8
    proj_in = elem * q
    mlp = elem * 5 * ffn // tp  # FC1 output (gate and up), silu(gate), up (+ offset), FC2 input
    return per_seq / seq + rope + attention + proj_in + mlp


def lm_layer_bytes(args: Qwen25VLArgs, layout: ParallelLayout, elem: int, recompute: str) -> float:
    return layer_bytes(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size,
                       tp=layout.tensor_parallel, elem=elem, sequence_parallel=layout.sequence_parallel,
                       recompute=recompute)


def vision_patch_bytes(args: Qwen25VLArgs, layout: ParallelLayout, elem: int, recompute: str) -> float:
    """The whole ViT (blocks, patch embedding, merger) per image patch (4 patches per image token)."""
    v, tp = args.vision, layout.tensor_parallel
    block = layer_bytes(v.hidden_size, v.num_heads, v.num_heads, v.head_dim, v.intermediate_size, tp=tp, elem=elem,
                        sequence_parallel=False, recompute="none" if recompute == "full" else recompute)
    # full: each block keeps its input, one block is rebuilt at a time in the backward pass
    blocks = v.depth * elem * v.hidden_size + block if recompute == "full" else v.depth * block
    embed = elem * v.patch_dim + elem * v.hidden_size  # pixels, patch embedding output
    # ln_q, FC1 input, GELU input and output
    merger = _norm(v.hidden_size, elem) + elem * v.hidden_size + 2 * elem * v.hidden_size // tp
    return blocks + embed + merger


def logits_bytes(args: Qwen25VLArgs, layout: ParallelLayout, elem: int, objective: str) -> float:
    """The output layer's vocab-parallel logits and what the loss keeps of them, per token."""
    vocab = args.padded_vocab_size(layout.tensor_parallel, layout.make_vocab_size_divisible_by) // layout.tensor_parallel
    if objective == "cross_entropy":  # megatron's CE works in place on an fp32 copy of the logits
        return vocab * (FP32 + (elem if elem != FP32 else 0))
    # GRPO: the logits, their gradient from the fused loss, fp32 log-probs and entropy rows
    return vocab * (2 * elem + FP32)


@dataclass(frozen=True)
class ActivationSettings:
    micro_batch_tokens: int
    elem: int  # bytes of the model's dtype
    recompute: str = "none"
    recompute_layers: int = 1  # full: layers per recomputed block
    image_fraction: float = 0.25  # share of a micro-batch's tokens that are image tokens (ViT on stage 0)
    objective: str = "cross_entropy"  # or grpo
    fused_weight_grads: bool = True  # GPU: weight gradients go straight into the fp32 main grads


def stage_bytes(args: Qwen25VLArgs, layout: ParallelLayout, stage: int, lm_layers: int,
                s: ActivationSettings) -> dict[str, float]:
    """Peak activation bytes of one rank of ``stage`` over a step, by part.

    1F1B keeps ``PP - stage`` micro-batches in flight on ``stage``; context parallelism splits
    each micro-batch's tokens over its ranks, whose attention keeps the whole micro-batch's
    keys and values (all-gathered) and whose ViT runs on all of its images.
    """
    if s.recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {s.recompute!r}")
    pp, tp = layout.pipeline_parallel, layout.tensor_parallel
    tokens = s.micro_batch_tokens / layout.context_parallel
    in_flight = pp - stage
    seq = tp if layout.sequence_parallel else 1
    h = args.hidden_size
    layer = lm_layer_bytes(args, layout, s.elem, "none" if s.recompute == "full" else s.recompute)
    if layout.context_parallel > 1 and s.recompute != "selective":  # selective recomputes the gather too
        layer += 2 * s.elem * args.num_kv_heads * args.head_dim // tp * (layout.context_parallel - 1)
    if s.recompute == "full":
        blocks = -(-lm_layers // s.recompute_layers)
        kept = blocks * s.elem * h / seq  # each block's input
        live = min(s.recompute_layers, lm_layers) * layer * tokens  # one block rebuilt in the backward pass
    else:
        kept, live = lm_layers * layer, 0.0
    parts = {"layers": in_flight * tokens * kept + live,
             "stage_input": in_flight * tokens * s.elem * h / seq}
    if stage == 0:
        patches = s.micro_batch_tokens * s.image_fraction * args.vision.merge_unit
        parts["vision"] = in_flight * patches * vision_patch_bytes(args, layout, s.elem, s.recompute)
    if stage == pp - 1:  # one micro-batch at a time reaches the loss
        parts["logits"] = tokens * (logits_bytes(args, layout, s.elem, s.objective)
                                    + (_norm(h, s.elem) + s.elem * h) / seq)
    vocab_rows = args.padded_vocab_size(tp, layout.make_vocab_size_divisible_by) // tp
    temp = 0
    if stage == 0 or (stage == pp - 1 and not s.fused_weight_grads):
        temp = vocab_rows * h * s.elem  # the embedding's (and unfused output layer's) dense weight gradient
    elif not s.fused_weight_grads:
        temp = 2 * args.intermediate_size // tp * h * s.elem  # FC1's weight gradient
    parts["weight_grad_temp"] = temp
    return parts
