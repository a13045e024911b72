"""The entry points' Hydra main: the command line is composed once before Hydra runs it, so that
what Hydra cannot compose (a mistyped option, a config that does not exist, an override it cannot
parse) is one line that names what to change, with exit status 2 like every other usage error.

Hydra's own message for a mistyped ``train.learning_rate=...`` suggests ``+train.learning_rate``,
which would add an option nothing reads and run with the default: this one lists the options
that exist instead, and a ``+`` that adds a key to a section with fixed options (anything but an
empty one such as ``rl.engine_options``) is refused the same way.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Optional, Sequence

from .config import CONF_DIR

_NOT_AN_OPTION = re.compile(r"Could not override '([^']+)'")
_MISSING_CONFIG = re.compile(r"Could not find '([^']+)'.*?Available options in '([^']+)':\s*(.*?)(?:\nConfig search|$)",
                             re.DOTALL)


def hydra_main(config_name: str, name: str) -> Callable:
    """``@hydra.main`` for ``conf/<config_name>.yaml``, after :func:`check_overrides`."""
    import hydra

    def wrap(fn: Callable) -> Callable:
        run = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(fn)

        @functools.wraps(fn)
        def main() -> None:
            problem = check_overrides(config_name, sys.argv[1:])
            if problem:
                print(f"{name}: error: {problem}", file=sys.stderr, flush=True)
                sys.exit(2)
            run()
        return main
    return wrap


def check_overrides(config_name: str, argv: Sequence[str]) -> Optional[str]:
    """What is wrong with ``argv``'s overrides of ``config_name``, in one line, or None. Hydra's
    own flags (``--help``, ``--cfg``, ...) and ``hydra.*`` overrides are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        _compose(config_name, overrides)
    except Exception as e:  # noqa: BLE001  (Hydra raises several kinds; each becomes one line)
        return _explain(config_name, overrides, e)
    return _added_unknown(config_name, overrides)


def _added_unknown(config_name: str, overrides: Sequence[str]) -> Optional[str]:
    """The first ``+key=value`` that adds an option no code reads: a key beside fixed options."""
    from omegaconf import DictConfig

    added = [o for o in overrides if o.startswith("+") and "=" in o]
    if not added:
        return None
    try:
        base = _compose(config_name, [o for o in overrides if not o.startswith("+")])
    except Exception:  # noqa: BLE001  (then Hydra's own composition is the judge)
        return None
    from omegaconf import OmegaConf

    for override in added:
        key = override.lstrip("+").split("=", 1)[0]
        parent, _, leaf = key.rpartition(".")
        if not parent and (CONF_DIR / key).is_dir():
            continue  # a config group, e.g. +recipe=...
        node = OmegaConf.select(base, parent) if parent else base
        if isinstance(node, DictConfig) and (len(node) == 0 or leaf in node):
            continue  # an open section (engine options), or ++ of a key that exists
        known = f"; {parent or 'the config'} has {', '.join(sorted(str(k) for k in node.keys()))}" \
            if isinstance(node, DictConfig) else ""
        return f"{key} is not an option of conf/{config_name}.yaml (check its spelling){known}"
    return None


def _compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _explain(config_name: str, overrides: Sequence[str], error: Exception) -> str:
    from omegaconf import DictConfig, OmegaConf

    text = str(error)
    m = _NOT_AN_OPTION.search(text)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        known = ""
        try:  # the options that do exist beside it
            cfg = _compose(config_name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                known = f"; {parent or 'the config'} has {', '.join(sorted(str(k) for k in node.keys()))}"
        except Exception:  # noqa: BLE001
            pass
        return f"{key} is not an option of conf/{config_name}.yaml (check its spelling){known}"
    m = _MISSING_CONFIG.search(text)
    if m:
        group, options = m.group(2), ", ".join(m.group(3).split())
        return f"no config {m.group(1)}.yaml: {group}= takes {options}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("See https")]
    return "; ".join(lines) or type(error).__name__
