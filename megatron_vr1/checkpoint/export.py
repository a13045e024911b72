"""Hugging Face-named full tensors out of a live, sharded model: the rollout engine's weight sync
and the HF export use this, through the same mapping as the converter.

Every rank of the job calls :func:`iter_hf_weights` together and receives the same buckets. The
job agrees on a plan first (which stage owns which parameter, in which bucket); then, per bucket,
the owning stage all-gathers its shards over tensor parallelism in one flat collective, turns
them into HF tensors through the mapping, and broadcasts the bucket's HF tensors as one flat
buffer over the pipeline group. Buffers live on the platform's device (NCCL cannot move CPU
tensors), so a bucket costs two collectives however many parameters it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import platform
from ..models.qwen2_5_vl.hf_mapping import ParamMapping, VocabSplit, iter_model_mappings, param_mappings

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class _Entry:
    stage: int
    name: str  # Megatron (mapping) name
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    mapping: ParamMapping
    hf_shapes: list[tuple[int, ...]]  # the HF tensors it becomes

    @property
    def hf_numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.hf_shapes)


def _merge(mapping, shards, vocab_size):
    return mapping.merge(shards, vocab_size) if isinstance(mapping, VocabSplit) else mapping.merge(shards)


def _all_gather_flat(out: torch.Tensor, flat: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)


def _plan(model, bucket_bytes: int) -> list[list[_Entry]]:
    """Buckets of entries, the same on every rank: one stage and one dtype per bucket."""
    args = model.args
    tp = ps.get_tensor_model_parallel_world_size()
    pp_group = ps.get_pipeline_model_parallel_group()
    mine = [(m.megatron, tuple(p.shape), str(p.dtype).replace("torch.", ""))
            for _, p, m in iter_model_mappings(model, args, model.padded_vocab_size, model.layer_offset)]
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, mine, group=pp_group)  # every stage learns what the others own
    table = param_mappings(args, model.padded_vocab_size)
    done: set[str] = set()
    buckets: list[list[_Entry]] = []
    size = 0
    for stage, owned in enumerate(stages):
        for name, shard_shape, dtype_name in owned:
            mapping = table[name]
            if all(h in done for h in mapping.hf):
                continue  # the last stage's copy of tied embeddings
            done.update(mapping.hf)
            metas = [torch.empty(shard_shape, device="meta")] * tp
            hf_shapes = [tuple(t.shape) for t in _merge(mapping, metas, args.vocab_size)]
            entry = _Entry(stage, name, shard_shape, getattr(torch, dtype_name), mapping, hf_shapes)
            nbytes = entry.hf_numel * entry.dtype.itemsize
            last = buckets[-1][-1] if buckets else None
            if last is None or last.stage != stage or last.dtype != entry.dtype or size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(entry)
            size += nbytes
    return buckets


@torch.no_grad()
def iter_hf_weights(model: torch.nn.Module, bucket_bytes: int = 512 << 20) -> Iterator[Bucket]:
    """Buckets of ``(hf_name, tensor)``, at most ``bucket_bytes`` each (a single tensor larger than
    that travels alone), on the platform's device. Collective over the whole model-parallel group;
    each bucket's tensors are views of one fresh buffer."""
    args = model.args
    tp = ps.get_tensor_model_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    device = platform.device()
    params = {m.megatron: p for _, p, m in iter_model_mappings(model, args, model.padded_vocab_size,
                                                                model.layer_offset)}
    for bucket in _plan(model, bucket_bytes):
        stage, dtype = bucket[0].stage, bucket[0].dtype
        out = torch.empty(sum(e.hf_numel for e in bucket), dtype=dtype, device=device)
        if stage == my_stage:
            flat = torch.cat([params[e.name].detach().reshape(-1).to(device=device, dtype=dtype) for e in bucket])
            if tp > 1:
                gathered = torch.empty(tp * flat.numel(), dtype=dtype, device=device)
                _all_gather_flat(gathered, flat, tp_group)
                gathered = gathered.view(tp, -1)
            else:
                gathered = flat.view(1, -1)
            pieces, at = [], 0
            for e in bucket:
                n = torch.Size(e.shard_shape).numel()
                shards = [gathered[r, at:at + n].view(e.shard_shape) for r in range(tp)]
                pieces += [t.reshape(-1) for t in _merge(e.mapping, shards, args.vocab_size)]
                at += n
            torch.cat(pieces, out=out)
        if len(pp_ranks) > 1:
            dist.broadcast(out, src=pp_ranks[stage], group=pp_group)
        named, at = [], 0
        for e in bucket:
            for hf_name, shape in zip(e.mapping.hf, e.hf_shapes):
                n = torch.Size(shape).numel()
                named.append((hf_name, out[at:at + n].view(shape)))
                at += n
        yield named
