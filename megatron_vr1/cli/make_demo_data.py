"""Write the offline demo data set (and a tokenizer) that the README's demo trains on."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="demo_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ..data.demo import generate
    from ..data.tokenizer import build_offline_tokenizer, build_toy_tokenizer

    builders = {"toy": build_toy_tokenizer, "qwen": build_offline_tokenizer, None: None}
    if cfg.tokenizer not in builders:
        raise SystemExit(f"make_demo_data: error: tokenizer must be toy, qwen or null, got {cfg.tokenizer!r}")
    try:
        counts = generate(cfg.out, n_sft=cfg.n_sft, n_rl=cfg.n_rl, n_eval=cfg.n_eval, seed=cfg.seed,
                          kinds=tuple(cfg.kinds))
    except ValueError as e:
        raise SystemExit(f"make_demo_data: error: kinds: {e}")
    if builders[cfg.tokenizer] is not None:
        builders[cfg.tokenizer](Path(cfg.out) / "tokenizer")
    print(f"wrote {counts} to {cfg.out}")


if __name__ == "__main__":
    main()
