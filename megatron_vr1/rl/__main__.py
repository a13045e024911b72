"""``python -m megatron_vr1.rl``: GRPO with PTST (config ``conf/grpo.yaml``; see :mod:`.trainer`)."""

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

from omegaconf import DictConfig  # noqa: E402

from ..entry import hydra_main  # noqa: E402
from ..training.setup import main_guard  # noqa: E402


@hydra_main("grpo", "grpo")
def main(cfg: DictConfig) -> None:
    from .trainer import run

    main_guard(run, cfg, "grpo")


if __name__ == "__main__":
    main()
