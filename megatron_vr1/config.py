"""Hydra/OmegaConf glue: ``conf/model/*.yaml`` -> model arguments and parallel layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs

def _conf_dir() -> Path:
    """The Hydra configs: ``megatron_vr1/conf`` in an installed wheel, the checkout's ``conf/``
    otherwise (an editable install maps the package there)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "conf", here.parent / "conf"):
        if (folder / "sft.yaml").is_file():
            return folder
    raise FileNotFoundError(f"megatron_vr1's configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


CONF_DIR = _conf_dir()


def load_model_conf(name: str) -> DictConfig:
    """``conf/model/<name>.yaml`` (or a path to such a file), without Hydra's composition."""
    path = Path(name)
    if not path.suffix:
        path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise FileNotFoundError(f"model config {name!r} not found; known: {known}")
    return OmegaConf.load(path)


def model_from_conf(model_cfg: DictConfig | Mapping[str, Any]) -> tuple[Qwen25VLArgs, ParallelLayout]:
    """``hf_config`` is either the config.json fields inline or a checkpoint directory / file."""
    cfg = OmegaConf.create(model_cfg) if not isinstance(model_cfg, DictConfig) else model_cfg
    hf = cfg.hf_config
    args = Qwen25VLArgs.from_hf_config(hf if isinstance(hf, str) else OmegaConf.to_container(hf, resolve=True))
    par = OmegaConf.to_container(cfg.get("parallel", {}), resolve=True)
    unknown = set(par) - set(ParallelLayout.__dataclass_fields__)
    if unknown:
        raise ValueError(f"model.parallel has unknown option(s) {sorted(unknown)}; "
                         f"known: {sorted(ParallelLayout.__dataclass_fields__)}")
    layout = ParallelLayout(**par)
    args.check_parallel(layout.tensor_parallel, layout.pipeline_parallel, layout.num_layers_in_first_pipeline_stage)
    return args, layout
