"""Show how a model config splits over TP x PP ranks, without the hardware.

Every rank's stage is built on the meta device under a fake process group: layers per stage,
parameters per rank (summing to the Hugging Face count) and training-state memory per rank.
"""

from __future__ import annotations

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR, model_from_conf
from ..models.qwen2_5_vl.parallel import parameter_counts_by_rank
from ..planning import stage_layers

# bf16 weight (2) + fp32 main grad (4) per rank; fp32 master + Adam m, v (12) sharded over DP.
_REPLICATED_BYTES, _SHARDED_BYTES = 6, 12


def report(model_cfg: DictConfig, data_parallel: int = 1) -> str:
    args, layout = model_from_conf(model_cfg)
    counts = parameter_counts_by_rank(args, layout)
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    lines = [f"{model_cfg.get('name', 'model')}: TP={tp} x PP={pp}, "
             f"{args.num_layers} LM layers, ViT on stage 0"]
    for stage, layers in enumerate(stage_layers(args, layout)):
        stage_counts = counts[stage * tp:(stage + 1) * tp]  # megatron orders ranks TP-fastest
        per_rank = max(stage_counts)
        mem = per_rank * (_REPLICATED_BYTES + _SHARDED_BYTES / data_parallel) / 2**30
        lines.append(f"  stage {stage}: {layers:3d} LM layers, {per_rank / 1e9:7.3f}B params on its busiest rank, "
                     f"~{mem:6.1f} GiB weights+grads+Adam at DP={data_parallel}")
    lines.append(f"  total parameters: {sum(counts):,}")
    return "\n".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(report(cfg.model, cfg.data_parallel))


if __name__ == "__main__":
    main()
