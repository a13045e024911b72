"""How Qwen2.5-VL is laid out over ranks, and a way to inspect any rank without its hardware.

The ViT always lives on the first pipeline stage, so that stage usually gets fewer LM layers
(``num_layers_in_first_pipeline_stage``); the other stages share the rest evenly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class ParallelLayout:
    """Mirrors ``conf/model/*.yaml: parallel``."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    num_layers_in_first_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    # Context parallelism splits every packed sequence over this many ranks (long reasoning traces;
    # models.common.context_parallel). Parameters are the same on every context-parallel rank.
    context_parallel: int = 1
    # Padded vocab rows give logits of 0 that enter every softmax, so log-probs would drift from
    # the HF model (and the rollout engine). Qwen's vocabularies divide by 8: pad only if TP needs.
    make_vocab_size_divisible_by: int = 1

    @property
    def world_size(self) -> int:
        """The smallest job of this layout: one data-parallel replica."""
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel


# Meta builds must not allocate on a GPU: megatron-core's CPU initialisation path honours
# the meta device context, its GPU path names a device explicitly.
META_BUILD_OVERRIDES = {"use_cpu_initialization": True}


@contextmanager
def fake_rank(layout: ParallelLayout, rank: int) -> Iterator[None]:
    """Pretend to be ``rank`` of a TP x PP job (torch's fake process group): nothing communicates.

    Only for building and inspecting models, e.g. on the meta device; refuses to run inside a
    real distributed job.
    """
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ... import platform

    if torch.distributed.is_initialized():
        raise RuntimeError("fake_rank needs a process without torch.distributed initialised")
    platform.use_cpu_backend()
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            context_parallel_size=layout.context_parallel,
            create_gloo_process_groups=False,  # the fake backend has no gloo twin
        )
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@contextmanager
def meta_stage(args, layout: ParallelLayout, rank: int, dtype: torch.dtype = torch.bfloat16):
    """``rank``'s stage built on the meta device (no memory), inside its fake parallel state."""
    from .model import build_model

    with fake_rank(layout, rank), torch.device("meta"):
        yield build_model(args, layout, backend="local", dtype=dtype, config_overrides=META_BUILD_OVERRIDES)


def meta_stages(args, layout: ParallelLayout, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple]:
    """``(model, pipeline stage, tensor-parallel rank)`` for every rank of one replica, in
    megatron-core's rank order, each built on the meta device (context-parallel ranks repeat
    these). Each model is valid only until the next one is built."""
    from dataclasses import replace

    from megatron.core import parallel_state

    layout = replace(layout, context_parallel=1)
    for rank in range(layout.world_size):
        with meta_stage(args, layout, rank, dtype) as model:
            yield (model, parallel_state.get_pipeline_model_parallel_rank(),
                   parallel_state.get_tensor_model_parallel_rank())


def parameter_counts_by_rank(args, layout: ParallelLayout, dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """For every rank of the job, the parameters it contributes (see :func:`unique_parameter_count`).

    Each rank's stage is built on the meta device under a fake process group, so this runs
    for 72B at TP=8 x PP=4 on a laptop; the sum equals the Hugging Face model's count.
    """
    return [unique_parameter_count(model, tp_rank) for model, _, tp_rank in meta_stages(args, layout, dtype)]


def unique_parameter_count(model, tp_rank: int) -> int:
    """Parameters this rank contributes to the full model, so that the sum over ranks is exact.

    Shards count on every TP rank and replicated tensors on TP rank 0 only (the HF mapping says
    which is which), the last stage's copy of tied embeddings not at all, vocab padding never.
    """
    from .hf_mapping import Replicated, VocabSplit, iter_model_mappings

    args, total = model.args, 0
    for name, p, mapping in iter_model_mappings(model, args, model.padded_vocab_size, model.layer_offset):
        if args.tie_word_embeddings and name.endswith("output_layer.weight"):
            continue
        if isinstance(mapping, Replicated) and tp_rank != 0:
            continue
        n = p.numel()
        if isinstance(mapping, VocabSplit):
            rows = p.shape[0]
            real = max(0, min(rows, args.vocab_size - rows * tp_rank))
            n = real * p.shape[1]
        total += n
    return total
