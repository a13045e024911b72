"""``python -m megatron_vr1.rl``: GRPO with PTST (config ``conf/grpo.yaml``; see :mod:`.trainer`)."""

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ..config import CONF_DIR  # noqa: E402
from ..training.setup import main_guard  # noqa: E402


@hydra.main(config_path=str(CONF_DIR), config_name="grpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .trainer import run

    main_guard(run, cfg, "grpo")


if __name__ == "__main__":
    main()
