"""torchrun worker: context parallelism against the same model without it.

The data layer's samples (text only, one image, two images, long enough that each sequence spans
several chunks) run packed in one micro-batch twice: whole, through a model built without context
parallelism, and split over the context-parallel ranks (``Batch.context_shard``) through the same
weights built with it. Each rank records the summed model cross-entropy, vocab-parallel log-probs,
GRPO loss and ``aggregate_loss`` parts of its share and of the whole batch, and the gradients of
both; the test sums the shares over context-parallel ranks. Rank N writes ``rankN.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import chat_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--sequence-parallel", action="store_true")
    opts = parser.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_vr1 import platform
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import load_tokenizer, packed_batch
    from megatron_vr1.kernels import aggregate_loss, grpo_loss, token_logprobs
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, build_model

    platform.init_distributed(opts.tp, 1, seed=7, context_parallel_size=opts.cp)
    args, _ = model_from_conf(load_model_conf("tiny"))
    layout = ParallelLayout(tensor_parallel=opts.tp, sequence_parallel=opts.sequence_parallel,
                            context_parallel=opts.cp)
    split = build_model(args, layout, backend="local").eval()  # eval: no dropout; gradients still flow
    whole = build_model(args, ParallelLayout(tensor_parallel=opts.tp, sequence_parallel=opts.sequence_parallel),
                        backend="local").eval()
    whole.load_state_dict(split.state_dict())
    tp_group, cp_group = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()
    cp_rank = ps.get_context_parallel_rank()
    tok = load_tokenizer(opts.tokenizer)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")

    samples = chat_samples(tok, args, [
        ("Add 2 and 3.", [], "<think> 2 + 3 = 5 </think><answer> Final Answer: 5 </answer>"),
        ("<image>How many circles?", [(224, 168)], "<think> I count 4, then 4 again. </think><answer> 4 </answer>"),
        ("Say yes.", [], "yes"),
        ("<image>Compare <image> the bars.", [(56, 56), (112, 84)], "<answer> B </answer>")])
    advantages = torch.tensor([0.7, -1.3, 0.2, -0.4])
    multiple = 2 * opts.cp
    pad_to = multiple * (opts.tp if opts.sequence_parallel else 1)
    full = packed_batch(samples, args, pad_to_multiple_of=pad_to, sequence_multiple=multiple, pad_id=pad_id)
    full.extras["advantages"] = full.per_token(advantages)
    full.extras["offset"] = full.per_token(torch.tensor([0.3, -0.2, 0.05, -1.5]))
    share = full.context_shard(opts.cp, cp_rank)

    def run(model, batch):
        model.zero_grad()
        logits = model(**batch.model_inputs())
        ce = model(**batch.model_inputs(with_labels=True))
        mask = batch.loss_mask
        logp = token_logprobs(logits, batch.labels, mask=mask, tp_group=tp_group)
        old, ref = logp.detach() - batch.extras["offset"], logp.detach() + 0.1
        loss, _, kl = grpo_loss(logits, batch.labels, old, ref, batch.extras["advantages"], mask, kl_beta=0.04,
                                clip_low=0.2, clip_high=0.28, tp_group=tp_group)
        context = batch.context
        parts = {mode: aggregate_loss(loss, mask, mode=mode, cu_seqlens=batch.cu_seqlens, max_response_length=64,
                                      sequence_tokens=None if context is None else context.sequence_loss_tokens,
                                      count_sequences=context is None or context.rank == 0)
                 for mode in ("token-mean", "seq-mean-token-mean", "dr-grpo")}
        total = (ce * mask).sum() + sum(p.total for p in parts.values())
        total.backward()
        for p in model.parameters():  # as megatron's finalize_model_grads: SP norms hold partial sums
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=tp_group)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        sums = {"ce": float((ce * mask).sum()), "logp": float(logp.sum()), "grpo": float(loss.sum()),
                "kl": float((kl * mask).sum()), "tokens": int(mask.sum()),
                **{f"{m}/total": float(p.total) for m, p in parts.items()},
                **{f"{m}/count": float(p.count) for m, p in parts.items()}}
        return sums, grads

    whole_sums, whole_grads = run(whole, full)
    share_sums, share_grads = run(split, share)
    torch.distributed.all_reduce(share_grads, group=cp_group)  # as megatron's DDP over DP x CP
    result = {
        "tp_rank": ps.get_tensor_model_parallel_rank(), "cp_rank": cp_rank, "whole": whole_sums, "share": share_sums,
        "grad_rel_diff": float((share_grads - whole_grads).abs().max() / whole_grads.abs().max()),
        "rows": [full.input_ids.shape[1], share.input_ids.shape[1]],
        "image_tokens": [int(full.image_positions.numel()), int(share.image_positions.numel())],
    }
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result, indent=1))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
