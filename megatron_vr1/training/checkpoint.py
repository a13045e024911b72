"""Training checkpoints: everything a run needs to continue exactly where it stopped.

``<dir>/iter_<step>/`` is a megatron-core distributed checkpoint in the converter's format (the
model's tensors at the top level, so ``tools/convert.py mcore-to-hf`` exports it as it is), plus
the optimizer (sharded like the model), the learning-rate schedule, the trainer's own state
(step, data position, PTST stage, ...), every rank's RNG states, and ``hf_assets/`` (config,
tokenizer, processor files). Each is written under a hidden name and renamed when complete
(:func:`~megatron_vr1.checkpoint.save_model`); the newest complete one is where a run resumes;
only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..checkpoint import load_model, save_model
from ..checkpoint.atomic import clear_stale, remove
from ..checkpoint.convert import HF_ASSETS
from ..checkpoint.hf_files import SIDE_FILES
from ..checkpoint.megatron_files import METADATA_FILE, read_metadata

_ITER = re.compile(r"^iter_(\d{7,})$")
# the distributed optimizer's state: each DP rank saves its own shards, in parallel, no gathering
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def resolve_checkpoint(path: str | Path, option: str, *, hf_ok: bool = False, say=print) -> Path:
    """The checkpoint ``option=path`` names: a checkpoint folder itself, or a run directory's
    newest complete ``iter_*`` checkpoint (said through ``say``); with ``hf_ok`` a Hugging Face
    folder too. Anything else is a :class:`UsageError` that says what the folder is."""
    from ..errors import UsageError

    folder = Path(path)
    if (folder / METADATA_FILE).is_file() or (hf_ok and (folder / "config.json").is_file()):
        return folder
    if not folder.exists():
        raise UsageError(f"{option}={path} does not exist")
    newest = TrainingCheckpoints(folder).latest()
    if newest is not None:
        say(f"{option}={path}: a run directory; taking its newest complete checkpoint, {newest.name}")
        return newest
    if (folder / "config.json").is_file():
        raise UsageError(f"{option}={path} is a Hugging Face folder: convert it first "
                         f"(tools/convert.py hf-to-mcore --hf {path} --out <folder>) and pass that folder")
    kinds = f"a Hugging Face folder (config.json), a checkpoint ({METADATA_FILE})" if hf_ok \
        else f"a checkpoint ({METADATA_FILE})"
    raise UsageError(f"{option}={path} is neither {kinds} nor a run directory with a complete iter_* checkpoint")


class TrainingCheckpoints:
    """The ``iter_*`` checkpoints of one run directory."""

    def __init__(self, root: str | Path, *, keep_last: int = 2, hf_assets: Optional[dict[str, bytes]] = None,
                 settings: Optional[dict] = None) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.hf_assets = dict(hf_assets or {})  # file name -> content, written into every checkpoint
        self.settings = settings  # the run's config, kept in each checkpoint's metadata (training.resume)

    def path(self, step: int) -> Path:
        return self.root / f"iter_{step:07d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first (a folder counts once its
        metadata file is in, which a save writes last, inside a folder renamed into place)."""
        found = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = _ITER.match(p.name)
                if m and (p / METADATA_FILE).is_file():
                    found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1][1] if done else None

    # ------------------------------------------------------------------ save / load
    @staticmethod
    def _extra(optimizer, scheduler, train_state: dict, is_loading: bool, with_rng: bool = True):
        rank, world = dist.get_rank(), dist.get_world_size()

        def extra(model_sharded: dict) -> dict:
            out = {
                "optimizer": optimizer.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                          metadata=dict(OPTIMIZER_SHARDING)),
                "scheduler": scheduler.state_dict(),
                "train_state": train_state,
            }
            if with_rng:  # one RNG state per global rank: restored only at the same world size
                out["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
            return out
        return extra

    def save(self, step: int, model, optimizer, scheduler, train_state: dict[str, Any]) -> Path:
        """Checkpoint ``step``; collective. ``train_state``: plain data, the same on every rank."""
        out = self.path(step)
        meta = {"step": step, "world_size": dist.get_world_size(), **({"settings": self.settings} if self.settings else {})}
        save_model(model, out, overwrite=True, metadata=meta,
                   extra_state=self._extra(optimizer, scheduler, dict(train_state, step=step), is_loading=False),
                   assets=self._write_assets)
        if dist.get_rank() == 0:
            for _, old in self.complete()[:-self.keep_last]:
                remove(old)
            clear_stale(out, "incomplete")
        dist.barrier()
        return out

    def saved_settings(self, path: Path) -> Optional[dict]:
        """The settings the run had when it saved ``path`` (None for a checkpoint without them)."""
        return read_metadata(path).get("settings")

    def load(self, path: Path, model, optimizer, scheduler) -> dict[str, Any]:
        """Restore model, optimizer, schedule and RNG from ``path``; returns the trainer state."""
        _materialise_optimizer_state(optimizer)
        same_world = read_metadata(path).get("world_size") == dist.get_world_size()
        state = load_model(model, path, extra_state=self._extra(optimizer, scheduler, {}, is_loading=True,
                                                                 with_rng=same_world))
        with torch.no_grad():  # fp32 main parameters are views of the model's
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
        # the saved param groups carry the old run's rates, which megatron-core's schedule reads
        # before its own: the config's must win on resume
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in opt.param_groups:
                group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.load_state_dict(state["scheduler"])
        if same_world:
            set_rng_state(state["rng_state"])
        return state["train_state"]

    def _write_assets(self, folder: Path) -> None:
        assets = folder / HF_ASSETS
        assets.mkdir(exist_ok=True)
        for name, content in self.hf_assets.items():
            (assets / name).write_bytes(content)


@torch.no_grad()
def _materialise_optimizer_state(optimizer) -> None:
    """Give every parameter its Adam state (and step) before a load fills them in: megatron-core
    builds the state to load into from the live one, which a fresh torch optimizer does not have
    yet. One inner step at learning rate 0 with zero gradients creates it and changes nothing."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(len(inner.state[p]) for p in params):
            continue
        rates = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        grads = [p.grad for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p, g in zip(params, grads):
            p.grad = g
        for g, lr in zip(inner.param_groups, rates):
            g["lr"] = lr


def _restore_adam_steps(optimizer, saved: dict) -> None:
    """torch's Adam keeps its step count per parameter: megatron-core's distributed optimizer saves
    it in the param groups and sets it, but then copies its parameter state over it again with the
    live (placeholder) step. Set it from what was saved."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [saved] if len(chained) == 1 else [saved[i] for i in range(len(chained))]
    for opt, part in zip(chained, parts):
        steps = {g["step"] for g in part.get("optimizer", {}).get("param_groups", []) if "step" in g}
        if len(steps) == 1:
            step = float(steps.pop())
            for param_state in opt.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = torch.tensor(step, dtype=torch.float32)


def collect_hf_assets(*sources: Optional[Path], generated: Optional[dict[str, str]] = None) -> dict[str, bytes]:
    """A checkpoint's ``hf_assets``: ``config.json`` and the side files (tokenizer, processor,
    generation config) of each source folder, later sources winning, then ``generated`` files
    for names no source had."""
    files: dict[str, bytes] = {}
    for source in sources:
        if source is None or not Path(source).is_dir():
            continue
        for name in ("config.json", *SIDE_FILES):
            if (Path(source) / name).is_file():
                files[name] = (Path(source) / name).read_bytes()
    for name, text in (generated or {}).items():
        files.setdefault(name, text.encode())
    return files
