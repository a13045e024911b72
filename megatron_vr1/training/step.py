"""One optimizer step: forward and backward over this rank's micro-batches through megatron-core's
pipeline schedule, then the optimizer and the learning-rate schedule.

The objective gives, per micro-batch on the last pipeline stage, the summed loss, the number of
tokens it covers and sums to report. megatron-core adds up the token counts, all-reduces them
over data-parallel ranks and divides the gradients by the total (``calculate_per_token_loss``),
so the step optimises the global batch's per-token mean; the reported values are normalised the
same way. Under context parallelism each rank returns its share's sums and megatron-core adds
them over data- and context-parallel ranks alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import platform
from ..data.batch import Batch


class Objective(Protocol):
    """What a trainer optimises: the model inputs it needs and its loss on one micro-batch."""

    with_labels: bool  # the model returns per-token cross-entropy (else vocab-parallel logits)
    sum_names: tuple[str, ...]  # the sums it reports besides the loss, in order

    def __call__(self, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """``(loss summed over tokens, tokens, [summed values to report])`` of one micro-batch."""


class CrossEntropy:
    """Next-token cross-entropy on the loss mask (assistant replies): supervised fine-tuning."""

    with_labels = True
    sum_names = ()

    def __call__(self, batch: Batch, output: torch.Tensor):
        mask = batch.loss_mask
        loss = (output.float() * mask).sum()
        return loss, mask.sum(), []


@dataclass
class StepResult:
    loss: float  # the global batch's per-token loss
    tokens: int  # loss tokens of the global batch
    sums: dict = field(default_factory=dict)  # the objective's reported sums, over the global batch
    grad_norm: float | None = None
    lr: float = 0.0
    updated: bool = True  # False when the optimizer skipped the step (non-finite gradients)
    times: dict = field(default_factory=dict)  # seconds: forward_backward, optimizer


def run_micro_batches(model, batches: Sequence[Batch], objective: Objective, *,
                      forward_only: bool = False) -> torch.Tensor:
    """Forward (and backward) of this rank's micro-batches: ``[loss_sum, tokens, *objective sums]``
    over the global batch (summed over data- and context-parallel ranks), on every rank."""
    stats: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(**batch.model_inputs(with_labels=objective.with_labels))

        def loss_func(out):
            loss, tokens, sums = objective(batch, out)
            stats.append(torch.stack([loss.detach().float(), tokens.float(), *(torch.as_tensor(x).float()
                                                                               for x in sums)]))
            return loss, tokens.int(), {}
        return output, loss_func

    device = next(model.parameters()).device
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=max(b.input_ids.shape[1] for b in batches), micro_batch_size=1, forward_only=forward_only)
    # the stats live on the last pipeline stage: sum them there, over DP (and the context-parallel
    # ranks' shares of each micro-batch), then send them to every stage
    total = torch.stack(stats).sum(0) if stats else torch.zeros(2 + len(objective.sum_names), device=device)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    pp = ps.get_pipeline_model_parallel_group()
    dist.broadcast(total, src=dist.get_process_group_ranks(pp)[-1], group=pp)
    return total


def train_step(model, optimizer, scheduler, batches: Sequence[Batch], objective: Objective) -> StepResult:
    """One optimizer step over this rank's micro-batches (every rank passes the same number)."""
    start = time.perf_counter()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    totals = run_micro_batches(model, batches, objective)
    platform.synchronize()
    middle = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
    if totals[1] > 0:
        updated, grad_norm, _ = optimizer.step()
    else:  # nothing to learn from anywhere (e.g. every group dropped): Adam's moments must not move the weights
        updated, grad_norm = False, None
    if updated:
        scheduler.step(increment=1)
    platform.synchronize()
    times = {"forward_backward": middle - start, "optimizer": time.perf_counter() - middle}
    loss_sum, tokens, *sums = totals.tolist()
    return StepResult(loss=loss_sum / max(tokens, 1), tokens=int(tokens), sums=dict(zip(objective.sum_names, sums)),
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      lr=lr, updated=bool(updated), times=times)
