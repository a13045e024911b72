"""Cold-start SFT of Qwen2.5-VL on Megatron-Core: ``python -m megatron_vr1.sft`` or, on several
processes and nodes, ``torchrun ... -m megatron_vr1.sft``; running the same command again resumes.

    torchrun --nproc-per-node 8 -m megatron_vr1.sft recipe=sft_7b init_from=ckpt/qwen2_5_vl_7b \\
        data.train=vision_r1_cold.json checkpoint.dir=runs/sft-7b

Config: ``conf/sft.yaml``. Each optimizer step takes the next ``train.global_batch_size`` records
of a seeded epoch order, packs them into micro-batches balanced over data-parallel ranks and
trains on the assistant tokens, normalised by the global batch's token count.
"""

from __future__ import annotations

from .training import quiet  # noqa: F401  (first: before megatron-core is imported)

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import platform
from .entry import hydra_main
from .data import GlobalBatchLoader, SFTDataset
from .training import flops
from .training.metrics import MetricsLog
from .training.optimizer import OptimizerSettings, wrap_and_optimize
from .training.profile import StepProfiler
from .training.setup import (build_policy, check_data, checkpoints, image_config, load_tokenizer_for, main_guard,
                             prepare_job, resume_point, save_due, start_parallel)
from .text import counted
from .training.step import CrossEntropy, train_step
from .training.stopping import StopRequest


def optimizer_settings(train: DictConfig) -> OptimizerSettings:
    fields = OptimizerSettings.__dataclass_fields__
    return OptimizerSettings(**{k: v for k, v in train.items() if k in fields})


def run(cfg: DictConfig) -> None:
    prepare_job(cfg)
    par = start_parallel(cfg)
    tok_dir, tokenizer = load_tokenizer_for(cfg, par.args)
    images = image_config(cfg)
    system_prompt = cfg.data.system_prompt
    kwargs = {} if system_prompt == "default" else {"system_prompt": system_prompt}
    dataset = SFTDataset(cfg.data.train, tokenizer, par.args, image_root=cfg.data.image_root,
                         max_tokens=int(cfg.data.max_tokens), image_cfg=images,
                         skip_bad_samples=bool(cfg.data.skip_bad_samples), **kwargs)
    check_data(cfg, dataset, par)
    train = cfg.train
    total_steps = int(train.steps) if train.steps else math.ceil(float(train.epochs) * len(dataset)
                                                                  / int(train.global_batch_size))
    ckpts = checkpoints(cfg, images, tok_dir)
    resume = resume_point(cfg, ckpts, writer=par.is_writer)
    model = build_policy(cfg, par, resume=resume)
    ddp, optimizer, scheduler = wrap_and_optimize(model, optimizer_settings(train), total_steps)
    loader = GlobalBatchLoader(dataset, seed=int(cfg.seed), global_batch=int(train.global_batch_size),
                               micro_batch_tokens=int(train.micro_batch_tokens), dp_rank=par.dp_rank,
                               dp_size=par.dp_size, shuffle=bool(cfg.data.shuffle),
                               num_workers=int(cfg.data.num_workers), pin_memory=platform.has_cuda())
    step = 0
    if resume is not None:
        state = ckpts.load(resume, model, optimizer, scheduler)
        step = int(state["step"])
        loader.load_state_dict(state["data"])
    metrics = MetricsLog(cfg.checkpoint.dir, total_steps=total_steps, start_step=step, enabled=par.is_writer,
                         tensorboard=bool(cfg.metrics.tensorboard), progress=cfg.metrics.progress, name="sft")
    if par.is_writer:
        origin = f"resumed from {resume}" if resume else (f"from {cfg.init_from}" if cfg.init_from else "random init")
        print(f"sft: {counted(len(dataset), 'record')}, {counted(total_steps, 'step')} of {train.global_batch_size}, "
              f"TP={par.layout.tensor_parallel} CP={par.layout.context_parallel} PP={par.layout.pipeline_parallel} "
              f"DP={par.dp_size}, {origin}",
              flush=True)
    stop = StopRequest()
    profiler = StepProfiler(cfg.metrics.get("profile_step"), Path(cfg.checkpoint.dir) / "profile", par.is_writer)
    objective = CrossEntropy()
    device = platform.device()
    peak = platform.peak_flops()
    trains_vision = not (train.freeze_vision and train.freeze_merger)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    try:
        while step < total_steps:
            start = time.perf_counter()
            data = loader.next_step()
            batches = [par.shard(par.pack(mb, pad_id=pad_id)).to(device, non_blocking=True)
                       for mb in data.micro_batches]
            loaded = time.perf_counter()
            with profiler(step + 1):
                result = train_step(ddp, optimizer, scheduler, batches, objective)
            step += 1
            elapsed = time.perf_counter() - start
            # every rank of a replica sees its records: its first rank counts them
            counts = torch.tensor([len(data.skipped) if par.replica_leader else 0, 0.0], device=device)
            if peak and par.replica_leader:
                counts[1] = flops.train_flops(par.args, [len(s) for mb in data.micro_batches for s in mb],
                                              [g.tolist() for mb in data.micro_batches for s in mb
                                               for g in s.image_grid_thw], vision_trained=trains_vision)
            torch.distributed.all_reduce(counts)  # skipped records and FLOPs over the job
            values = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                      "loss_tokens": result.tokens, "tokens": data.tokens, "tokens_per_s": data.tokens / elapsed,
                      "samples": data.records - int(counts[0]), "skipped": int(counts[0]),
                      "epoch": loader.epoch + loader.offset / len(dataset), "time_step": elapsed,
                      "time_data": loaded - start, "time_forward_backward": result.times["forward_backward"],
                      "time_optimizer": result.times["optimizer"]}
            if peak:
                values["mfu"] = float(counts[1]) / elapsed / (peak * torch.distributed.get_world_size())
            if platform.memory_peak_gb() is not None:  # this rank's, since the start: the planner's peak
                values["memory_peak_gb"] = platform.memory_peak_gb()
            metrics.log(step, values)
            stopping = stop.agreed()
            if save_due(cfg, step, total_steps, stopping):
                ckpts.save(step, model, optimizer, scheduler, {"data": loader.state_dict()})
            if stopping:
                if par.is_writer:
                    print(f"sft: stopped at step {step} on request; checkpoint saved; the same command "
                          f"goes on from it", flush=True)
                break
    finally:
        metrics.close()
        loader.close()
        stop.restore()
    if par.is_writer and step >= total_steps:
        print(f"sft: done, {counted(step, 'step')}; last checkpoint {ckpts.latest()}", flush=True)
    platform.shutdown_distributed()
    if stop.exit_code:  # stopped early: not done, and a shell must know it
        sys.exit(stop.exit_code)


@hydra_main("sft", "sft")
def main(cfg: DictConfig) -> None:
    main_guard(run, cfg, "sft")


if __name__ == "__main__":
    main()
