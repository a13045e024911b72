"""Write the offline demo data set (and a tokenizer) that the README's demo trains on."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="demo_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ..data.demo import generate
    from ..data.tokenizer import build_offline_tokenizer

    counts = generate(cfg.out, n_sft=cfg.n_sft, n_rl=cfg.n_rl, n_eval=cfg.n_eval, seed=cfg.seed)
    if cfg.tokenizer:
        build_offline_tokenizer(Path(cfg.out) / "tokenizer")
    print(f"wrote {counts} to {cfg.out}")


if __name__ == "__main__":
    main()
