"""GRPO under PTST on Megatron-Core (``python -m megatron_vr1.rl``, the same under torchrun).

One RL step, in order: this replica's share of the prompts; ``group_size`` rollouts per prompt
(the replica's first rank generates with the engine and shares them); rewards in a process pool;
group advantages; old log-probs from the policy's own forward and reference log-probs from the
frozen initial policy, both on the micro-batches the update uses; ``ppo_epochs`` x
``mini_batches`` optimizer steps on the clipped GRPO loss with k3 KL; weight sync into the engine.
The PTST stage (response budget, group size) follows the step; checkpoints carry it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf

from .. import platform
from ..checkpoint import iter_hf_weights, load_model, save_model
from ..data import RLDataset, ShardedLoader, load_image
from ..kernels import group_advantages
from ..models.qwen2_5_vl import build_model
from ..training.metrics import MetricsLog
from ..training.optimizer import OptimizerSettings, wrap_and_optimize
from ..training.setup import (build_policy, check_data, checkpoints, image_config, load_tokenizer_for, prepare_job,
                              resume_point, save_due, start_parallel)
from ..text import counted
from ..training.step import StepResult, run_micro_batches, train_step
from ..training.stopping import StopRequest
from . import correction
from .grpo import (SEQUENCE, CaptureLogprobs, GRPOObjective, RolloutSequence, TokenValues, micro_batches,
                   mini_batches, response_sample)
from .ptst import parse_stages, stage_at
from .dynamic import DynamicSampler, mixed_groups
from .reward import RewardPool, overlong_shaping, timeout_warning
from .settings import check_rl_settings, dynamic_sampling_settings, fields_of, gspo_clip_note
from .rollout import SamplingParams, make_engine

REFERENCE = "reference"  # <checkpoint.dir>/reference: the initial weights when there is no init_from


def _seed(base: int, step: int, rank: int) -> int:
    return (base * 1_000_003 + step * 7_919 + rank) % 2**31


@dataclass
class Rollouts:
    """This replica's rollout batch, the same on all of its ranks (one entry per completion)."""

    tokens: list
    texts: list
    finish: list
    rewards: list
    format_ok: list
    correct: list
    timed_out: list
    logprobs: list  # per completion: the engine's per-token log-probs (None where it gives none)

    def extended(self, more: "Rollouts") -> "Rollouts":
        """These rollouts followed by ``more`` (another round of the same step)."""
        return Rollouts(*(getattr(self, f.name) + getattr(more, f.name) for f in fields(self)))


def _reference(cfg: DictConfig, par, model, resume) -> torch.nn.Module:
    """The frozen reference policy: ``init_from``'s weights, else the run's initial weights (saved
    beside its checkpoints at the start, so a resumed run has the same reference)."""
    ref = build_model(par.args, par.layout, backend=par.backend, dtype=par.dtype)
    if platform.has_cuda():
        ref = ref.cuda()
    if cfg.init_from:
        load_model(ref, cfg.init_from)
    else:
        path = Path(cfg.checkpoint.dir) / REFERENCE
        if resume is None:
            save_model(model, path, overwrite=True, metadata={"role": "reference"})
        load_model(ref, path)
    ref.requires_grad_(False)
    return ref.eval()


def run(cfg: DictConfig) -> None:
    rl = cfg.rl
    prepare_job(cfg)
    loss_settings, reward_settings = check_rl_settings(rl)
    dynamic = dynamic_sampling_settings(rl)
    note = gspo_clip_note(rl)
    par = start_parallel(cfg)
    stages = parse_stages(rl.stages)
    total_steps = stages[-1].first_step + stages[-1].steps - 1
    tok_dir, tokenizer = load_tokenizer_for(cfg, par.args)
    images = image_config(cfg)
    dataset = RLDataset(cfg.data.train, tokenizer, par.args, image_root=cfg.data.image_root,
                        max_tokens=int(cfg.data.max_prompt_tokens), image_cfg=images,
                        skip_bad_samples=bool(cfg.data.skip_bad_samples))
    check_data(cfg, dataset, par)
    per_step = {s.index: s.prompts_per_step or int(rl.rollout.prompts_per_step) for s in stages}
    epochs, minis = int(rl.ppo_epochs), int(rl.mini_batches)
    temperature = float(rl.rollout.temperature)
    logp_temperature = temperature if temperature > 0 else 1.0  # greedy rollouts score the plain softmax

    ckpts = checkpoints(cfg, images, tok_dir)
    resume = resume_point(cfg, ckpts, writer=par.is_writer)
    model = build_policy(cfg, par, resume=resume)
    ref = _reference(cfg, par, model, resume) if loss_settings.kl_beta > 0 else None
    settings = OptimizerSettings(**fields_of(OptimizerSettings, cfg.train))
    ddp, optimizer, scheduler = wrap_and_optimize(model, settings, total_steps * epochs * minis)
    loader = ShardedLoader(dataset, seed=int(cfg.seed), dp_rank=par.dp_rank, dp_size=par.dp_size,
                           shuffle=bool(cfg.data.shuffle), num_workers=int(cfg.data.num_workers))
    step = 0
    if resume is not None:
        state = ckpts.load(resume, model, optimizer, scheduler)
        step = int(state["step"])
        loader.load_state_dict(state["data"])

    mp_group = ps.get_model_parallel_group()  # TP x PP: one per context-parallel rank of the replica
    cp_group = ps.get_context_parallel_group()
    leader = par.replica_leader
    leader_rank = min(dist.get_process_group_ranks(mp_group))
    engine_options = OmegaConf.to_container(rl.engine_options, resolve=True) or {}
    if rl.engine in ("hf", "megatron"):
        engine_options.setdefault("max_batch", int(rl.rollout.max_batch))
        engine_options.setdefault("dtype", par.dtype)
    if rl.engine == "megatron":
        engine_options["policy"] = model
    engine = make_engine(rl.engine, par.args, tokenizer, **engine_options) \
        if leader or rl.engine in ("vllm", "megatron") else None
    spmd = engine is not None and engine.spmd
    rewards = RewardPool(workers=reward_settings.workers, timeout=reward_settings.timeout,
                         require_final_answer=reward_settings.require_final_answer) if leader else None
    bucket_bytes = int(rl.weight_sync_bucket_mb) << 20

    def sync_weights() -> float:
        start = time.perf_counter()
        if engine is not None and spmd:  # every rank has one
            engine.sync_from(model, bucket_bytes)
        else:
            buckets = iter_hf_weights(model, bucket_bytes)
            if engine is not None:
                engine.load_weights(buckets)
            else:
                for _ in buckets:  # a collective: every rank takes part
                    pass
        return time.perf_counter() - start

    sync_weights()
    metrics = MetricsLog(cfg.checkpoint.dir, total_steps=total_steps, start_step=step, enabled=par.is_writer,
                         tensorboard=bool(cfg.metrics.tensorboard), progress=cfg.metrics.progress, name="grpo")
    if par.is_writer:
        plan = ", ".join(f"{s.steps} x ({s.max_response_tokens} tokens, {s.group_size} rollouts)" for s in stages)
        origin = f"resumed from {resume}" if resume else (f"from {cfg.init_from}" if cfg.init_from else "random init")
        print(f"grpo: {len(dataset)} prompts, stages {plan}, engine {rl.engine}, TP={par.layout.tensor_parallel} "
              f"CP={par.layout.context_parallel} PP={par.layout.pipeline_parallel} DP={par.dp_size}, {origin}", flush=True)
    if par.is_writer and note:
        print(note, flush=True)
    stop = StopRequest()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dp_group = ps.get_data_parallel_group()
    device = platform.device()
    try:
        while step < total_steps:
            step += 1
            stage = stage_at(stages, step)
            times = {}
            t0 = time.perf_counter()
            g = stage.group_size

            def rollout_round(prompts: list, round_index: int) -> Rollouts:
                """Rollouts and rewards for ``prompts`` on the replica's first rank (every rank with an
                SPMD engine), shared with the replica's other ranks. Each round draws its own samples."""
                t1 = time.perf_counter()
                seed = _seed(int(cfg.seed), step, par.dp_rank) + 104_729 * round_index
                params = SamplingParams(n=g, max_new_tokens=stage.max_response_tokens, temperature=temperature,
                                        top_p=float(rl.rollout.top_p), seed=seed)
                payload = [None]
                if engine is not None and (leader or spmd):
                    engine.wake()
                    extra = {"images": [[load_image(i, dataset.image_root) for i in p.image_sources]
                                        for p in prompts]} if engine.wants_pil_images else {}
                    outs = engine.generate([p.sample for p in prompts], params, **extra) if prompts else []
                    engine.sleep()
                    spent = {"rollout": time.perf_counter() - t1}
                    flat = [c for group in outs for c in group]
                    answers = [p.answer for p in prompts for _ in range(g)]
                    t2 = time.perf_counter()
                    infos = rewards.score([c.text for c in flat], answers) if leader else []
                    spent["reward"] = time.perf_counter() - t2
                    paid = [i.reward + overlong_shaping(len(c.token_ids), budget=stage.max_response_tokens,
                                                        buffer=reward_settings.overlong_buffer,
                                                        factor=reward_settings.overlong_penalty)
                            for i, c in zip(infos, flat)]
                    warning = timeout_warning(step, infos, reward_settings)
                    if warning:
                        print(warning, file=sys.stderr, flush=True)
                    if reward_settings.shuffle:
                        order = np.random.default_rng(_seed(int(cfg.seed), step, 20_000 + par.dp_rank)
                                                      + 104_729 * round_index).permutation(len(paid))
                        paid = [paid[k] for k in order]
                    payload = [([c.token_ids for c in flat], [c.text for c in flat], [c.finish_reason for c in flat],
                                paid, [i.format_ok for i in infos], [i.correct for i in infos],
                                [i.timed_out for i in infos], [c.logprobs for c in flat], spent)]
                if dist.get_world_size(mp_group) > 1:  # the rewards are the leader's, also under an SPMD engine
                    dist.broadcast_object_list(payload, src=leader_rank, group=mp_group)
                if par.layout.context_parallel > 1:  # then from context-parallel rank 0 to the others
                    dist.broadcast_object_list(payload, src=min(dist.get_process_group_ranks(cp_group)),
                                               group=cp_group)
                *values, spent = payload[0]
                for k, v in spent.items():
                    times[k] = times.get(k, 0.0) + v
                return Rollouts(*values)

            # ---- rollout and reward; with dynamic sampling, more rounds until enough groups carry signal
            prompts = loader.take(per_step[stage.index] // par.dp_size)
            batch = rollout_round(prompts, 0)
            sampling = None
            if dynamic.enabled:
                sampling = DynamicSampler(dynamic, target=per_step[stage.index], group_size=g, dp_group=dp_group,
                                          device=device)
                while sampling.wants_more(batch.rewards):
                    more = loader.take(sampling.next_draw(par.dp_size))
                    prompts += more
                    batch = batch.extended(rollout_round(more, sampling.rounds))

            # ---- advantages, training sequences, mini- and micro-batches
            reward_t = torch.tensor(batch.rewards, dtype=torch.float32)
            adv = group_advantages(reward_t, g, std=rl.loss.advantage_std, eps=float(rl.loss.advantage_eps),
                                   backend="torch") if len(reward_t) else reward_t
            keep = torch.ones(len(prompts), dtype=torch.bool)
            if sampling is not None:
                keep = sampling.keep(batch.rewards)
            elif rl.loss.drop_equal_groups and len(reward_t):
                keep = mixed_groups(batch.rewards, g)
            masked = [loss_settings.mask_truncated and f == "length" for f in batch.finish]
            seqs = [RolloutSequence(response_sample(p.sample, batch.tokens[i * g + j]), float(adv[i * g + j]),
                                    batch.logprobs[i * g + j])
                    for i, p in enumerate(prompts) if keep[i] for j in range(g) if not masked[i * g + j]]
            variant_sums = {"truncated_masked": sum(m for i, m in enumerate(masked) if keep[i // g]),
                            "overlong_penalized": sum(pen < 0 for pen in (
                                overlong_shaping(len(t), budget=stage.max_response_tokens,
                                                 buffer=reward_settings.overlong_buffer, factor=1.0)
                                for t in batch.tokens))}

            def epoch_plan(epoch: int) -> list[list]:
                """This epoch's mini-batches (its own split of the sequences), packed into micro-batches."""
                parts = mini_batches(seqs, minis, _seed(int(cfg.seed), step, 10_000 + 1_009 * epoch + par.dp_rank))
                return [[b.to(device, non_blocking=True) for b in micro_batches(
                    seqs, par.args, max_tokens=int(rl.micro_batch_tokens), pad_to=par.pad_to, pad_id=pad_id,
                    group=dp_group, sequence_multiple=par.sequence_multiple, shard=par.shard, indices=part)]
                    for part in parts]

            plan = epoch_plan(0)
            flat_batches = [b for part in plan for b in part]

            # ---- old and reference log-probs, on the very micro-batches the update uses
            t1 = time.perf_counter()
            if flat_batches:  # none on any replica: every group was left out (equal rewards, truncation)
                run_micro_batches(ddp, flat_batches, CaptureLogprobs("old_logprobs", logp_temperature),
                                  forward_only=True)
            times["old_logprobs"] = time.perf_counter() - t1
            correction.attach_weights(flat_batches, loss_settings.rollout_correction,
                                      loss_settings.rollout_correction_cap, len(seqs), SEQUENCE,
                                      cp_group if par.layout.context_parallel > 1 else None)
            gap = correction.mismatch(flat_batches, device, with_weights=loss_settings.rollout_correction is not None)
            if ref is not None and flat_batches:
                t1 = time.perf_counter()
                run_micro_batches(ref, flat_batches, CaptureLogprobs("ref_logprobs", logp_temperature),
                                  forward_only=True)
                times["ref_logprobs"] = time.perf_counter() - t1

            # ---- update: ppo_epochs x mini_batches optimizer steps
            t1 = time.perf_counter()
            objective = GRPOObjective(loss_settings, temperature=logp_temperature,
                                      max_response_tokens=stage.max_response_tokens)
            # a mini-batch without micro-batches on every replica (fewer sequences than mini-batches) is no step
            results = [train_step(ddp, optimizer, scheduler, part, objective) for part in plan if part]
            if epochs > 1 and flat_batches:  # the log-probs follow their tokens into each later epoch's split
                kept = TokenValues(flat_batches, ("old_logprobs", "ref_logprobs", correction.WEIGHTS))
                for epoch in range(1, epochs):
                    plan = [[kept.attach(b) for b in part] for part in epoch_plan(epoch)]
                    results += [train_step(ddp, optimizer, scheduler, part, objective) for part in plan if part]
            times["update"] = time.perf_counter() - t1
            times["sync"] = sync_weights()
            elapsed = time.perf_counter() - t0
            if not results:
                results = [StepResult(loss=0.0, tokens=0, sums=dict.fromkeys(GRPOObjective.sum_names, 0.0),
                                      grad_norm=0.0, lr=float(optimizer.param_groups[0]["lr"]), updated=False)]
            metrics.log(step, {**_step_metrics(batch, adv, keep, seqs, results, stage, times, elapsed, dp_group, device,
                                               with_kl=ref is not None), **gap,
                               **_variant_metrics(variant_sums, sampling, loss_settings, reward_settings, dp_group,
                                                  device)})

            stopping = stop.agreed()
            if save_due(cfg, step, total_steps, stopping):
                ckpts.save(step, model, optimizer, scheduler, {"data": loader.state_dict(), "stage": stage.index})
            if stopping:
                if par.is_writer:
                    print(f"grpo: stopped at step {step} on request; checkpoint saved; the same command "
                          f"goes on from it", flush=True)
                break
    finally:
        metrics.close()
        loader.close()
        stop.restore()
        if rewards is not None:
            rewards.close()
    if par.is_writer and step >= total_steps:
        print(f"grpo: done, {counted(step, 'step')}; last checkpoint {ckpts.latest()}", flush=True)
    platform.shutdown_distributed()
    if stop.exit_code:  # stopped early: not done, and a shell must know it
        sys.exit(stop.exit_code)


def _variant_metrics(sums: dict, sampling, loss, reward, dp_group, device) -> dict:
    """The GRPO variants' own numbers, where they are on (summed over data-parallel replicas)."""
    out = {}
    if loss.mask_truncated or reward.overlong_buffer:
        values = torch.tensor([float(sums[k]) for k in sums], dtype=torch.float64, device=device)
        dist.all_reduce(values, group=dp_group)
        wanted = {"truncated_masked": loss.mask_truncated, "overlong_penalized": bool(reward.overlong_buffer)}
        out.update({k: int(v) for k, v in zip(sums, values.tolist()) if wanted[k]})
    if sampling is not None:
        out.update(sampling.metrics())
    return out


def _step_metrics(batch: Rollouts, adv: torch.Tensor, keep, seqs, results, stage, times, elapsed, dp_group,
                  device, *, with_kl: bool) -> dict:
    """One JSON line: rollout statistics over all data-parallel replicas, the update's, timings.
    Without a reference model (``kl_beta`` 0) there is no KL to report, so no ``kl`` key."""
    lengths = [len(t) for t in batch.tokens]
    n = len(batch.rewards)
    sums = torch.tensor([n, sum(batch.rewards), sum(batch.format_ok), sum(batch.correct), sum(lengths),
                         sum(f == "length" for f in batch.finish), float(adv.sum()) if n else 0.0,
                         float((adv ** 2).sum()) if n else 0.0, int((~keep).sum()),
                         sum(len(s.sample) for s in seqs), sum(batch.timed_out)], dtype=torch.float64, device=device)
    extremes = torch.tensor([max(lengths, default=0), float(adv.max()) if n else -1e30,
                             -float(adv.min()) if n else -1e30], dtype=torch.float64, device=device)
    dist.all_reduce(sums, group=dp_group)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=dp_group)
    (n, reward, fmt, correct, length, truncated, adv_sum, adv_sq, dropped, tokens, timeouts), \
        (longest, adv_max, neg_min) = sums.tolist(), extremes.tolist()
    n = max(n, 1)
    update = {k: sum(r.sums[k] for r in results) for k in results[0].sums}
    resp = max(update["response_tokens"], 1)
    adv_mean = adv_sum / n
    out = {"stage": stage.index, "group_size": stage.group_size, "max_response_tokens": stage.max_response_tokens,
           "reward_mean": reward / n, "accuracy": correct / n, "format_rate": fmt / n,
           "response_length_mean": length / n, "response_length_max": longest, "truncated_frac": truncated / n,
           "groups_dropped": int(dropped), "reward_timeouts": int(timeouts), "adv_mean": adv_mean, "adv_std": max(adv_sq / n - adv_mean ** 2, 0.0) ** 0.5,
           "adv_max": adv_max, "adv_min": -neg_min,
           "loss": float(np.mean([r.loss for r in results])), "grad_norm": results[-1].grad_norm,
           "lr": results[-1].lr, **({"kl": update["kl"] / resp} if with_kl else {}),
           "clip_frac": update["clipped"] / resp,
           "entropy": update["entropy"] / resp, "tokens": int(tokens), "tokens_per_s": tokens / elapsed,
           "time_step": elapsed}
    out.update({f"time_{k}": v for k, v in times.items()})
    if "rollout" in times and times["rollout"] > 0:
        out["rollout_tokens_per_s"] = length / times["rollout"]
    if platform.memory_peak_gb() is not None:  # this rank's, since the start: the planner's peak
        out["memory_peak_gb"] = platform.memory_peak_gb()
    return out
