"""Hugging Face checkpoint folders: lazy safetensors reading, sharded writing, side files.

Reading opens the file for each tensor and closes it again, so resident memory holds one
tensor, not the mapped files. Writing goes to a hidden temporary folder that is renamed into
place only when everything (shards, index, config, tokenizer files) is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..models.qwen2_5_vl.hf_mapping import canonical_hf_name
from .atomic import remove, replace_dir, sibling

# Files a Qwen2.5-VL checkpoint folder carries besides weights and config.json.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold what the model needs."""


class HFCheckpointReader:
    """Tensors of a safetensors checkpoint (single file or sharded with an index), by canonical name."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' of tensor names to shard files")
        elif (self.dir / "model.safetensors").exists():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
        self._where: dict[str, tuple[Path, str]] = {}
        for name, file in weight_map.items():
            canon = canonical_hf_name(name)
            if canon in self._where:
                raise CheckpointError(f"{hf_dir}: tensor {canon!r} appears twice (as {name!r})")
            self._where[canon] = (self.dir / file, name)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as (f, key):
            return tuple(f.get_slice(key).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._open(name) as (f, key):
            return _TORCH_DTYPES[f.get_slice(key).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as (f, key):
            return f.get_tensor(key)

    @contextlib.contextmanager
    def _open(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        path, key = self._where[name]
        if not path.is_file():
            raise CheckpointError(f"{self.dir}: shard {path.name} (holding {key!r}) does not exist")
        with safe_open(path, framework="pt") as f:
            if key not in f.keys():
                raise CheckpointError(f"{self.dir}: the index puts {key!r} in {path.name}, which does not hold it")
            yield f, key


def check_tensors(reader: HFCheckpointReader, expected: dict[str, tuple[int, ...]], optional: Iterable[str] = ()) -> None:
    """Every expected tensor present once with its shape, nothing else (``optional`` may be absent)."""
    have = set(reader.names())
    optional = set(optional)
    missing = sorted(set(expected) - have - optional)
    extra = sorted(have - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    for name in sorted(have & set(expected)):
        shape = reader.shape(name)
        if shape != tuple(expected[name]):
            problems.append(f"tensor {name!r} has shape {list(shape)}, expected {list(expected[name])}")
    if problems:
        raise CheckpointError(f"{reader.dir}: " + "; ".join(problems))


def _occupied(path: Path) -> bool:
    return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary sibling folder that becomes ``out`` only if the block finishes.

    Without ``overwrite`` an ``out`` that is (or becomes, while the block runs) non-empty is
    never touched: the final rename fails instead. With it, the new folder replaces the old one
    atomically (:func:`.atomic.replace_dir`). ``out`` may not be, or contain, an input.
    """
    out = Path(out)
    for source in inputs:
        source = Path(source).resolve()
        if out.resolve() == source or out.resolve() in source.parents:
            raise FileExistsError(f"output {out} is, or contains, the input {source}")
    if _occupied(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "incomplete")
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not overwrite or not _occupied(out):
            try:
                os.rename(tmp, out)  # atomic; refuses a non-empty directory that appeared meanwhile
            except OSError as e:
                raise FileExistsError(f"{out} appeared while converting and is not empty; "
                                      f"nothing was written (pass --overwrite to replace it)") from e
        else:
            replace_dir(tmp, out)  # a symlink is replaced as a link: its target is left alone
    except BaseException:
        remove(tmp)
        raise


def copy_side_files(src: str | Path | None, dst: Path) -> list[str]:
    """Copy tokenizer / processor / generation files that exist in ``src``."""
    copied = []
    if src is None:
        return copied
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

TensorPlan = list[tuple[str, tuple[int, ...], torch.dtype]]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors_shards(plan: TensorPlan, tensors: Iterable[tuple[str, torch.Tensor]], out: Path,
                             max_shard_bytes: int) -> dict:
    """Write ``model-0000i-of-0000N.safetensors`` shards and their index, one tensor at a time.

    ``plan`` (names, shapes, dtypes in production order) fixes each shard's header up front, so
    every tensor goes straight to disk when it arrives: memory holds one tensor, not one shard.
    A tensor larger than ``max_shard_bytes`` gets a shard of its own.
    """
    shards: list[TensorPlan] = [[]]
    size = 0
    for entry in plan:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    stream = iter(tensors)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        with open(out / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype in shard:
                got_name, t = next(stream)
                if got_name != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise CheckpointError(f"expected {name} {list(shape)} {dtype}, got {got_name} "
                                          f"{list(t.shape)} {t.dtype}")
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
                weight_map[name] = file
        total += offset
    if next(stream, None) is not None:
        raise CheckpointError("more tensors than planned")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index
