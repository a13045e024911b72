"""Packed (THD) and padded batches: the one label shift, and loss sums for global normalisation."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "dr-grpo")
IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *,
                 attention_mask: Optional[torch.Tensor] = None, target_mask: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned to rows: row t predicts token t+1 of *its own* sequence, else ``ignore_index``.

    ``input_ids`` is packed tokens ``[T]`` / ``[1, T]`` with ``cu_seqlens`` (the last row of each
    sequence gets no label, never the next sequence's first token; rows past ``cu_seqlens[-1]``
    are padding), or, without them, one sequence ``[T]`` or a batch ``[B, S]`` whose rows are
    shifted each on its own, with ``attention_mask`` marking real tokens (a row gets a label only
    if it and its next token are both real, so neither right nor left padding becomes a label).
    ``target_mask`` (shape of ``input_ids``) marks the tokens worth predicting, e.g. assistant
    replies; other tokens are never labels. The labels have the shape of ``input_ids`` and their
    loss mask is ``labels != ignore_index``. This is the project's one label shift.
    """
    for name, t in (("attention_mask", attention_mask), ("target_mask", target_mask)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, got {list(t.shape)}")
    if cu_seqlens is None:
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be [T] or [B, S], got {list(input_ids.shape)}")
        ids = input_ids.reshape(-1, input_ids.shape[-1])
        valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask.reshape(ids.shape).bool()
            valid = real[:, :-1] & real[:, 1:]
    else:
        if input_ids.dim() > 2 or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
            raise ValueError(f"packed input_ids with cu_seqlens must be [T] or [1, T], got {list(input_ids.shape)}")
        if attention_mask is not None:
            raise ValueError("packed input_ids take cu_seqlens, not an attention_mask")
        ids = input_ids.reshape(1, -1)
        seq = sequence_index(cu_seqlens, ids.shape[1])
        valid = ((seq[:-1] == seq[1:]) & (seq[:-1] < cu_seqlens.numel() - 1))[None]
    if target_mask is not None:
        valid = valid & target_mask.reshape(ids.shape)[:, 1:].bool()
    labels = torch.full_like(ids, ignore_index)
    labels[:, :-1] = torch.where(valid, ids[:, 1:], ignore_index)
    return labels.reshape(input_ids.shape)


def sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence of each of ``total`` packed rows, in ``[0, n)``; ``n`` for rows past ``cu_seqlens[-1]``.

    ``cu_seqlens`` must rise from 0 to at most ``total`` (checked without a host sync on a GPU).
    """
    from .. import platform

    cu = cu_seqlens.long()
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of sequence boundaries, got shape {list(cu.shape)}")
    platform.check((cu[0] == 0) & (cu[1:] >= cu[:-1]).all() & (cu[-1] <= total),
                   f"cu_seqlens must rise from 0 to at most the {total} packed rows")
    rows = torch.arange(total, device=cu.device)
    return torch.bucketize(rows, cu[1:], right=True)


def row_sequences(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each (flattened) row's sequence and how many sequences: packed rows split by
    ``cu_seqlens`` (rows past its end in none: index ``n``), else the rows of a ``[B, S]`` batch
    (a 1-D batch is one sequence)."""
    if cu_seqlens is not None:
        if labels.dim() > 2 or (labels.dim() == 2 and labels.shape[0] != 1):
            raise ValueError(f"packed labels with cu_seqlens must be [T] or [1, T], got {list(labels.shape)}")
        return sequence_index(cu_seqlens.to(labels.device), labels.numel()), cu_seqlens.numel() - 1
    rows = labels if labels.dim() == 2 else labels.reshape(1, -1)
    return torch.arange(rows.shape[0], device=labels.device).repeat_interleave(rows.shape[1]), rows.shape[0]


def sequence_means(values: torch.Tensor, mask: torch.Tensor, sequence: torch.Tensor, num_sequences: int,
                   group=None) -> torch.Tensor:
    """Each row's sequence mean of ``values`` over the sequence's ``mask``-ed rows (fp32, no
    gradient): ``[rows]``. ``sequence``: each row's sequence in ``[0, num_sequences]`` (the last
    one: rows in no sequence). Under ``group`` (context parallelism: every rank holds a share of
    each sequence, the same sequences in the same order) the sums run over the group."""
    keep = mask.bool()
    sums = torch.zeros(2, num_sequences + 1, dtype=torch.float64, device=values.device)
    sums[0].index_add_(0, sequence, torch.where(keep, values.detach().double(), 0.0))
    sums[1].index_add_(0, sequence, keep.double())
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    return (sums[0] / sums[1].clamp(min=1))[sequence].float()


class LossSum(NamedTuple):
    """A loss as numerator and denominator, to be summed over micro-batches and data-parallel
    ranks before dividing (megatron-core's ``calculate_per_token_loss`` pattern): only then is
    the result the global batch's objective, whatever the split."""

    total: torch.Tensor
    count: torch.Tensor

    def value(self) -> torch.Tensor:
        """``total / count`` of this part alone (the global value once both are reduced)."""
        return self.total / self.count.clamp(min=1)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, *, mode: str = "token-mean",
                   cu_seqlens: Optional[torch.Tensor] = None,
                   max_response_length: Optional[int] = None,
                   sequence_tokens: Optional[torch.Tensor] = None,
                   count_sequences: bool = True) -> LossSum:
    """Per-token losses of one micro-batch -> ``LossSum(total, count)`` (fp32 scalars).

    Sum ``total`` and ``count`` over every micro-batch and data-parallel rank of the (mini-)batch,
    then divide: ``token-mean`` is the mean over all unmasked tokens; ``seq-mean-token-mean``
    the mean over sequences (with any unmasked token) of their token means; ``dr-grpo`` the
    token sum over (sequences x ``max_response_length``), Dr.GRPO's constant normaliser.

    Sequences: packed ``[T]`` / ``[1, T]`` rows split by ``cu_seqlens`` (rows past its end are
    padding, in no sequence), or without it each row of a ``[B, S]`` batch (a 1-D input is one
    sequence). Dr.GRPO counts every sequence given, empty or fully masked ones too. No host
    synchronisation.

    When each sequence is split over ranks (context parallelism), every rank passes its share
    with ``sequence_tokens`` (each whole sequence's unmasked tokens, the per-sequence means'
    denominators) and exactly one rank ``count_sequences``: the sums over ranks are then the
    whole batch's.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    if mode == "dr-grpo" and max_response_length is None:
        raise ValueError("mode 'dr-grpo' needs max_response_length (the generation budget)")
    if mask.shape != per_token.shape:
        raise ValueError(f"mask must have the shape of the per-token loss {list(per_token.shape)}, "
                         f"got {list(mask.shape)}")
    m = mask.float()
    masked = per_token.float() * m
    if mode == "token-mean":
        return LossSum(masked.sum(), m.sum())
    device = per_token.device
    if cu_seqlens is not None:
        if per_token.dim() > 2 or (per_token.dim() == 2 and per_token.shape[0] != 1):
            raise ValueError(f"packed losses with cu_seqlens must be [T] or [1, T], got {list(per_token.shape)}")
        n_seq = cu_seqlens.numel() - 1
        seq = sequence_index(cu_seqlens.to(device), per_token.numel())
    else:
        rows = per_token if per_token.dim() == 2 else per_token.reshape(1, -1)
        n_seq = rows.shape[0]
        seq = torch.arange(n_seq, device=device).repeat_interleave(rows.shape[1])
    sums = torch.zeros(n_seq + 1, device=device).index_add_(0, seq, masked.reshape(-1))[:n_seq]
    counted = 1.0 if count_sequences else 0.0
    if mode == "dr-grpo":
        return LossSum(sums.sum(), torch.tensor(counted * n_seq * max_response_length, device=device))
    if sequence_tokens is not None:
        if sequence_tokens.shape != (n_seq,):
            raise ValueError(f"sequence_tokens must hold one count per sequence ({n_seq}), "
                             f"got {list(sequence_tokens.shape)}")
        counts = sequence_tokens.to(device=device, dtype=torch.float32)
    else:
        counts = torch.zeros(n_seq + 1, device=device).index_add_(0, seq, m.reshape(-1))[:n_seq]
    has = counts > 0
    return LossSum(torch.where(has, sums / counts.clamp(min=1), 0.0).sum(), has.float().sum() * counted)
