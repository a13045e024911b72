"""What a resumed run does with settings that changed since its checkpoint was saved.

Each checkpoint's metadata keeps the run's settings. On resume the command line's settings win and
take effect (learning rate, schedule, steps, batch size, PTST stages: the optimizer's learning
rates are set from the config, not from the saved optimizer state); what changed is printed as a
diff. A change that cannot be honoured exactly is refused in one line unless
``resume_allow_changes=true``: another model, or another data order (the data file, the seed, the
shuffle), whose position the checkpoint could no longer name.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import UsageError

# settings that say nothing about what the run computes
IGNORED = ("checkpoint.", "metrics.", "plan.", "dry_run", "resume_allow_changes", "data.num_workers", "tokenizer",
           "init_from", "backend", "hydra")
# settings a resumed run cannot honour exactly: the model it trains and the order it reads its data in
REFUSED = ("model.hf_config", "data.train", "data.shuffle", "seed")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole (a PTST stage list is one setting)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every setting that differs, ignored ones left out."""
    before, after = flatten(saved), flatten(now)
    keys = sorted(set(before) | set(after))
    return [(k, before.get(k), after.get(k)) for k in keys
            if before.get(k) != after.get(k) and not _matches(k, IGNORED)]


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def check_resume(saved: dict | None, now: dict, *, allow: bool, where: str) -> list[str]:
    """Lines saying what changed since ``where`` was saved (none for a checkpoint without saved
    settings); a :class:`UsageError` for a change :data:`REFUSED` names, unless ``allow``."""
    if not saved:
        return []
    diff = changes(saved, now)
    refused = [k for k, _, _ in diff if _matches(k, REFUSED)]
    if refused and not allow:
        raise UsageError(f"resuming {where}: {', '.join(refused)} changed since it was saved, which the run cannot "
                         f"follow exactly (another model or data order); use another checkpoint.dir, or "
                         f"resume_allow_changes=true to go on as it is")
    if not diff:
        return []
    return [f"resuming {where} with {len(diff)} setting(s) changed since it was saved (the new ones apply):"] + \
        [f"  {k}: {_show(old)} -> {_show(new)}" for k, old, new in diff]


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)
