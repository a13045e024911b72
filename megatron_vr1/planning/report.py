"""The planner from a trainer's Hydra config: settings, the printed plan, and ``dry_run=true``."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ..config import model_from_conf
from ..models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs
from ..text import counted
from .activations import ActivationSettings
from .counts import RankParams, rank_params, stage_layers
from .memory import GiB, Plan, PlanSettings, RolloutSettings, plan as make_plan
from .validate import job_world_size

COLUMNS = ("weights", "grads", "optimizer", "activations", "reference", "rollout_weights", "kv_cache",
           "rollout_logits", "vllm")


def settings_from_conf(cfg: DictConfig,
                       gpus: Optional[int] = None) -> tuple[Qwen25VLArgs, ParallelLayout, PlanSettings]:
    """The model, its layout and the planner's settings for an SFT (``conf/sft.yaml``) or GRPO
    (``conf/grpo.yaml``) config."""
    args, layout = model_from_conf(cfg.model)
    if layout.sequence_parallel and layout.tensor_parallel == 1:
        layout = replace(layout, sequence_parallel=False)
    train, rl = cfg.train, cfg.get("rl")
    elem = 4 if str(train.dtype) == "fp32" else 2  # auto: bf16, as on GPUs
    activation = ActivationSettings(
        micro_batch_tokens=int((rl or train).micro_batch_tokens), elem=elem, recompute=str(train.recompute),
        recompute_layers=int(train.recompute_layers), image_fraction=float(cfg.plan.image_fraction),
        objective="grpo" if rl is not None else "cross_entropy")
    rollout = None
    if rl is not None:
        options = OmegaConf.to_container(rl.engine_options, resolve=True) or {}
        rollout = RolloutSettings(
            engine=str(rl.engine), tensor_parallel=options.get("tensor_parallel"),
            max_batch=int(rl.rollout.max_batch),
            max_prompt_tokens=int(cfg.data.max_prompt_tokens),
            max_response_tokens=max(int(s.max_response_tokens) for s in rl.stages),
            kv_cache_fraction=options.get("kv_cache_fraction"),
            gpu_memory_utilization=float(options.get("gpu_memory_utilization", 0.5)),
            reference=float(rl.loss.kl_beta) > 0)
    settings = PlanSettings(gpus=gpus or job_world_size(cfg, layout), activation=activation,
                            gpu_memory_gb=float(cfg.plan.gpu_memory_gb), reserve_gb=float(cfg.plan.reserve_gb),
                            distributed_optimizer=bool(train.get("distributed_optimizer", True)),
                            frozen_vision=bool(train.freeze_vision), rollout=rollout)
    return args, layout, settings


def _gib(x: float) -> str:
    return f"{x / GiB:6.1f}"


def layout_line(plan: Plan, name: str) -> str:
    lay, s = plan.layout, plan.settings
    layers = stage_layers(plan.args, lay)
    split = " + ".join(str(n) for n in layers)
    return (f"{name} on {s.gpus} GPUs: TP={lay.tensor_parallel} x CP={lay.context_parallel} x "
            f"PP={lay.pipeline_parallel} x DP={plan.data_parallel}, sequence parallel "
            f"{'on' if lay.sequence_parallel else 'off'}, recompute {s.activation.recompute}; "
            f"LM layers per stage {split} (ViT on stage 0); {s.activation.micro_batch_tokens} tokens per micro-batch")


def format_plan(plan: Plan, name: str) -> str:
    """Per stage: parameters and GiB per rank by part; the total parameter count; the verdict."""
    used = [c for c in COLUMNS if any(st.bytes.get(c) for st in plan.stages)]
    head = f"{'stage':>5} {'params/rank':>12} " + " ".join(f"{c:>{max(len(c), 6)}}" for c in used) + "    peak GiB"
    lines = [layout_line(plan, name), head]
    for st in plan.stages:
        row = f"{st.stage:>5} {st.params.held / 1e9:11.3f}B " + " ".join(
            f"{_gib(st.bytes.get(c, 0.0)):>{max(len(c), 6)}}" for c in used)
        lines.append(row + f"    {_gib(st.peak)}")
    s = plan.settings
    shards = plan.data_parallel * plan.layout.context_parallel
    notes = [f"GiB per rank; peak = weights, grads, optimizer (sharded over {counted(shards, 'rank')}"
             f"{'' if s.distributed_optimizer else ': no, the distributed optimizer is off'})"
             + (", reference, rollout weights" if s.rollout else "")
             + (" + the larger of activations and the rollout's working memory" if s.rollout else " + activations")
             + f" + {s.reserve_gb:g} GiB reserve"]
    if s.rollout and s.rollout.engine != "vllm":
        notes.append(f"rollout: {s.rollout.engine} engine, {plan.stages[-1].rollout_batch} sequences of "
                     f"{s.rollout.max_prompt_tokens} + {s.rollout.max_response_tokens} tokens at once")
    lines += notes
    lines.append(f"total parameters: {plan.total_params:,}")
    worst = max(plan.stages, key=lambda st: st.peak)
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"verdict: {verdict} in {s.gpu_memory_gb:g} GiB GPUs (peak {worst.peak / GiB:.1f} GiB on stage "
                 f"{worst.stage})")
    return "\n".join(lines)


def format_search(found: list[Plan], name: str) -> str:
    if not found:
        return f"{name}: no layout fits; add GPUs, lower micro-batch tokens or turn on recomputation"
    lines = [f"{name}: the cheapest layouts that fit"]
    for p in found:
        lay = p.layout
        first = lay.num_layers_in_first_pipeline_stage
        override = (f"model.parallel.tensor_parallel={lay.tensor_parallel} model.parallel.pipeline_parallel="
                    f"{lay.pipeline_parallel} model.parallel.num_layers_in_first_pipeline_stage="
                    f"{'null' if first is None else first} model.parallel.sequence_parallel="
                    f"{str(lay.sequence_parallel).lower()} train.recompute={p.settings.activation.recompute}")
        lines.append(f"  {p.settings.gpus:4d} GPUs  DP={p.data_parallel:<3d} peak {p.peak / GiB:5.1f} GiB  {override}")
    return "\n".join(lines)


def meta_params(args: Qwen25VLArgs, layout: ParallelLayout) -> list[list[RankParams]]:
    """Every rank's stage built on the meta device: ``[stage][tp_rank]`` parameter counts."""
    from ..models.qwen2_5_vl.parallel import meta_stages, unique_parameter_count

    out: list[list[RankParams]] = [[] for _ in range(layout.pipeline_parallel)]
    for model, stage, tp_rank in meta_stages(args, layout):  # TP ranks come in order within a stage
        vision = sum(p.numel() for p in model.vision.parameters()) if model.vision is not None else 0
        out[stage].append(RankParams(sum(p.numel() for p in model.parameters()), unique_parameter_count(model, tp_rank),
                                     vision, len(model.language_model.decoder.layers)))
    return out


def dry_run(cfg: DictConfig) -> Plan:
    """Check the job as the trainers would, build every rank's stage on the meta device, check the
    planner's counts against them, print the plan and return it (``dry_run=true``)."""
    from .validate import check_job

    args, layout, settings = settings_from_conf(cfg)
    check_job(cfg, world_size=settings.gpus)
    built = meta_params(args, layout)
    for stage, ranks in enumerate(built):
        for tp_rank, got in enumerate(ranks):
            want = rank_params(args, layout, stage, tp_rank)
            if got != want:
                raise RuntimeError(f"planner bug: stage {stage} TP rank {tp_rank} builds {got} but the planner "
                                   f"counts {want}")
    plan = make_plan(args, layout, settings)
    if os.environ.get("RANK", "0") == "0":
        name = cfg.model.get("name", "model")
        print(f"dry run: built all {counted(layout.tensor_parallel * layout.pipeline_parallel, 'stage rank')} of {name} on the "
              f"meta device; their parameter counts match the planner's")
        for stage, ranks in enumerate(built):
            print(f"  stage {stage}: {ranks[0].lm_layers} LM layers{' + ViT' if ranks[0].vision else ''}"
                  f"{' + output layer' if stage == layout.pipeline_parallel - 1 else ''}, "
                  f"{ranks[0].held:,} parameters per rank")
        print(format_plan(plan, name), flush=True)
    return plan
