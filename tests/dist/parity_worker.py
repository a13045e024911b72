"""torchrun worker: Megatron Qwen2.5-VL vs transformers at a given TP x PP, on CPU with gloo.

Every rank builds the same random HF model, loads its own shard through the HF mapping and
runs megatron-core's pipeline schedule; last-stage ranks compare the gathered logits with
transformers' and write ``rank{N}.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_forward(model, batch: dict, seq_len: int) -> torch.Tensor | None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        return m(**next(data_iterator)), None

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=seq_len, micro_batch_size=batch["input_ids"].shape[0], forward_only=True,
    )
    return out[0] if out else None


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()

    from megatron.core import parallel_state as ps
    from megatron_vr1 import platform
    from megatron_vr1.models.qwen2_5_vl import (ParallelLayout, Qwen25VLArgs, build_model,
                                                load_hf_state_dict, param_mappings)
    from megatron_vr1.models.qwen2_5_vl.hf_mapping import iter_model_mappings
    from tiny import hf_logits, hf_model, make_case, tiny_hf_config

    platform.init_distributed(opts.tp, opts.pp)
    tp_rank, last = ps.get_tensor_model_parallel_rank(), ps.is_pipeline_last_stage()
    results: dict = {"tp": opts.tp, "pp": opts.pp, "last_stage": last, "logits": {}, "grad": {}}

    for tied in (False, True):
        cfg = tiny_hf_config(tied=tied, layers=3)
        args = Qwen25VLArgs.from_hf_config(cfg)
        hf = hf_model(cfg)
        layout = ParallelLayout(opts.tp, opts.pp, num_layers_in_first_pipeline_stage=opts.first_stage_layers,
                                make_vocab_size_divisible_by=16, sequence_parallel=opts.sequence_parallel)
        model = build_model(args, layout, backend="local").eval()
        load_hf_state_dict(model, hf.state_dict(), args, padded_vocab=model.padded_vocab_size,
                           tp_rank=tp_rank, tp_size=opts.tp, layer_offset=model.layer_offset)
        cases = ("no_image", "one_image", "two_images") if not tied else ("two_images",)
        for case in cases:
            batch = make_case(case, multiple_of=opts.tp)
            with torch.no_grad():
                out = run_forward(model, batch, batch["input_ids"].shape[1])
            if last:
                ours = gather_vocab(out)[..., : args.vocab_size]
                ref = hf_logits(hf, batch)
                results["logits"][f"{'tied' if tied else 'untied'}/{case}"] = (ours - ref).abs().max().item()

        if opts.grad and not tied:
            # d(sum(logits * W))/d(params) on both sides; HF grads sharded through the mapping.
            batch = make_case("two_images", multiple_of=opts.tp)
            g = torch.Generator().manual_seed(7)
            weights = torch.randn(*batch["input_ids"].shape, args.vocab_size, generator=g)
            model.zero_grad()
            logits = gather_vocab(model(**batch))[..., : args.vocab_size]
            (logits * weights).sum().backward()
            # Under sequence parallelism each rank holds norm-weight grads of its own tokens:
            # megatron's finalize_model_grads sums them over the TP group; so do we.
            for p in model.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            hf.zero_grad()
            kw = dict(batch, mm_token_type_ids=(batch["input_ids"] == 245).int())
            (hf(**kw).logits * weights).sum().backward()
            hf_grads = {k: p.grad for k, p in hf.named_parameters()}
            from megatron_vr1.models.qwen2_5_vl import canonical_hf_name
            hf_grads = {canonical_hf_name(k): v for k, v in hf_grads.items()}
            if "lm_head.weight" not in hf_grads:
                hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
            worst, rel = 0.0, 0.0
            for name, param, mapping in iter_model_mappings(model, args, model.padded_vocab_size, model.layer_offset):
                expected = mapping.shard([hf_grads[n] for n in mapping.hf], tp_rank, opts.tp)
                diff = (param.grad - expected).abs().max().item()
                worst = max(worst, diff)
                rel = max(rel, diff / (expected.abs().max().item() + 1e-12))
                results["grad"][name] = diff
            results["grad_max_abs"] = worst
            results["grad_max_rel"] = rel
            results["grad_params"] = len(results["grad"])

    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results, indent=1))
    platform.shutdown_distributed()


if __name__ == "__main__":
    main()
