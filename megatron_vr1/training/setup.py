"""What every trainer does before its loop: parallel state, model, tokenizer, image settings,
checkpoints and metrics, from the Hydra config shared by the SFT and RL entry points."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf

from .. import platform
from ..checkpoint import CheckpointError, load_model
from ..checkpoint.convert import HF_ASSETS
from ..config import model_from_conf
from ..data import ImageConfig, ImageError, RecordError, SampleError, load_tokenizer, packed_batch
from ..data.images import CLIP_MEAN, CLIP_STD
from ..errors import UsageError
from ..models.qwen2_5_vl import ConfigError, ImageTokenError, ParallelLayout, Qwen25VLArgs, build_model
from ..models.qwen2_5_vl.specs import LOCAL_FAMILY, resolve_backend
from .checkpoint import TrainingCheckpoints, collect_hf_assets, resolve_checkpoint

# errors that mean "change the command or the data": one line, exit 2 (tracebacks are for bugs)
USER_ERRORS = (UsageError, ConfigError, CheckpointError, RecordError, SampleError, ImageError, ImageTokenError,
               FileNotFoundError, FileExistsError)


def main_guard(run: Callable[[DictConfig], Any], cfg: DictConfig, name: str) -> None:
    """Run an entry point (or, with ``dry_run=true``, plan it: exit status 1 when the plan does
    not fit, as ``tools/plan.py``); a user error prints one line (per rank that hits it) and exits 2.
    A trainer's rank 0 also keeps what it prints in ``<checkpoint.dir>/console.log``."""
    from .metrics import CONSOLE, Tee

    if cfg.get("dry_run"):
        run = _dry_run
    ckpt = cfg.get("checkpoint")  # a trainer's section (eval's checkpoint= is a path)
    folder = ckpt.get("dir") if isinstance(ckpt, DictConfig) and not cfg.get("dry_run") else None
    console = Tee(Path(folder) / CONSOLE) if folder and os.environ.get("RANK", "0") == "0" else None
    try:
        run(cfg)
    except USER_ERRORS as e:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        where = f" [rank {rank}]" if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 else ""
        print(f"{name}{where}: error: {e}", file=sys.stderr, flush=True)
        platform.shutdown_distributed()
        sys.exit(2)
    finally:
        if console is not None:
            console.close()


def _dry_run(cfg: DictConfig) -> None:
    from ..planning import dry_run

    if not dry_run(cfg).fits:
        sys.exit(1)


def prepare_job(cfg: DictConfig) -> None:
    """What a trainer does first, before any process group starts: ``init_from`` becomes the
    checkpoint it names (a run directory: its newest complete one, said on rank 0), and the job is
    checked as the planner and ``dry_run`` check it (:func:`~megatron_vr1.planning.validate.check_job`)."""
    from ..planning.validate import check_job

    if cfg.init_from:
        say = print if os.environ.get("RANK", "0") == "0" else (lambda *_: None)
        cfg.init_from = str(resolve_checkpoint(cfg.init_from, "init_from", say=say))
    check_job(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))


@dataclass
class Parallel:
    args: Qwen25VLArgs
    layout: ParallelLayout
    backend: str
    dtype: torch.dtype
    dp_rank: int
    dp_size: int
    is_writer: bool  # global rank 0: writes metrics, prints
    cp_rank: int = 0
    replica_leader: bool = True  # the first rank (TP, CP and PP rank 0) of its data-parallel replica

    @property
    def sequence_multiple(self) -> int:
        """Packed sequences are padded to a multiple of this (context-parallel ranks take 2 chunks each)."""
        return 2 * self.layout.context_parallel if self.layout.context_parallel > 1 else 1

    @property
    def pad_to(self) -> int:
        """Packed micro-batches are padded to a multiple of this (sequence parallelism splits each
        context-parallel rank's share)."""
        tp = self.layout.tensor_parallel if self.layout.sequence_parallel else 1
        return tp * self.sequence_multiple

    def pack(self, samples, *, pad_id: int):
        """``samples`` as one whole packed micro-batch (host tensors), padded for this layout."""
        return packed_batch(samples, self.args, pad_to_multiple_of=self.pad_to,
                            sequence_multiple=self.sequence_multiple, pad_id=pad_id)

    def shard(self, batch):
        """This context-parallel rank's share of a whole packed micro-batch."""
        return batch.context_shard(self.layout.context_parallel, self.cp_rank)


def start_parallel(cfg: DictConfig) -> Parallel:
    """Parallel state for ``cfg.model``'s layout over this job's processes."""
    args, layout = model_from_conf(cfg.model)
    if layout.sequence_parallel and layout.tensor_parallel == 1:
        layout.sequence_parallel = False  # nothing to split over: megatron-core refuses SP without TP
    check_context_parallel(layout.context_parallel, resolve_backend(cfg.backend))
    platform.init_distributed(layout.tensor_parallel, layout.pipeline_parallel, seed=int(cfg.seed),
                              context_parallel_size=layout.context_parallel)
    dtype = {"auto": torch.bfloat16 if platform.has_cuda() else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}.get(str(cfg.train.dtype))
    if dtype is None:
        raise UsageError(f"train.dtype must be auto, bf16 or fp32, got {cfg.train.dtype!r}")
    leader = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
              and ps.get_context_parallel_rank() == 0)
    return Parallel(args, layout, resolve_backend(cfg.backend), dtype, ps.get_data_parallel_rank(),
                    ps.get_data_parallel_world_size(), torch.distributed.get_rank() == 0,
                    cp_rank=ps.get_context_parallel_rank(), replica_leader=leader)


def check_context_parallel(size: int, backend: str) -> None:
    """Context parallelism runs the local layer spec's attention (all-gathered keys and values);
    Transformer Engine's ring attention is not wired in yet: refuse it with the change to make."""
    if size < 1:
        raise UsageError(f"model.parallel.context_parallel must be >= 1, got {size}")
    if size > 1 and backend not in LOCAL_FAMILY:
        raise UsageError(f"model.parallel.context_parallel={size} runs with the local layer spec; the {backend!r} "
                         f"backend's context-parallel attention is not wired in: set backend=local (or fused)")


def recompute_config(kind: str, layers: int = 1) -> dict[str, Any]:
    """megatron-core activation recomputation: ``none``; ``selective`` (core attention runs again
    in the backward pass, GEMM outputs are kept); ``full`` (each block of ``layers`` layers keeps
    only its input and runs again in the backward pass)."""
    if kind == "none":
        return {}
    if kind == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if kind == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": int(layers)}
    raise UsageError(f"train.recompute must be none, selective or full, got {kind!r}")


def build_policy(cfg: DictConfig, par: Parallel, *, resume: Optional[Path]) -> torch.nn.Module:
    """This rank's model, with ``init_from``'s weights unless the run resumes (the checkpoint then
    brings them, with the optimizer's state)."""
    overrides = dict(platform.fusion_config(par.backend, gradient_accumulation=True),
                     **recompute_config(cfg.train.get("recompute", "none"), cfg.train.get("recompute_layers", 1)))
    model = build_model(par.args, par.layout, backend=par.backend, dtype=par.dtype, config_overrides=overrides)
    if platform.has_cuda():
        model = model.cuda()
    if resume is None and cfg.init_from:
        load_model(model, cfg.init_from)
    return model


def source_assets(cfg: DictConfig) -> Optional[Path]:
    """The ``hf_assets`` folder of ``init_from``, if it has one."""
    if cfg.init_from and (Path(cfg.init_from) / HF_ASSETS).is_dir():
        return Path(cfg.init_from) / HF_ASSETS
    return None


def tokenizer_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.tokenizer) if cfg.tokenizer else source_assets(cfg)
    if path is None or not path.is_dir():
        raise UsageError("no tokenizer: set tokenizer=<folder> (or init_from a checkpoint whose hf_assets has one)"
                         if path is None else f"tokenizer folder {path} does not exist")
    return path


def image_config(cfg: DictConfig) -> ImageConfig:
    """Image bounds from the config, else from ``init_from``'s processor file, else transformers'
    defaults: trainer, rollout and evaluation must resize images the same way."""
    assets = source_assets(cfg)
    saved = {}
    if assets is not None and (assets / "preprocessor_config.json").is_file():
        saved = json.loads((assets / "preprocessor_config.json").read_text())
    defaults = ImageConfig()
    pick = lambda key: int(cfg.data.get(key) or saved.get(key) or getattr(defaults, key))  # noqa: E731
    return ImageConfig(min_pixels=pick("min_pixels"), max_pixels=pick("max_pixels"))


def processor_file(images: ImageConfig) -> str:
    """A ``preprocessor_config.json`` for the image settings the run used."""
    return json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "min_pixels": images.min_pixels, "max_pixels": images.max_pixels, "patch_size": images.patch_size,
        "temporal_patch_size": images.temporal_patch_size, "merge_size": images.merge_size}, indent=2)


def checkpoints(cfg: DictConfig, images: ImageConfig, tokenizer: Path) -> TrainingCheckpoints:
    assets = collect_hf_assets(source_assets(cfg), tokenizer,
                               generated={"preprocessor_config.json": processor_file(images)})
    return TrainingCheckpoints(cfg.checkpoint.dir, keep_last=int(cfg.checkpoint.keep_last), hf_assets=assets,
                               settings=OmegaConf.to_container(cfg, resolve=True))


def resume_point(cfg: DictConfig, ckpts: TrainingCheckpoints, *, writer: bool) -> Optional[Path]:
    """The checkpoint this run resumes from (None: a fresh start), after checking what changed
    since it was saved (:mod:`.resume`): the diff printed on the writer rank, a change the run
    cannot follow refused unless ``resume_allow_changes=true``."""
    from .resume import check_resume

    resume = ckpts.latest()
    if resume is not None:
        lines = check_resume(ckpts.saved_settings(resume), OmegaConf.to_container(cfg, resolve=True),
                             allow=bool(cfg.get("resume_allow_changes")), where=str(resume))
        if writer and lines:
            print("\n".join(lines), flush=True)
    return resume


def save_due(cfg: DictConfig, step: int, total_steps: int, stopping: bool) -> bool:
    """Whether a trainer saves after ``step``: on a stop request, every ``checkpoint.every``
    steps, and after the last step unless ``checkpoint.at_end`` is off."""
    return stopping or step % int(cfg.checkpoint.every) == 0 or (step == total_steps and bool(cfg.checkpoint.at_end))


def check_data(cfg: DictConfig, dataset, par: Parallel) -> None:
    """The pre-flight data check (``data.preflight``, on by default) before step 1: a bad record
    stops the run now, in one line, or is counted and skipped under ``data.skip_bad_samples``."""
    from ..data.preflight import preflight

    if not cfg.data.get("preflight", True):
        return
    progress = cfg.metrics.progress if cfg.metrics.get("progress") is not None else sys.stderr.isatty()
    preflight(dataset, skip_bad=bool(cfg.data.skip_bad_samples), workers=int(cfg.data.num_workers),
              progress=bool(progress), say=print if par.is_writer else (lambda *_: None))


def load_tokenizer_for(cfg: DictConfig, args: Qwen25VLArgs):
    """The run's tokenizer folder and tokenizer, checked against the model's special-token ids."""
    from ..data.tokenizer import check_tokenizer

    path = tokenizer_dir(cfg)
    tokenizer = load_tokenizer(path)
    check_tokenizer(tokenizer, args, str(path))
    return path, tokenizer


def config_summary(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
