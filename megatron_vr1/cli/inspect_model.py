"""Show how a model config splits over TP x PP ranks, without the hardware.

Every rank's stage is built on the meta device under a fake process group: layers per stage and
parameters per rank (summing to the Hugging Face count). Memory per rank is the planner's job
(``tools/plan.py``), which counts activations, the optimizer and the rollout engine too.
"""

from __future__ import annotations

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

from omegaconf import DictConfig

from ..config import model_from_conf
from ..entry import hydra_main
from ..models.qwen2_5_vl.parallel import parameter_counts_by_rank
from ..planning import stage_layers


def report(model_cfg: DictConfig) -> str:
    args, layout = model_from_conf(model_cfg)
    counts = parameter_counts_by_rank(args, layout)
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    lines = [f"{model_cfg.get('name', 'model')}: TP={tp} x PP={pp}, "
             f"{args.num_layers} LM layers, ViT on stage 0"]
    for stage, layers in enumerate(stage_layers(args, layout)):
        stage_counts = counts[stage * tp:(stage + 1) * tp]  # megatron orders ranks TP-fastest
        lines.append(f"  stage {stage}: {layers:3d} LM layers, {max(stage_counts) / 1e9:7.3f}B params on its "
                     f"busiest rank")
    lines.append(f"  total parameters: {sum(counts):,} (memory per rank: tools/plan.py)")
    return "\n".join(lines)


@hydra_main("inspect", "inspect_model")
def main(cfg: DictConfig) -> None:
    print(report(cfg.model))


if __name__ == "__main__":
    main()
