"""torchrun worker: the megatron engine on a TP x DP policy, and a copy in another TP layout
refit from it. Each replica's first rank writes ``result.rank<N>.json`` (see test_megatron_engine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def expected_shards(copy, full: dict, args) -> dict:
    """What each of the copy's parameters must hold: the policy's full HF tensors sharded for the
    copy's TP rank by the one name mapping."""
    import torch.distributed as dist

    from megatron_vr1.models.qwen2_5_vl.hf_mapping import iter_model_mappings

    tp_group = copy.pg_collection.tp
    rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    return {name: mapping.shard([full[n] for n in mapping.hf], rank, size)
            for name, _, mapping in iter_model_mappings(copy, args, copy.padded_vocab_size, 0)}


def full_weights(model) -> dict:
    """The policy's full HF-named tensors (a collective: every rank calls it)."""
    from megatron_vr1.checkpoint import iter_hf_weights

    return {name: tensor for bucket in iter_hf_weights(model, bucket_bytes=1 << 16) for name, tensor in bucket}


def mismatches(copy, full: dict, args) -> list[str]:
    want = expected_shards(copy, full, args)
    return [name for name, p in copy.named_parameters() if not torch.equal(p.detach(), want[name])]


def main() -> None:
    tokenizer_dir, out, tp, engine_tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from megatron.core import parallel_state as ps

    from megatron_vr1 import platform
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, build_model
    from megatron_vr1.rl.grpo import RolloutSequence, micro_batches, response_sample
    from megatron_vr1.rl.rollout import SamplingParams, make_engine
    from megatron_vr1.training.optimizer import OptimizerSettings, wrap_and_optimize
    from megatron_vr1.training.step import CrossEntropy, train_step
    from test_megatron_engine import engine_prompts, spread_weights, training_logprobs

    platform.init_distributed(tp, 1, seed=3)
    args, _ = model_from_conf(load_model_conf("toy"))
    model = build_model(args, ParallelLayout(tensor_parallel=tp, sequence_parallel=tp > 1), backend="local")
    spread_weights(model)  # the same full weights on every replica: each rank keeps its own shard
    tok = load_tokenizer(tokenizer_dir)
    leader = ps.get_tensor_model_parallel_rank() == 0
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    prompts = engine_prompts(args, tok)
    prompts = prompts[dp_rank::dp_size]  # each data-parallel replica its own prompts

    hf = make_engine("hf", args, tok) if leader else None
    full = full_weights(model)
    if hf is not None:
        hf.load_weights([list(full.items())])
    engine = make_engine("megatron", args, tok, policy=model, max_batch=3, block_size=16)
    greedy = SamplingParams(n=1, max_new_tokens=24, temperature=0, stop=())
    got = engine.generate(prompts, greedy)
    result = {"tp": tp, "engine_tp": engine_tp}
    if leader:
        want = hf.generate(prompts, greedy)
        result["greedy_equal"] = [c[0].token_ids for c in got] == [c[0].token_ids for c in want]
        result["greedy_tokens"] = sum(len(c[0].token_ids) for c in got)

    sampled = SamplingParams(n=2, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5, stop=())
    outs = engine.generate(prompts, sampled)
    flat = [c for g in outs for c in g]
    rows = [p for p in prompts for _ in range(2)]
    theirs = training_logprobs(model, args, rows, flat, 0.7)
    result["policy_logprob_diff"] = max((torch.tensor(c.logprobs) - t).abs().max().item() for c, t in zip(flat, theirs))

    # ---- a copy in another layout, refit from the policy
    copy_engine = make_engine("megatron", args, tok, policy=model, max_batch=3, tensor_parallel=engine_tp,
                              block_size=16)
    copy_engine.sync_from(model, 1 << 20)
    result["refit_mismatches"] = mismatches(copy_engine.model, full, args)
    result["refit_tensors"] = sum(1 for _ in copy_engine.model.parameters())
    result["copy_greedy_equal"] = [c[0].token_ids for c in copy_engine.generate(prompts, greedy)] == \
        [c[0].token_ids for c in got]

    # ---- an optimizer step on the policy, then the next rollout
    ddp, optimizer, scheduler = wrap_and_optimize(model, OptimizerSettings(lr=3e-2, warmup_ratio=0.0), 1)
    seqs = [RolloutSequence(response_sample(p, c.token_ids), 0.0) for p, c in zip(rows, flat)]
    batches = micro_batches(seqs, args, max_tokens=4096, pad_to=tp, pad_id=0, group=ps.get_data_parallel_group())
    train_step(ddp, optimizer, scheduler, batches, CrossEntropy())
    full = full_weights(model)
    copy_engine.sync_from(model, 1 << 20)
    result["refit_after_step_mismatches"] = mismatches(copy_engine.model, full, args)
    after = copy_engine.generate(prompts, sampled)
    flat_after = [c for g in after for c in g]
    updated = training_logprobs(model, args, rows, flat_after, 0.7)
    result["copy_logprob_diff_after_step"] = max(
        (torch.tensor(c.logprobs) - t).abs().max().item() for c, t in zip(flat_after, updated))
    # the same tokens scored before and after the step: how far the step moved the policy
    before_step = training_logprobs(model, args, rows, flat, 0.7)
    result["logprob_shift_after_step"] = max((a - b).abs().max().item() for a, b in zip(before_step, theirs))
    if leader:
        (out / f"result.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
