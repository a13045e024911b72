"""Write the offline demo data set (and a tokenizer) that the README's demo trains on."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..entry import hydra_main


@hydra_main("demo_data", "make_demo_data")
def main(cfg: DictConfig) -> None:
    from ..data.demo import generate
    from ..data.tokenizer import build_offline_tokenizer, build_toy_tokenizer

    builders = {"toy": build_toy_tokenizer, "qwen": build_offline_tokenizer, None: None}
    if cfg.tokenizer not in builders:
        raise SystemExit(f"make_demo_data: error: tokenizer must be toy, qwen or null, got {cfg.tokenizer!r}")
    try:
        counts = generate(cfg.out, n_sft=cfg.n_sft, n_rl=cfg.n_rl, n_eval=cfg.n_eval, seed=cfg.seed,
                          kinds=tuple(cfg.kinds), sft_answers=str(cfg.sft_answers))
    except ValueError as e:
        raise SystemExit(f"make_demo_data: error: {e}")
    if builders[cfg.tokenizer] is not None:
        builders[cfg.tokenizer](Path(cfg.out) / "tokenizer")
    print(f"wrote {counts} to {cfg.out}")


if __name__ == "__main__":
    main()
