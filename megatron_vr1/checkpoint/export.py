"""Hugging Face-named full tensors out of a live, sharded model: the rollout engine's weight sync
and the HF export use this, through the same mapping as the converter.

Every rank of the job calls :func:`iter_hf_weights` together and receives the same buckets:
each parameter is all-gathered over its tensor-parallel group on the stage that owns it, turned
into HF tensors by the mapping, and broadcast over the pipeline group.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..models.qwen2_5_vl.hf_mapping import VocabSplit, iter_model_mappings, param_mappings

Bucket = list[tuple[str, torch.Tensor]]


def _merge(mapping, shards, vocab_size):
    return mapping.merge(shards, vocab_size) if isinstance(mapping, VocabSplit) else mapping.merge(shards)


@torch.no_grad()
def iter_hf_weights(model: torch.nn.Module, bucket_bytes: int = 512 << 20) -> Iterator[Bucket]:
    """Buckets of ``(hf_name, tensor)``, at most ``bucket_bytes`` each; a single tensor larger than
    that travels alone. Collective over the whole model-parallel group."""
    args = model.args
    tp = ps.get_tensor_model_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    local = list(iter_model_mappings(model, args, model.padded_vocab_size, model.layer_offset))
    # Which stage owns what: every stage learns every other stage's (name, shard shape, dtype).
    mine = [(m.megatron, tuple(p.shape), str(p.dtype)) for _, p, m in local]
    stages: list = [None] * len(pp_ranks)
    dist.all_gather_object(stages, mine, group=pp_group)
    by_name = {m.megatron: (p, m) for _, p, m in local}
    table = param_mappings(args, model.padded_vocab_size)
    my_stage = ps.get_pipeline_model_parallel_rank()
    done: set[str] = set()
    bucket: Bucket = []
    size = 0
    for stage, entries in enumerate(stages):
        for name, shard_shape, dtype_name in entries:
            mapping = table[name]
            if all(h in done for h in mapping.hf):
                continue  # the last stage's copy of tied embeddings
            dtype = getattr(torch, dtype_name.replace("torch.", ""))
            if stage == my_stage:
                param = by_name[name][0].detach()
                shards = [torch.empty_like(param) for _ in range(tp)]
                dist.all_gather(shards, param.contiguous(), group=tp_group)
                tensors = _merge(mapping, shards, args.vocab_size)
            else:
                metas = [torch.empty(shard_shape, dtype=dtype, device="meta")] * tp
                tensors = [torch.empty(t.shape, dtype=dtype) for t in _merge(mapping, metas, args.vocab_size)]
            for hf_name, t in zip(mapping.hf, tensors):
                t = t.contiguous()
                if len(pp_ranks) > 1:
                    dist.broadcast(t, src=pp_ranks[stage], group=pp_group)
                nbytes = t.numel() * t.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((hf_name, t))
                size += nbytes
                done.add(hf_name)
    if bucket:
        yield bucket

