"""Builds every rank of the given layouts on the meta device (fake process group) and prints,
per rank, the parameters it holds and its unique share. Own process: a fake process group
cannot coexist with a real one."""

from __future__ import annotations

import json
import sys

from megatron.core import parallel_state

from megatron_vr1.config import load_model_conf, model_from_conf
from megatron_vr1.models.qwen2_5_vl.parallel import ParallelLayout, meta_stage, unique_parameter_count


def ranks(name: str, tp: int, pp: int, first) -> list[dict]:
    args, _ = model_from_conf(load_model_conf(name))
    layout = ParallelLayout(tp, pp, num_layers_in_first_pipeline_stage=first, sequence_parallel=tp > 1)
    out = []
    for rank in range(tp * pp):
        with meta_stage(args, layout, rank) as model:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            out.append({"stage": parallel_state.get_pipeline_model_parallel_rank(), "tp_rank": tp_rank,
                        "held": sum(p.numel() for p in model.parameters()),
                        "unique": unique_parameter_count(model, tp_rank),
                        "lm_layers": len(model.language_model.decoder.layers)})
    return out


if __name__ == "__main__":
    print(json.dumps({key: ranks(*spec) for key, spec in json.loads(sys.argv[1]).items()}))
