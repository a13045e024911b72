"""megatron-core's DDP, distributed optimizer and learning-rate schedule around a built model.

bf16 parameters with fp32 main parameters and gradients on GPU, fp32 throughout on CPU. The loss
is normalised per token over the global batch (``calculate_per_token_loss``): gradients are sums
until ``finalize_model_grads`` divides them by the token count all-reduced over data-parallel
ranks, so TP, PP, DP and the number of micro-batches never change the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .. import platform

LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimizerSettings:
    """The optimizer part of a trainer's config (``train.*`` in ``conf/sft.yaml``)."""

    lr: float = 5e-6
    min_lr: float = 0.0
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    freeze_vision: bool = False
    freeze_merger: bool = False
    distributed_optimizer: bool = True  # Adam's fp32 state sharded over data-parallel ranks


def freeze(model: torch.nn.Module, *, vision: bool, merger: bool) -> int:
    """Stop training the ViT blocks (and patch embedding) and/or the merger; parameters frozen."""
    frozen = 0
    if getattr(model, "vision", None) is None:
        return 0
    for name, p in model.vision.named_parameters():
        if (merger and name.startswith("merger.")) or (vision and not name.startswith("merger.")):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def wrap_and_optimize(model: torch.nn.Module, settings: OptimizerSettings, total_steps: int,
                      overlap_grad_reduce: bool = False):
    """(DDP-wrapped model, megatron optimizer, LR scheduler) for a built model; collective."""
    if settings.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {settings.lr_schedule!r}")
    freeze(model, vision=settings.freeze_vision, merger=settings.freeze_merger)
    config = model.config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                               use_distributed_optimizer=settings.distributed_optimizer)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    dtype = next(model.parameters()).dtype
    opt_config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
        use_distributed_optimizer=settings.distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=not platform.has_cuda())
    warmup = int(round(settings.warmup_ratio * total_steps))
    # warmup from lr / (w + 1): step k (from 0) runs at lr * (k + 1) / (w + 1), so the first step
    # learns too (from 0, megatron-core's default, it would run at lr 0) and step w reaches lr
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=settings.lr / (warmup + 1), max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, 1), lr_decay_style=settings.lr_schedule,
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # on resume the schedule is the config's (a run may be extended); only the step count is restored
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    return ddp, optimizer, scheduler
