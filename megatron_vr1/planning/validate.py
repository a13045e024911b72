"""What can be known to be wrong with a job before it starts, checked in one place: the trainers
call it first thing, ``dry_run=true`` and ``tools/plan.py`` call it before planning, and
``tools/launch/torchrun.sh`` (through the planner) before starting any node. One set of exit
statuses follows: 0 fits, 1 does not fit the GPU memory, 2 wrong settings.
"""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import DictConfig

from ..config import model_from_conf
from ..errors import UsageError
from ..models.qwen2_5_vl import ParallelLayout

DTYPES = ("auto", "bf16", "fp32")
RECOMPUTE = ("none", "selective", "full")
BACKENDS = ("auto", "local", "fused", "te")


def job_world_size(cfg: DictConfig, layout: ParallelLayout) -> int:
    """``plan.gpus``, else torchrun's world size, else one replica of the layout."""
    plan = cfg.get("plan") or {}
    if plan.get("gpus"):
        return int(plan.gpus)
    return int(os.environ.get("WORLD_SIZE", layout.world_size))


def check_job(cfg: DictConfig, world_size: Optional[int]) -> ParallelLayout:
    """Raise :class:`UsageError` naming the first setting of an SFT or GRPO config (``rl`` present)
    that cannot work on ``world_size`` processes (None: on any number, as a layout search asks);
    returns the layout."""
    _, layout = model_from_conf(cfg.model)
    rl = cfg.get("rl")
    if rl is not None and layout.context_parallel > 1 and rl.engine != "hf":
        raise UsageError(f"rl.engine={rl.engine} generates on the training ranks, which context parallelism splits; "
                         f"with model.parallel.context_parallel={layout.context_parallel} use rl.engine=hf")
    replica = layout.tensor_parallel * layout.context_parallel * layout.pipeline_parallel
    if world_size is not None and world_size % replica:
        raise UsageError(f"world size {world_size} is not divisible by tensor_parallel "
                         f"({layout.tensor_parallel}) x context_parallel ({layout.context_parallel}) x "
                         f"pipeline_parallel ({layout.pipeline_parallel}) = {replica}: use a multiple of {replica}")
    dp = None if world_size is None else world_size // replica
    train = cfg.train
    if str(train.dtype) not in DTYPES:
        raise UsageError(f"train.dtype must be one of {', '.join(DTYPES)}, got {train.dtype!r}")
    if str(train.get("recompute", "none")) not in RECOMPUTE:
        raise UsageError(f"train.recompute must be none, selective or full, got {train.recompute!r}")
    if str(cfg.get("backend", "auto")) not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if "rl" in cfg:
        _check_rl(cfg, layout, dp)
    elif int(train.micro_batch_tokens) < int(cfg.data.max_tokens):
        raise UsageError(f"train.micro_batch_tokens ({train.micro_batch_tokens}) must be at least data.max_tokens "
                         f"({cfg.data.max_tokens}): a sample at the cut-off must fit a micro-batch")
    return layout


def _check_megatron_engine(cfg: DictConfig, layout: ParallelLayout, stages) -> None:
    """``rl.engine_options`` of the megatron engine: the batching mode, the KV block size, and a KV
    share that holds at least one request of the longest stage (where the GPU's memory is known)."""
    from omegaconf import OmegaConf

    from .. import platform
    from ..rl.rollout.base import check_batching
    from .memory import rollout_rows

    options = OmegaConf.to_container(cfg.rl.engine_options, resolve=True) or {}
    check_batching(options.get("batching", "continuous"), options.get("block_size", 256))
    fraction = options.get("kv_cache_fraction")
    device_bytes = platform.device_memory_bytes()
    if device_bytes is None and (cfg.get("plan") or {}).get("gpu_memory_gb"):
        device_bytes = float(cfg.plan.gpu_memory_gb) * 2**30  # the planner's GPU, on a machine without one
    if not fraction or device_bytes is None:
        return
    args, _ = model_from_conf(cfg.model)
    prompt, response = int(cfg.data.max_prompt_tokens), max(s.max_response_tokens for s in stages)
    elem = 4 if str(cfg.train.dtype) in ("fp32", "float32") else 2
    if rollout_rows(args, layout, elem, max_batch=1, kv_cache_fraction=fraction, prompt_tokens=prompt,
                    response_tokens=response, device_bytes=device_bytes, at_least_one=False) < 1:
        raise UsageError(f"rl.engine_options.kv_cache_fraction={fraction} of the GPU's "
                         f"{device_bytes / 2**30:.0f} GiB cannot hold one request of {prompt} prompt + {response} "
                         f"response tokens: raise it, or lower data.max_prompt_tokens or the stages' budgets")


def _check_rl(cfg: DictConfig, layout: ParallelLayout, dp: Optional[int]) -> None:
    from ..rl.ptst import parse_stages
    from ..rl.settings import check_rl_settings, dynamic_sampling_settings

    rl = cfg.rl
    if rl.engine not in ("hf", "megatron", "vllm"):
        raise UsageError(f"rl.engine must be hf, megatron or vllm, got {rl.engine!r}")
    check_rl_settings(rl)
    dynamic_sampling_settings(rl)
    stages = parse_stages(rl.stages)
    if rl.engine == "megatron":
        _check_megatron_engine(cfg, layout, stages)
    needed = int(cfg.data.max_prompt_tokens) + max(s.max_response_tokens for s in stages)
    if int(rl.micro_batch_tokens) < needed:
        raise UsageError(f"rl.micro_batch_tokens ({rl.micro_batch_tokens}) must hold a prompt and a full response: "
                         f"at least data.max_prompt_tokens + the longest stage's max_response_tokens = {needed}")
    for s in stages:
        prompts = s.prompts_per_step or int(rl.rollout.prompts_per_step)
        if dp is not None and prompts % dp:
            raise UsageError(f"stage {s.index}: {prompts} prompts per step do not split over {dp} "
                             f"data-parallel replicas")
    for name in ("ppo_epochs", "mini_batches"):
        if int(rl[name]) < 1:
            raise UsageError(f"rl.{name} must be >= 1, got {rl[name]}")
