"""Megatron-Core distributed checkpoints (``torch_dist``) of Qwen2.5-VL, written and read one
tensor at a time.

The checkpoint stores every tensor at its global (unsplit) shape, so one written at any TP/PP
loads at any other. :func:`save_streaming` writes it from a *function* that produces each
Megatron parameter on demand (e.g. from Hugging Face safetensors): the model exists only on the
meta device and peak memory is one parameter. :func:`iter_checkpoint_params` reads it back the
same way. Trainers use :func:`save_model` / :func:`load_model` on their live, sharded model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from ..models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs
from ..models.qwen2_5_vl.hf_mapping import local_to_global_name
from .atomic import clear_stale, recover, remove, replace_dir, sibling
from .hf_files import CheckpointError

METADATA_FILE = "megatron_vr1.json"
_LM_LAYERS = "language_model.decoder.layers."
_STACKED = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")

ParamFn = Callable[[str], torch.Tensor]


def write_metadata(ckpt_dir: Path, args: Qwen25VLArgs, layout: ParallelLayout, dtype: torch.dtype,
                   padded_vocab: int, extra: dict | None = None) -> None:
    meta = {
        "format": "megatron_vr1/qwen2_5_vl",
        "hf_config": args.to_hf_config(),
        "padded_vocab_size": padded_vocab,
        "dtype": str(dtype).replace("torch.", ""),
        "parallel": dict(layout.__dict__),
        **(extra or {}),
    }
    (ckpt_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))


def read_metadata(ckpt_dir: str | Path) -> dict:
    recover(Path(ckpt_dir))
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete megatron-vr1 checkpoint (no {METADATA_FILE}: "
                                f"not one, or its save did not finish)")
    meta = json.loads(path.read_text())
    if meta.get("format") != "megatron_vr1/qwen2_5_vl":
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def _param_name(key: str, global_offset: tuple[int, ...], prepend: int) -> str:
    """A checkpoint tensor key (+ its stacked layer axis) -> the HF mapping's parameter name."""
    if prepend:
        if prepend != 1 or not key.startswith(_LM_LAYERS):
            raise ValueError(f"unexpected stacked checkpoint key {key!r} with {prepend} prepended axes")
        key = f"{_LM_LAYERS}{global_offset[0]}.{key[len(_LM_LAYERS):]}"
    return local_to_global_name(key, 0)


class _LazyPlanner(MCoreSavePlanner):
    """Produces each tensor only when the writer asks for it."""

    def __init__(self, resolve: Callable[[WriteItem], torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self._resolve = resolve

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self._resolve(write_item)


class _StreamingStrategy(SaveShardedStrategy):
    """megatron-core's ``torch_dist`` layout, written synchronously with lazily produced data."""

    def __init__(self, param_fn: ParamFn, dtype: torch.dtype) -> None:
        super().__init__("torch_dist", 1)
        self.param_fn = param_fn
        self.dtype = dtype
        self._cache: tuple[str, torch.Tensor] | None = None

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def _full(self, name: str) -> torch.Tensor:
        # gate and up of one fc1 are two chunks of the same parameter: keep the last one.
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            self._cache = (name, self.param_fn(name).to(self.dtype).contiguous())
        return self._cache[1]

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        regions: dict[tuple[str, tuple[int, ...]], tuple[str, int, tuple[int, ...]]] = {}
        for shards in sharded_state_dict.values():
            for sh in shards:
                if isinstance(sh, ShardedTensor):
                    off = tuple(sh.global_offset)
                    regions[(sh.key, off)] = (_param_name(sh.key, off, sh.prepend_axis_num),
                                              sh.prepend_axis_num, tuple(sh.local_shape))

        def resolve(item: WriteItem) -> torch.Tensor:
            fqn, offset = item.index.fqn, tuple(item.index.offset)
            name, prepend, local_shape = regions[(fqn, offset)]
            t = self._full(name)
            for dim, (start, size) in enumerate(zip(offset[prepend:], local_shape)):
                t = t.narrow(dim, start, size)
            return t.reshape(tuple(item.tensor_data.chunk.sizes)).contiguous()

        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        # One file per tensor: torch's FileSystemWriter keeps every tensor of a file alive until
        # the file is closed, so one file for everything would hold the whole model in memory.
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=False, thread_count=1, sync_files=True)
        planner = _LazyPlanner(resolve, dedup_replicated_tensors=False, flatten_state_dict=False)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
        self._cache = None


def save_streaming(model: torch.nn.Module, param_fn: ParamFn, ckpt_dir: Path, dtype: torch.dtype) -> None:
    """Write ``model``'s checkpoint (the model may live on the meta device).

    ``param_fn(name)`` returns the whole Megatron parameter ``name`` (mapping names: global layer
    numbers, unsplit over TP) when the writer reaches it; it is called about once per parameter.
    Must run where ``model`` was built: a single process whose parallel state is TP=1, PP=1.
    """
    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir),
                                sharded_strategy=_StreamingStrategy(param_fn, dtype))
    except CheckpointException as e:  # torch DCP wraps what param_fn raised: surface it
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]  # (exc, trace)
        cause = next((c for c in causes if isinstance(c, BaseException)), None)
        if cause is None:
            raise
        raise cause from e


def _weight_entries(model: torch.nn.Module):
    """The model's checkpoint entries that hold weights (not ``_extra_state`` objects), in order."""
    return [(k, v) for k, v in model.sharded_state_dict().items()
            if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def checkpoint_param_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(mapping name, whole shape) in the order :func:`iter_checkpoint_params` yields them."""
    return [(local_to_global_name(k, 0), tuple(v.data.shape)) for k, v in _weight_entries(model)]


def iter_checkpoint_params(model: torch.nn.Module, ckpt_dir: Path, dtype: torch.dtype
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """(mapping name, whole parameter) for every parameter of a TP=1, PP=1 ``model``, read from
    the checkpoint one at a time (the model itself may be on the meta device)."""
    num_layers = model.config.num_layers
    for key, value in _weight_entries(model):
        shape = tuple(value.data.shape)
        layer = _STACKED.match(key)
        # Ask for exactly this parameter's region: for a stacked LM tensor, one slot of the layer
        # axis, whatever TP/PP chunks the checkpoint was written in.
        if layer:
            data = torch.empty((1, *shape), dtype=dtype)
            request = ShardedTensor.from_rank_offsets(value.key, data, (0, int(layer.group(1)), num_layers),
                                                      replica_id=0)
        else:
            request = ShardedTensor.from_rank_offsets(value.key, torch.empty(shape, dtype=dtype), replica_id=0)
        loaded = dist_checkpointing.load({key: request}, str(ckpt_dir), validate_access_integrity=False)
        yield local_to_global_name(key, 0), loaded[key].reshape(shape)


ExtraState = Callable[[dict], dict]  # the model's sharded state dict -> more entries to save or load with it


def save_model(model: torch.nn.Module, ckpt_dir: str | Path, *, overwrite: bool = False,
               metadata: dict | None = None, extra_state: ExtraState | None = None,
               assets: Callable[[Path], None] | None = None) -> None:
    """Checkpoint a live (sharded) model, with the metadata ``mcore-to-hf`` needs; collective.

    Every rank writes into a hidden folder beside ``ckpt_dir``; once all are done rank 0 adds the
    metadata file (and ``assets(folder)``, e.g. tokenizer files) and puts the folder in place of
    ``ckpt_dir`` in one atomic step (:mod:`.atomic`). A save that dies at any point leaves
    ``ckpt_dir`` as it was: the previous checkpoint stays loadable. An existing checkpoint is
    replaced only with ``overwrite``. ``metadata`` adds entries to the metadata file;
    ``extra_state(model_sharded_state_dict)`` adds sharded entries (optimizer, scheduler, data
    position, ...) to the checkpoint, beside the model's, which stay at the top level.
    """
    ckpt_dir = Path(ckpt_dir)
    box: list = [None, None]
    if torch.distributed.get_rank() == 0:
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
            box[0] = f"{ckpt_dir} exists and is not empty (pass overwrite=True to replace it)"
        else:
            ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
            recover(ckpt_dir)
            clear_stale(ckpt_dir, "incomplete")  # left by saves that were killed
            clear_stale(ckpt_dir, "replaced")
            tmp = sibling(ckpt_dir, "incomplete")
            tmp.mkdir()
            box[1] = str(tmp)
    torch.distributed.broadcast_object_list(box, src=0)  # every rank raises, or none does
    if box[0]:
        raise FileExistsError(box[0])
    tmp = Path(box[1])
    try:
        sharded = model.sharded_state_dict()
        if extra_state is not None:
            sharded.update(_disjoint(extra_state(sharded), sharded))
        dist_checkpointing.save(sharded, str(tmp))
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            if assets is not None:
                assets(tmp)
            dtype = next(model.parameters()).dtype
            write_metadata(tmp, model.args, model.layout, dtype, model.padded_vocab_size,
                           extra={"source": "training", **(metadata or {})})
            replace_dir(tmp, ckpt_dir)
        torch.distributed.barrier()
    except BaseException:
        if torch.distributed.get_rank() == 0:
            remove(tmp)
        raise


def _disjoint(extra: dict, model_state: dict) -> dict:
    clash = sorted(set(extra) & set(model_state))
    if clash:
        raise ValueError(f"extra checkpoint entries {clash} clash with the model's own")
    return extra


def load_model(model: torch.nn.Module, ckpt_dir: str | Path, *, extra_state: ExtraState | None = None) -> dict:
    """Load a checkpoint written at any TP/PP into a live model; collective over all ranks.

    With ``extra_state`` (as for :func:`save_model`) those entries are loaded too and returned.
    """
    meta = read_metadata(ckpt_dir)
    args = getattr(model, "args", None)
    if args is not None:
        saved = type(args).from_hf_config(meta["hf_config"])
        if saved != args:
            a, b = dataclasses.asdict(saved), dataclasses.asdict(args)
            differ = sorted(k for k in a if a[k] != b[k])
            raise CheckpointError(f"{ckpt_dir} holds another model than this one: {', '.join(differ)} differ "
                             f"(checkpoint {[a[k] for k in differ]}, model {[b[k] for k in differ]})")
    padded = getattr(model, "padded_vocab_size", None)
    if padded is not None and meta["padded_vocab_size"] != padded:
        raise CheckpointError(
            f"{ckpt_dir} holds a vocab padded to {meta['padded_vocab_size']} rows but this model pads to "
            f"{padded} (tensor_parallel / make_vocab_size_divisible_by differ); convert again for this layout"
        )
    sharded = model.sharded_state_dict()
    absent = _absent_extra_states(sharded, ckpt_dir)
    for key in absent:
        del sharded[key]
    request = dict(sharded)
    if extra_state is not None:
        request.update(_disjoint(extra_state(sharded), sharded))
    state = dist_checkpointing.load(request, str(ckpt_dir))
    missing, unexpected = model.load_state_dict({k: state[k] for k in sharded}, strict=False)
    if unexpected or set(missing) - set(absent):
        raise ValueError(f"{ckpt_dir} does not fit this model: missing {sorted(set(missing) - set(absent))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return {k: v for k, v in state.items() if k not in sharded}


def _absent_extra_states(sharded: dict, ckpt_dir: str | Path) -> list[str]:
    """Transformer Engine modules carry an ``_extra_state`` object (FP8 scaling metadata) that a
    checkpoint written by local-spec layers (the converter, a CPU run) does not have: such a
    model loads it with TE's defaults, which is exact outside FP8 training."""
    extra = [k for k, v in sharded.items() if k.endswith("_extra_state") and isinstance(v, ShardedObject)]
    if not extra:
        return []
    saved = {v.key for v in load_sharded_metadata(str(ckpt_dir)).values()
             if isinstance(v, ShardedObject)}
    return [k for k in extra if sharded[k].key not in saved]
