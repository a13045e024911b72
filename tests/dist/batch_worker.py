"""torchrun worker: the data layer's batches through the model and the loss kernels, at TP x SP.

Samples made by the data layer (text only, one image, two images) run through the tiny model
(``conf/model/tiny.yaml``, Qwen's vocabulary) packed in one batch, packed in two micro-batches,
padded on either side, and one by one. For each layout it records the summed cross-entropy of the
model's ``labels`` path, the vocab-parallel ``token_logprobs`` and ``grpo_loss`` of the kernels,
the ``aggregate_loss`` sums, and the gradient of the total loss; rank N writes ``rankN.json``.
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
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sequence-parallel", action="store_true")
    opts = parser.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_vr1 import platform
    from megatron_vr1.config import load_model_conf, model_from_conf
    from megatron_vr1.data import collate_padded, load_tokenizer, packed_batch
    from megatron_vr1.kernels import aggregate_loss, grpo_loss, token_logprobs
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, build_model

    platform.init_distributed(opts.tp, 1, seed=7)
    args, _ = model_from_conf(load_model_conf("tiny"))
    layout = ParallelLayout(tensor_parallel=opts.tp, sequence_parallel=opts.sequence_parallel)
    model = build_model(args, layout, backend="local")
    model.eval()  # no dropout; gradients still flow
    tp_group = ps.get_tensor_model_parallel_group()
    tok = load_tokenizer(opts.tokenizer)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")

    samples = chat_samples(tok, args, [
        ("Add 2 and 3.", [], "<think> 2 + 3 = 5 </think><answer> Final Answer: 5 </answer>"),
        ("<image>How many circles?", [(84, 56)], "<think> I count 4. </think><answer> 4 </answer>"),
        ("Say yes.", [], "yes"),
        ("<image>Compare <image> the bars.", [(56, 56), (112, 84)], "<answer> B </answer>")])
    advantages = [0.7, -1.3, 0.2, -0.4]
    old_offsets = [0.3, -0.2, 0.05, -1.5]  # old policy a little off the current one: clip and dual clip act

    def run(batch, adv, offset):
        """Summed losses of one micro-batch; backward of the total into the parameters' grads."""
        logits = model(**batch.model_inputs())
        ce = model(**batch.model_inputs(with_labels=True))
        mask = batch.loss_mask
        logp = token_logprobs(logits, batch.labels, mask=mask, tp_group=tp_group)
        live_logp = grpo_loss(logits, batch.labels, torch.zeros_like(logp), torch.zeros_like(logp),
                              torch.zeros_like(logp), mask, tp_group=tp_group)[1]
        old, ref = logp - batch.per_token(offset), logp + 0.1
        loss, _, kl = grpo_loss(logits, batch.labels, old, ref, batch.per_token(adv), mask, kl_beta=0.04,
                                clip_low=0.2, clip_high=0.28, tp_group=tp_group)
        parts = {mode: aggregate_loss(loss, mask, mode=mode, cu_seqlens=batch.cu_seqlens, max_response_length=64)
                 for mode in ("token-mean", "seq-mean-token-mean", "dr-grpo")}
        total = (ce * mask).sum() + loss.sum()
        total.backward()
        return {"ce": float((ce * mask).sum()), "logp": float(logp.sum()), "live_logp": float(live_logp.sum()),
                "grpo": float(loss.sum()), "kl": float(kl.sum()), "tokens": int(mask.sum()),
                **{f"{m}/total": float(p.total) for m, p in parts.items()},
                **{f"{m}/count": float(p.count) for m, p in parts.items()}}

    def layout_run(groups, make):
        model.zero_grad()
        sums: dict = {}
        for group in groups:
            index = [next(i for i, x in enumerate(samples) if x is s) for s in group]
            adv = torch.tensor([advantages[i] for i in index])
            offset = torch.tensor([old_offsets[i] for i in index])
            for k, v in run(make(group), adv, offset).items():
                sums[k] = sums.get(k, 0) + v
        for p in model.parameters():  # as megatron's finalize_model_grads: SP norms hold partial sums
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=tp_group)
        grads = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters() if p.grad is not None])
        return sums, grads

    m = opts.tp
    layouts = {
        "packed": ([samples], lambda g: packed_batch(g, args, pad_to_multiple_of=m, pad_id=pad_id)),
        "two_micro_batches": ([samples[:3], samples[3:]],
                              lambda g: packed_batch(g, args, pad_to_multiple_of=m, pad_id=pad_id)),
        "padded_right": ([samples], lambda g: collate_padded(g, pad_id, args, pad_to_multiple_of=m)),
        "padded_left": ([samples], lambda g: collate_padded(g, pad_id, args, side="left", pad_to_multiple_of=m)),
        "one_by_one": ([[s] for s in samples], lambda g: packed_batch(g, args, pad_to_multiple_of=m, pad_id=pad_id)),
        # a rank with nothing to do runs a fully masked batch: it adds nothing
        "with_a_dummy": ([[s] for s in samples] + [[]],
                         lambda g: packed_batch(g, args, pad_to_multiple_of=m, pad_id=pad_id)),
    }
    results, grads = {}, {}
    for name, (groups, make) in layouts.items():
        results[name], grads[name] = layout_run(groups, make)
    ref = grads["one_by_one"]
    results["grad_rel_diff"] = {k: float((g - ref).abs().max() / ref.abs().max()) for k, g in grads.items()}
    results["needed_padding"] = packed_batch(samples, args).input_ids.shape[1] % m != 0
    results["images"] = [int(s.image_grid_thw.shape[0]) for s in samples]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results, indent=1))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
