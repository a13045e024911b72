"""Memory of every pipeline stage of a training job, and the cheapest layouts that fit.

Per rank: bf16 weights; fp32 main gradients (``grad_reduce_in_fp32``); Adam's fp32 master
weights and moments, sharded over the data- (and context-) parallel ranks by the distributed
optimizer; activations of the micro-batches in flight (:mod:`.activations`); for GRPO the frozen
reference model and the rollout engine (its weights when it is a copy, its KV cache and prefill
logits while it generates). Weights, gradients, optimizer state, the reference and a copy's
weights stay; activations and the engine's working memory come and go in turn, so the peak is
the persistent part plus the larger of the two. A reserve covers the CUDA context, NCCL
buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..models.qwen2_5_vl import ConfigError, ParallelLayout, Qwen25VLArgs
from .activations import RECOMPUTE, ActivationSettings, stage_bytes
from .counts import RankParams, rank_params, stage_layers

GiB = 2**30
ENGINES = ("hf", "megatron", "vllm")


@dataclass(frozen=True)
class RolloutSettings:
    """The GRPO rollout engine as ``conf/rl/*.yaml`` configures it."""

    engine: str = "megatron"
    tensor_parallel: Optional[int] = None  # megatron: a TP=N copy (None: the policy itself); vllm: its TP
    max_batch: int = 64  # sequences generated at once
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 8192
    kv_cache_fraction: Optional[float] = None  # megatron: cap the batch so KV + prefill fit this share of the GPU
    gpu_memory_utilization: float = 0.5  # vllm: its share of the GPU while awake (it sleeps during training)
    reference: bool = True  # a frozen reference model for the KL term


@dataclass(frozen=True)
class PlanSettings:
    gpus: int
    activation: ActivationSettings
    gpu_memory_gb: float = 80.0
    reserve_gb: float = 4.0
    distributed_optimizer: bool = True
    frozen_vision: bool = False  # the ViT is not trained: no gradients or optimizer state for it
    rollout: Optional[RolloutSettings] = None  # None: SFT


@dataclass
class StageMemory:
    stage: int
    params: RankParams
    bytes: dict = field(default_factory=dict)  # weights, grads, optimizer, activations, reference, ...
    rollout_batch: int = 0  # sequences the engine generates at once on this stage

    PERSISTENT = ("weights", "grads", "optimizer", "reference", "rollout_weights")
    PHASES = ("activations", "kv_cache", "rollout_logits", "vllm")

    @property
    def peak(self) -> float:
        b = self.bytes
        train = b.get("activations", 0.0)
        rollout = b.get("kv_cache", 0.0) + b.get("rollout_logits", 0.0) + b.get("vllm", 0.0)
        return sum(b.get(k, 0.0) for k in self.PERSISTENT) + max(train, rollout) + b.get("reserve", 0.0)


@dataclass
class Plan:
    args: Qwen25VLArgs
    layout: ParallelLayout
    settings: PlanSettings
    stages: list[StageMemory]

    @property
    def data_parallel(self) -> int:
        return self.settings.gpus // self.layout.world_size

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.settings.gpu_memory_gb * GiB

    @property
    def total_params(self) -> int:
        tp = self.layout.tensor_parallel
        return sum(rank_params(self.args, self.layout, s, r).unique for s in range(self.layout.pipeline_parallel)
                   for r in range(tp))


def check_world(layout: ParallelLayout, gpus: int) -> None:
    if gpus < 1 or gpus % layout.world_size:
        raise ConfigError(f"{gpus} GPUs do not hold whole replicas of TP={layout.tensor_parallel} x "
                          f"CP={layout.context_parallel} x PP={layout.pipeline_parallel} "
                          f"({layout.world_size} GPUs each): use a multiple of {layout.world_size}")


def kv_bytes_per_token(args: Qwen25VLArgs, tensor_parallel: int, layers: int, elem: int) -> int:
    """K and V of ``layers`` layers for one token, on one tensor-parallel rank."""
    return 2 * max(1, args.num_kv_heads // tensor_parallel) * args.head_dim * layers * elem


def rollout_rows(args: Qwen25VLArgs, layout: ParallelLayout, elem: int, *, max_batch: int,
                 kv_cache_fraction: Optional[float], prompt_tokens: int, response_tokens: int,
                 device_bytes: Optional[float], at_least_one: bool = True) -> int:
    """Sequences the megatron engine generates at once on ``layout``: ``max_batch``, or fewer where
    their KV cache and prefill logits would not fit ``kv_cache_fraction`` of ``device_bytes``; at
    least one. Every pipeline stage must cut the same batches, so the deepest stage, counted with
    the last stage's logits, decides."""
    if not kv_cache_fraction or device_bytes is None:
        return max_batch
    tp = layout.tensor_parallel
    per_seq = kv_bytes_per_token(args, tp, max(stage_layers(args, layout)), elem) * (prompt_tokens + response_tokens)
    per_seq += prompt_tokens * args.padded_vocab_size(tp) // tp * elem
    fit = min(max_batch, int(kv_cache_fraction * device_bytes // per_seq))
    return max(1, fit) if at_least_one else fit


def _rollout(args: Qwen25VLArgs, layout: ParallelLayout, stage: int, r: RolloutSettings, elem: int,
             gpu_bytes: float) -> tuple[dict, int]:
    if r.engine not in ENGINES:
        raise ConfigError(f"rl.engine must be one of {ENGINES}, got {r.engine!r}")
    last = stage == layout.pipeline_parallel - 1
    seq = r.max_prompt_tokens + r.max_response_tokens
    if r.engine == "vllm":  # its own TP copy, awake only while generating (sleep mode otherwise)
        return {"vllm": r.gpu_memory_utilization * gpu_bytes}, r.max_batch
    if r.engine == "hf":  # a whole transformers model on every rank
        engine_layout = ParallelLayout()
    elif r.tensor_parallel:  # a TP=N copy of the whole model, refit after each update
        engine_layout = ParallelLayout(tensor_parallel=int(r.tensor_parallel))
    else:  # the policy's own weights
        engine_layout = layout
    if engine_layout is layout:
        layers, weights = stage_layers(args, layout)[stage], 0
    else:
        layers, weights, last = args.num_layers, rank_params(args, engine_layout, 0).held * elem, True
    tp = engine_layout.tensor_parallel
    batch = rollout_rows(args, engine_layout, elem, max_batch=r.max_batch, kv_cache_fraction=r.kv_cache_fraction,
                         prompt_tokens=r.max_prompt_tokens, response_tokens=r.max_response_tokens,
                         device_bytes=gpu_bytes)
    vocab = args.padded_vocab_size(tp) // tp
    return {"rollout_weights": weights,
            "kv_cache": batch * seq * kv_bytes_per_token(args, tp, layers, elem),
            "rollout_logits": batch * r.max_prompt_tokens * vocab * elem if last else 0.0}, batch


def plan(args: Qwen25VLArgs, layout: ParallelLayout, settings: PlanSettings) -> Plan:
    """The memory of one rank of every pipeline stage under ``settings``."""
    check_world(layout, settings.gpus)
    args.check_parallel(layout.tensor_parallel, layout.pipeline_parallel, layout.num_layers_in_first_pipeline_stage)
    elem = settings.activation.elem
    shards = settings.gpus // layout.world_size * layout.context_parallel if settings.distributed_optimizer else 1
    adam = 3 * 4 if elem != 4 else 2 * 4  # fp32 master copy + two moments; fp32 weights are their own master
    gpu_bytes = settings.gpu_memory_gb * GiB
    stages = []
    for stage in range(layout.pipeline_parallel):
        params = rank_params(args, layout, stage)  # TP rank 0 holds the most (replicated norms, first vocab rows)
        trainable = params.held - (params.vision if settings.frozen_vision else 0)
        memory = StageMemory(stage, params)
        b = memory.bytes
        b["weights"] = params.held * elem
        b["grads"] = trainable * 4
        b["optimizer"] = trainable * adam / shards
        b["activations"] = sum(stage_bytes(args, layout, stage, params.lm_layers, settings.activation).values())
        if settings.rollout is not None:
            if settings.rollout.reference:
                b["reference"] = params.held * elem
            parts, memory.rollout_batch = _rollout(args, layout, stage, settings.rollout, elem, gpu_bytes)
            b.update(parts)
        b["reserve"] = settings.reserve_gb * GiB
        stages.append(memory)
    return Plan(args, layout, settings, stages)


def balanced_first_stage(args: Qwen25VLArgs, layout: ParallelLayout, settings: PlanSettings) -> ParallelLayout:
    """``layout`` with the LM layers on the ViT's stage that give the lowest peak."""
    pp = layout.pipeline_parallel
    if pp == 1:
        return replace(layout, num_layers_in_first_pipeline_stage=None)
    best = None
    for first in range(1, args.num_layers):
        if (args.num_layers - first) % (pp - 1):
            continue
        candidate = replace(layout, num_layers_in_first_pipeline_stage=first)
        peak = plan(args, candidate, settings).peak
        if best is None or peak < best[0]:
            best = (peak, candidate)
    if best is None:
        raise ConfigError(f"{args.num_layers} LM layers cannot fill {pp} pipeline stages")
    return best[1]


def search(args: Qwen25VLArgs, settings: PlanSettings, *, gpu_counts: list[int], gpus_per_node: int = 8,
           top: int = 5) -> list[Plan]:
    """The cheapest layouts that fit: fewest GPUs, then the least model parallelism (TP within a
    node, PP across), then the least recomputation, then the lowest peak."""
    found = []
    for gpus in sorted(gpu_counts):
        for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node):
            try:
                args.check_parallel(tp, 1)
            except ConfigError:
                continue
            for pp in range(1, args.num_layers + 1):
                if gpus % (tp * pp):
                    continue
                layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=tp > 1)
                for recompute in RECOMPUTE:
                    s = replace(settings, gpus=gpus, activation=replace(settings.activation, recompute=recompute))
                    try:
                        candidate = plan(args, balanced_first_stage(args, layout, s), s)
                    except ConfigError:
                        continue
                    if candidate.fits:
                        found.append(candidate)
        if len(found) >= top:
            break
    found.sort(key=lambda p: (p.settings.gpus, p.layout.world_size, p.layout.pipeline_parallel,
                              RECOMPUTE.index(p.settings.activation.recompute), p.peak))
    return found[:top]
