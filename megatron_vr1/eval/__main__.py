"""``python -m megatron_vr1.eval checkpoint=... data=... out=...`` (Hydra: ``conf/eval.yaml``), or
under ``torchrun --nproc-per-node N`` to split the records over N processes."""

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

import os

from omegaconf import DictConfig, OmegaConf

from ..entry import hydra_main
from ..training.setup import main_guard


def run(cfg: DictConfig) -> None:
    from .runner import evaluate

    options = OmegaConf.to_container(cfg, resolve=True)
    summary = evaluate(**options)
    if int(os.environ.get("RANK", "0")):
        return
    for bench, entry in summary["benchmarks"].items():
        print(f"eval: {bench}: {entry['overall']['accuracy']:.1f}% of {entry['overall']['n']} "
              f"({entry['overall_with_retries']['accuracy']:.1f}% with retries); {cfg.out}/summary.md", flush=True)


@hydra_main("eval", "eval")
def main(cfg: DictConfig) -> None:
    main_guard(run, cfg, "eval")


if __name__ == "__main__":
    main()
