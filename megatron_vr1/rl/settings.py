"""``rl.loss`` and ``rl.reward`` checked into their settings before anything starts: a mistyped
option must not leave its default in force, and a value out of range must not reach step 1."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..errors import UsageError
from .correction import check_correction
from .dynamic import DynamicSamplingSettings
from .grpo import LossSettings
from .ptst import parse_stages
from .reward import RewardSettings

# rl.loss options besides LossSettings' (the trainer reads them itself)
ADVANTAGE_KEYS = ("advantage_std", "advantage_eps", "drop_equal_groups")
GSPO_CLIP = (3e-4, 4e-4)  # GSPO's published clip range of the sequence ratio (low, high)


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
    check_correction(loss.rollout_correction, loss.rollout_correction_cap)
    _check_ratio(loss)
    _check_overlong(reward, rl)
    if reward.workers < 1 or not reward.timeout > 0:
        raise UsageError(f"rl.reward.workers must be >= 1 and rl.reward.timeout > 0, got {reward.workers} and "
                         f"{reward.timeout}")
    if not 0 <= reward.warn_timeout_share <= 1:
        raise UsageError(f"rl.reward.warn_timeout_share must lie in [0, 1], got {reward.warn_timeout_share}")
    return loss, reward


def gspo_clip_note(rl: DictConfig) -> str | None:
    """The start-up line for ``ratio=sequence`` without its own clip range, which takes GSPO's."""
    loss = rl.get("loss") or {}
    if loss.get("ratio", "token") == "sequence" and None in (loss.get("sequence_clip_low"), loss.get("sequence_clip_high")):
        return (f"grpo: rl.loss.ratio=sequence (GSPO) without its own clip range: GSPO's published "
                f"sequence_clip_low={GSPO_CLIP[0]}, sequence_clip_high={GSPO_CLIP[1]}")
    return None


def _check_ratio(loss: LossSettings) -> None:
    if loss.ratio not in ("token", "sequence"):
        raise UsageError(f"rl.loss.ratio must be token or sequence (GSPO), got {loss.ratio!r}")
    if loss.ratio == "token":
        return
    if loss.aggregation != "seq-mean-token-mean":
        raise UsageError(f"rl.loss.ratio=sequence (GSPO) aggregates per sequence: set "
                         f"rl.loss.aggregation=seq-mean-token-mean (got {loss.aggregation})")
    if loss.sequence_clip_low is None:
        loss.sequence_clip_low = GSPO_CLIP[0]
    if loss.sequence_clip_high is None:
        loss.sequence_clip_high = GSPO_CLIP[1]
    if not (0 < loss.sequence_clip_low < 1 and loss.sequence_clip_high > 0):
        raise UsageError(f"rl.loss.sequence_clip_low must lie in (0, 1) and sequence_clip_high be > 0, got "
                         f"{loss.sequence_clip_low} and {loss.sequence_clip_high}")


def _check_overlong(reward: RewardSettings, rl: DictConfig) -> None:
    if not (isinstance(reward.overlong_buffer, int) and reward.overlong_buffer >= 0):
        raise UsageError(f"rl.reward.overlong_buffer must be a whole number of tokens >= 0, got {reward.overlong_buffer!r}")
    if not reward.overlong_penalty >= 0:
        raise UsageError(f"rl.reward.overlong_penalty must be >= 0 (it is subtracted), got {reward.overlong_penalty}")
    if reward.overlong_buffer and rl.get("stages") is not None:
        for stage in parse_stages(rl.stages):
            if reward.overlong_buffer > stage.max_response_tokens:
                raise UsageError(f"rl.reward.overlong_buffer ({reward.overlong_buffer}) is longer than stage "
                                 f"{stage.index}'s budget of {stage.max_response_tokens} tokens")


def dynamic_sampling_settings(rl: DictConfig) -> DynamicSamplingSettings:
    """``rl.dynamic_sampling`` checked: unknown keys and values out of range are a UsageError."""
    node = rl.get("dynamic_sampling") or {}
    known = set(DynamicSamplingSettings.__dataclass_fields__)
    unknown = sorted(set(node) - known)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(f'rl.dynamic_sampling.{k}' for k in unknown)}; "
                         f"rl.dynamic_sampling has {', '.join(sorted(known))}")
    out = DynamicSamplingSettings(**fields_of(DynamicSamplingSettings, node))
    if not (isinstance(out.max_rounds, int) and out.max_rounds >= 1):
        raise UsageError(f"rl.dynamic_sampling.max_rounds must be >= 1 (the first round counts), got {out.max_rounds!r}")
    if not out.oversample >= 1:
        raise UsageError(f"rl.dynamic_sampling.oversample must be >= 1, got {out.oversample}")
    return out
