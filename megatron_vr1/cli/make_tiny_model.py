"""Write a randomly initialised Qwen2.5-VL as a Hugging Face folder (config, safetensors, a
tokenizer, the image processor's settings): the demo's starting model, made offline.

    python -m megatron_vr1.cli.make_tiny_model out=runs/demo/hf_init [model=toy tokenizer=toy seed=0]
"""

from __future__ import annotations

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

import copy
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..entry import hydra_main
from ..training.setup import main_guard


def write_tiny_model(out: str | Path, hf_config: dict, *, tokenizer: str, seed: int, min_pixels: int,
                     max_pixels: int, overwrite: bool = False) -> Path:
    """Build the model with transformers' own initialisation and save it; the folder appears only
    when complete."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..data import ImageConfig
    from ..data.tokenizer import build_offline_tokenizer, build_toy_tokenizer
    from ..errors import UsageError
    from ..training.setup import processor_file

    builders = {"toy": build_toy_tokenizer, "qwen": build_offline_tokenizer}
    if tokenizer not in builders:
        raise UsageError(f"tokenizer must be toy or qwen, got {tokenizer!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={out} exists; pass overwrite=true to replace it")
    tmp = out.with_name(out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(hf_config))).float()
    model.save_pretrained(tmp)
    builders[tokenizer](tmp)
    (tmp / "preprocessor_config.json").write_text(processor_file(ImageConfig(min_pixels=min_pixels,
                                                                             max_pixels=max_pixels)))
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes through a private temporary file (mode 0600)
        f.chmod(0o666 & ~umask)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run(cfg: DictConfig) -> None:
    hf_config = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    out = write_tiny_model(cfg.out, hf_config, tokenizer=cfg.tokenizer, seed=int(cfg.seed),
                           min_pixels=int(cfg.min_pixels), max_pixels=int(cfg.max_pixels),
                           overwrite=bool(cfg.overwrite))
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(out / "model.safetensors")).values())
    print(f"wrote {out}: {cfg.model.name}, {params:,} parameters, {cfg.tokenizer} tokenizer", flush=True)


@hydra_main("tiny_model", "make_tiny_model")
def main(cfg: DictConfig) -> None:
    main_guard(run, cfg, "make_tiny_model")


if __name__ == "__main__":
    main()
