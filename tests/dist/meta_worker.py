"""Builds 72B / 32B rank by rank on the meta device (fake process group) and reports what it saw.

Runs in its own process because a fake process group cannot coexist with a real one.
"""

from __future__ import annotations

import json
import sys

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from megatron_vr1.config import load_model_conf, model_from_conf
from megatron_vr1.models.qwen2_5_vl import canonical_hf_name
from megatron_vr1.models.qwen2_5_vl.hf_mapping import iter_model_mappings
from megatron_vr1.models.qwen2_5_vl.parallel import ParallelLayout, meta_stage, parameter_counts_by_rank


def hf_meta(name: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = OmegaConf.to_container(load_model_conf(name).hf_config)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))


def inspect(name: str, first: int) -> dict:
    args, _ = model_from_conf(load_model_conf(name))
    layout = ParallelLayout(8, 4, num_layers_in_first_pipeline_stage=first)
    hf = hf_meta(name)
    report = {
        "counts": parameter_counts_by_rank(args, layout),
        "hf_count": sum(p.numel() for p in hf.parameters()),
        "ranks": {},
    }
    state = {canonical_hf_name(k): v for k, v in hf.state_dict().items()}
    for rank in (3, 29):  # a TP rank of the first and of the last stage
        with meta_stage(args, layout, rank) as model:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            mismatched, checked = [], 0
            for pname, param, mapping in iter_model_mappings(model, args, model.padded_vocab_size, model.layer_offset):
                expected = mapping.shard([state[h] for h in mapping.hf], tp_rank, 8)
                checked += 1
                if param.shape != expected.shape:
                    mismatched.append([pname, list(param.shape), list(expected.shape)])
            report["ranks"][str(rank)] = {
                "tp_rank": tp_rank,
                "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                "has_vision": model.vision is not None,
                "has_output_layer": model.post_process,
                "lm_layers": len(model.language_model.decoder.layers),
                "layer_offset": model.layer_offset,
                "checked": checked,
                "mismatched": mismatched,
                "device": str(next(model.parameters()).device),
            }
    return report


if __name__ == "__main__":
    layouts = json.loads(sys.argv[1])
    print(json.dumps({name: inspect(name, first) for name, first in layouts.items()}))
