"""torchrun worker: vocab-parallel token_logprobs / grpo_loss on this rank's vocab shard vs the
textbook on the full vocabulary (every rank builds the same full logits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(tp)))

    import textbook
    from megatron_vr1.kernels import aggregate_loss, grpo_loss, token_logprobs

    t, vocab = 6, 152064
    g = torch.Generator().manual_seed(0)
    full = torch.randn(t, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (t,), generator=g)
    labels[0] = (tp - 1) * (vocab // tp) + 5  # owned by the last shard, read by all ranks
    labels[1] = vocab - 1
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    z = full.double() / 0.7
    logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(1, labels[:, None])[:, 0].float()
    old, ref = logp + 0.3 * torch.randn(t, generator=g), logp + 0.3 * torch.randn(t, generator=g)
    old[2] -= 25.0  # an extreme ratio
    adv = torch.randn(t, generator=g)
    kw = dict(temperature=0.7, clip_low=0.2, clip_high=0.28, kl_beta=0.04)
    weights = torch.rand(t, generator=g) * 2  # rollout correction's importance weights, one token dropped
    weights[4] = 0.0

    width = vocab // tp
    cols = slice(rank * width, (rank + 1) * width)
    x64 = full.double().requires_grad_()
    e_loss, e_logp, e_kl = textbook.grpo(x64, labels, old, ref, adv, mask, rollout_weights=weights, **kw)
    (e_loss.sum() + 0.3 * e_logp.sum() + 0.2 * e_kl.sum()).backward()
    expected_grad = x64.grad[:, cols]

    result = {"tp": tp}
    for backend in ("triton", "torch"):
        # the Triton path runs compiled on a GPU where there is one (gloo all-gathers CUDA tensors
        # too), else in the interpreter; results come back to CPU
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        on = [x.to(device) for x in (labels, old, ref, adv, mask)]
        shard = full[:, cols].to(device).contiguous().requires_grad_()
        loss, lp, kl = (x.cpu() for x in grpo_loss(shard, *on, tp_group=group, backend=backend,
                                                         rollout_weights=weights.to(device), **kw))
        (loss.sum() + 0.3 * lp.sum() + 0.2 * kl.sum()).backward()
        shard_grad = shard.grad.cpu()
        nograd = token_logprobs(full[:, cols].to(device).contiguous(), on[0], temperature=0.7, tp_group=group,
                                backend=backend).cpu()
        keep = mask
        def rel(a, b):  # |a - b| / max(1, |b|): fp32 round-off of the e^25 ratio row stays relative
            return ((a.double() - b) / b.abs().clamp(min=1)).abs().max().item()

        result[backend] = {
            "loss": rel(loss, e_loss),
            "logp": rel(lp, e_logp),
            "kl": rel(kl, e_kl),
            "grad": (shard_grad.double() - expected_grad).abs().max().item(),
            "grad_scale": expected_grad.abs().max().item(),
            "token_logprobs": rel(nograd[keep], e_logp[keep]),
        }
        # GSPO's sequence-level ratio on the same shards: two packed sequences, aggregated per sequence
        cu = torch.tensor([0, 3, 6])
        gkw = dict(temperature=0.7, clip_low=0.05, clip_high=0.08, kl_beta=0.04)
        g_old = old.clone()
        g_old[2] += 25.0  # back to a moderate ratio: GSPO's sequence mean would be dominated by it
        g_adv = adv[[0, 0, 0, 4, 4, 4]]  # one advantage per sequence
        x64 = full.double().requires_grad_()
        want = textbook.gspo(x64, labels, g_old, ref, g_adv, mask, [[0, 1, 2], [3, 4, 5]], **gkw)
        want.backward()
        shard = full[:, cols].to(device).contiguous().requires_grad_()
        on = [x.to(device) for x in (labels, g_old, ref, g_adv, mask)]
        loss, _, _ = grpo_loss(shard, *on, tp_group=group, backend=backend, ratio="sequence", cu_seqlens=cu.to(device),
                               clip_ratio_c=None, **gkw)
        total = aggregate_loss(loss, on[4], mode="seq-mean-token-mean", cu_seqlens=cu.to(device)).value()
        total.backward()
        result[backend]["gspo_value"] = abs(float(total) - float(want))
        result[backend]["gspo_grad"] = (shard.grad.cpu().double() - x64.grad[:, cols]).abs().max().item()
    try:
        token_logprobs(full[:, cols].contiguous(), labels + vocab, tp_group=group)
        result["out_of_range_error"] = ""
    except ValueError as e:
        result["out_of_range_error"] = str(e)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
