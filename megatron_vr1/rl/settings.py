"""``rl.loss`` and ``rl.reward`` checked into their settings before anything starts: a mistyped
option must not leave its default in force, and a value out of range must not reach step 1."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..errors import UsageError
from .grpo import LossSettings
from .reward import RewardSettings

# rl.loss options besides LossSettings' (the trainer reads them itself)
ADVANTAGE_KEYS = ("advantage_std", "advantage_eps", "drop_equal_groups")


def fields_of(cls, node) -> dict:
    """The entries of a config node that are fields of the dataclass ``cls``."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in values.items() if k in cls.__dataclass_fields__}


def check_rl_settings(rl: DictConfig) -> tuple[LossSettings, RewardSettings]:
    """``rl.loss`` and ``rl.reward`` as settings; an unknown key or a value out of range is a
    :class:`UsageError` naming it."""
    for where, known in (("rl.loss", set(LossSettings.__dataclass_fields__) | set(ADVANTAGE_KEYS)),
                         ("rl.reward", set(RewardSettings.__dataclass_fields__))):
        node = rl.get(where.split(".")[1]) or {}
        unknown = sorted(set(node) - known)
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                             f"{where} has {', '.join(sorted(known))}")
    loss = LossSettings(**fields_of(LossSettings, rl.loss))
    reward = RewardSettings(**fields_of(RewardSettings, rl.get("reward") or {}))
    if loss.kl_max is not None and not loss.kl_max > 0:
        raise UsageError(f"rl.loss.kl_max must be > 0 (or null for no bound), got {loss.kl_max}")
    if reward.workers < 1 or not reward.timeout > 0:
        raise UsageError(f"rl.reward.workers must be >= 1 and rl.reward.timeout > 0, got {reward.workers} and "
                         f"{reward.timeout}")
    if not 0 <= reward.warn_timeout_share <= 1:
        raise UsageError(f"rl.reward.warn_timeout_share must lie in [0, 1], got {reward.warn_timeout_share}")
    return loss, reward
