"""The pieces of a GRPO step between rollout and optimizer: training samples from completions,
mini-batches (split anew for every PPO epoch, the old and reference log-probs following their
tokens), and the objectives megatron-core's pipeline schedule runs (log-prob capture for the old
and reference policies, the clipped GRPO loss with k3 KL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import platform
from ..data.batch import Batch, packed_batch
from ..data.packing import pack_balanced
from ..data.template import Sample
from .correction import ENGINE as ENGINE_LOGPROBS
from ..kernels.packed import row_sequences, sequence_means
from ..kernels import aggregate_loss, grpo_loss, token_entropy, token_logprobs


def response_sample(prompt: Sample, response_ids: Sequence[int]) -> Sample:
    """Prompt + response as one training sample; the loss mask is on the response. Response tokens
    are text, so their 3-D positions continue from the prompt's largest, all three alike."""
    response = torch.tensor(list(response_ids), dtype=torch.long)
    start = int(prompt.position_ids.max()) + 1 if len(prompt) else 0
    positions = torch.arange(start, start + len(response)).expand(3, -1)
    return Sample(input_ids=torch.cat([prompt.input_ids, response]),
                  loss_mask=torch.cat([torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(response), dtype=torch.bool)]),
                  position_ids=torch.cat([prompt.position_ids, positions], dim=1),
                  pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)


@dataclass
class RolloutSequence:
    """One completion as a training sample, with its group-normalised advantage and, where the
    engine gives them, its tokens' log-probs as the engine sampled them."""

    sample: Sample
    advantage: float
    engine_logprobs: Optional[Sequence[float]] = None


def mini_batches(seqs: list[RolloutSequence], count: int, seed: int) -> list[list[int]]:
    """``count`` mini-batches of this rank's sequences, as indices into ``seqs`` in a seeded order
    (some may be empty). Each PPO epoch takes its own seed, hence its own split."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    return [[int(i) for i in part] for part in np.array_split(order, count)]


SEQUENCE = "sequence"  # extras key: 1 + the index of each token's sequence in the step's list (0 on padding)


def micro_batches(seqs: list[RolloutSequence], args, *, max_tokens: int, pad_to: int, pad_id: int,
                  group=None, sequence_multiple: int = 1, shard: Optional[Callable[[Batch], Batch]] = None,
                  indices: Optional[Sequence[int]] = None) -> list[Batch]:
    """Packed micro-batches of one mini-batch (``seqs``, or ``seqs[i] for i in indices``) with
    per-token advantages and sequence indices attached; every rank of ``group`` (data parallel)
    gets the same number, padded with fully masked ones. ``shard`` (context parallelism) turns
    each whole micro-batch into this rank's share."""
    ids = list(range(len(seqs))) if indices is None else list(indices)
    bins = pack_balanced([len(seqs[i].sample) for i in ids], max_tokens, 1)[0] if ids else []
    count = torch.tensor([len(bins)], device=platform.device())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    bins = bins + [[] for _ in range(int(count) - len(bins))]
    batches = []
    for b in ([ids[k] for k in sorted(b)] for b in bins):  # sequences in their given order within a micro-batch
        batch = packed_batch([seqs[i].sample for i in b], args, pad_to_multiple_of=pad_to,
                             sequence_multiple=sequence_multiple, pad_id=pad_id)
        batch.extras["advantages"] = batch.per_token(torch.tensor([seqs[i].advantage for i in b], dtype=torch.float32))
        batch.extras[SEQUENCE] = batch.per_token(torch.tensor([i + 1 for i in b], dtype=torch.long))
        if b and all(seqs[i].engine_logprobs is not None for i in b):
            batch.extras[ENGINE_LOGPROBS] = _on_loss_tokens(batch, [seqs[i].engine_logprobs for i in b])
        batches.append(shard(batch) if shard is not None else batch)
    return batches


def _on_loss_tokens(batch: Batch, per_sequence: list) -> torch.Tensor:
    """Per-response values (one per response token, in order) on the batch's loss tokens: a
    sequence's loss rows are its response tokens, in order, sequences in batch order."""
    values = torch.tensor([v for seq in per_sequence for v in seq], dtype=torch.float32)
    mask = batch.loss_mask
    if values.numel() != int(mask.sum()):
        raise ValueError(f"{values.numel()} engine log-probs for {int(mask.sum())} loss tokens")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask.cpu()] = values
    return out.to(mask.device)


class TokenValues:
    """Per-token values of the loss tokens (old and reference log-probs), kept by sequence so that
    they follow their tokens into another packing: the next PPO epoch's mini-batches.

    A sequence's loss tokens on this rank come in the same order whatever micro-batch holds it
    (a context-parallel share's chunks depend on the sequence's own length only), so the k-th
    loss token of sequence ``s`` here is the k-th one there."""

    def __init__(self, batches: Sequence[Batch], keys: Sequence[str]) -> None:
        self.keys = [k for k in keys if batches and k in batches[0].extras]  # a stage without logits has none
        ids = torch.cat([b.extras[SEQUENCE][b.loss_mask] for b in batches]) if batches else torch.zeros(0)
        order = torch.argsort(ids, stable=True)
        self.ids = ids[order]
        self.values = {k: torch.cat([b.extras[k][b.loss_mask] for b in batches])[order] for k in self.keys}

    def attach(self, batch: Batch) -> Batch:
        """Put the kept values on ``batch``'s loss tokens (``batch.extras[key]``, 0 elsewhere)."""
        mask = batch.loss_mask
        ids = batch.extras[SEQUENCE][mask]
        order = torch.argsort(ids, stable=True)
        ranked = ids[order]
        within = torch.arange(len(ranked), device=ranked.device) - torch.searchsorted(ranked, ranked)
        source = torch.searchsorted(self.ids, ranked) + within
        for key in self.keys:
            taken = torch.empty(len(ids), dtype=self.values[key].dtype, device=ranked.device)
            taken[order] = self.values[key][source]
            out = torch.zeros(mask.shape, dtype=taken.dtype, device=taken.device)
            out[mask] = taken
            batch.extras[key] = out
        return batch


class CaptureLogprobs:
    """A forward-only objective that stores each micro-batch's token log-probs in
    ``batch.extras[key]`` (on the last pipeline stage, where the logits are)."""

    with_labels = False
    sum_names = ()

    def __init__(self, key: str, temperature: float) -> None:
        self.key, self.temperature = key, temperature

    def __call__(self, batch: Batch, logits: torch.Tensor):
        mask = batch.loss_mask
        batch.extras[self.key] = token_logprobs(logits.detach(), batch.labels, mask=mask, temperature=self.temperature,
                                                tp_group=_tp_group())
        return logits.new_zeros(()), mask.sum(), []


@dataclass
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0
    kl_beta: float = 1e-2
    kl_log_ratio_max: float = 20.0
    kl_max: Optional[float] = 10.0  # k3 bound (verl's); None: unbounded
    aggregation: str = "token-mean"
    entropy: bool = True
    rollout_correction: Optional[str] = None  # null, token-tis, sequence-tis, token-mask (rl/correction.py)
    rollout_correction_cap: float = 2.0
    ratio: str = "token"  # token: PPO's per-token ratio; sequence: GSPO's (geometric mean over the response)
    sequence_clip_low: Optional[float] = None  # GSPO's clip range (None: its published 3e-4 and 4e-4)
    sequence_clip_high: Optional[float] = None
    mask_truncated: bool = False  # leave responses cut at the budget out of the loss (DAPO)


class GRPOObjective:
    """The clipped GRPO loss with k3 KL on one micro-batch (vocab-parallel under TP), aggregated
    as ``LossSum`` so megatron-core normalises it over the global mini-batch."""

    with_labels = False
    sum_names = ("response_tokens", "kl", "clipped", "entropy")

    def __init__(self, settings: LossSettings, *, temperature: float, max_response_tokens: int) -> None:
        self.s, self.temperature, self.max_response_tokens = settings, temperature, max_response_tokens

    def __call__(self, batch: Batch, logits: torch.Tensor):
        s, mask, tp = self.s, batch.loss_mask, _tp_group()
        old = batch.extras["old_logprobs"]
        ref = batch.extras.get("ref_logprobs", old)
        adv = batch.extras["advantages"]
        seq = s.ratio == "sequence"
        clip_low, clip_high = (s.sequence_clip_low, s.sequence_clip_high) if seq else (s.clip_low, s.clip_high)
        cp = _cp_group() if seq else None
        loss, logp, kl = grpo_loss(logits, batch.labels, old, ref, adv, mask, temperature=self.temperature,
                                   clip_low=clip_low, clip_high=clip_high, clip_ratio_c=None if seq else s.clip_ratio_c,
                                   kl_beta=s.kl_beta, kl_log_ratio_max=s.kl_log_ratio_max, kl_max=s.kl_max,
                                   tp_group=tp, rollout_weights=batch.extras.get("rollout_weights"), ratio=s.ratio,
                                   cu_seqlens=batch.cu_seqlens if seq else None, cp_group=cp)
        whole = batch.context  # a context-parallel share: sequences are normalised and counted as wholes
        part = aggregate_loss(loss, mask, mode=s.aggregation, cu_seqlens=batch.cu_seqlens,
                              max_response_length=self.max_response_tokens,
                              sequence_tokens=None if whole is None else whole.sequence_loss_tokens,
                              count_sequences=whole is None or whole.rank == 0)
        with torch.no_grad():
            log_ratio = logp.detach() - old
            if seq:  # the sequence's ratio on each of its tokens
                sequence, n = row_sequences(batch.labels, batch.cu_seqlens)
                log_ratio = sequence_means(log_ratio.reshape(-1), mask.reshape(-1), sequence, n, cp).view_as(old)
            ratio = torch.exp(log_ratio)
            clipped = (((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))) & mask
            entropy = (token_entropy(logits.detach(), temperature=self.temperature, tp_group=tp) * mask).sum() \
                if s.entropy else logits.new_zeros(())
            kl_sum = (kl * mask).sum() if "ref_logprobs" in batch.extras else logits.new_zeros(())
        return part.total, part.count, [mask.sum(), kl_sum, clipped.sum(), entropy]


def _cp_group():
    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


def _tp_group():
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
