"""``python tools/plan.py model=qwen2_5_vl_72b rl=ptst [overrides] [gpus=32] [gpu_memory_gb=80] [search=true]``

The arguments are the trainer's own Hydra overrides (SFT's ``conf/sft.yaml``, or GRPO's
``conf/grpo.yaml`` once an ``rl`` or ``recipe=grpo_*`` override or ``entry=megatron_vr1.rl``
names it) plus the planner's settings (``conf/plan/default.yaml``) without their ``plan.``
prefix. Exit status: 0 fits, 1 does not fit (with ``search=true``: no layout fits), 2 the layout
or an option is wrong (the trainers' own check, :func:`megatron_vr1.planning.validate.check_job`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ..config import CONF_DIR
from ..errors import UsageError
from ..models.qwen2_5_vl import ConfigError
from .memory import plan, search
from .report import format_plan, format_search, settings_from_conf
from .validate import check_job

ENTRIES = {"megatron_vr1.sft": "sft", "sft": "sft", "megatron_vr1.rl": "grpo", "rl": "grpo", "grpo": "grpo"}
PLANNER_KEYS = ("gpus", "gpu_memory_gb", "reserve_gb", "image_fraction", "search", "top")
SEARCH_GPUS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def compose_trainer_config(argv: Sequence[str]):
    """The trainer config the overrides make, and its name (sft or grpo)."""
    config, overrides = "sft", []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "entry":
            if value not in ENTRIES:
                raise UsageError(f"entry={value!r}: choose one of {sorted(ENTRIES)}")
            config = ENTRIES[value]
            continue
        if key in PLANNER_KEYS:
            arg = f"plan.{arg}"
        elif key.lstrip("+~") == "rl" or key.startswith("rl.") or (key == "recipe" and value.startswith("grpo")):
            config = "grpo"
        overrides.append(arg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config, overrides=overrides), config


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg, config = compose_trainer_config(argv)
        name = f"{cfg.model.get('name', 'model')} {'GRPO' if config == 'grpo' else 'SFT'}"
        if cfg.plan.search:
            counts = [int(cfg.plan.gpus)] if cfg.plan.gpus else SEARCH_GPUS
            check_job(cfg, world_size=None)  # the layouts searched are other than the config's
            args, _, settings = settings_from_conf(cfg, gpus=counts[0])
            found = search(args, settings, gpu_counts=counts, top=int(cfg.plan.top))
            print(format_search(found, cfg.model.get("name", "model")))
            return 0 if found else 1
        args, layout, settings = settings_from_conf(cfg)
        check_job(cfg, world_size=settings.gpus)
        result = plan(args, layout, settings)
    except (ConfigError, UsageError, ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result, name), flush=True)
    return 0 if result.fits else 1


def console_main() -> None:
    """The ``megatron-vr1-plan`` command (and ``python -m megatron_vr1.planning``)."""
    from ..training import quiet  # noqa: F401

    sys.exit(main())
