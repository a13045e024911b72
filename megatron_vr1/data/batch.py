"""The micro-batch that data, model and loss kernels share.

A :class:`Batch` is built on the host from :class:`~.template.Sample` s, either packed back to
back (THD: ``[1, T]``, ``cu_seqlens``; how the trainers run) or padded row by row (``[B, S]``,
``attention_mask``). Everything that needs Python or the host is done here, once: labels (the
one label shift, :func:`megatron_vr1.kernels.shift_labels`), 3-D positions, where the image
tokens sit and the ViT's window layout. The model and the kernels then run without a host sync.

    batch = packed_batch(samples, args, pad_to_multiple_of=tp).to(device)
    logits = model(**batch.model_inputs())                     # [1, T, V/TP]
    loss, _, _ = grpo_loss(logits, batch.labels, ..., batch.loss_mask, tp_group=tp_group)
    part = aggregate_loss(loss, batch.loss_mask, cu_seqlens=batch.cu_seqlens)

Under context parallelism every rank builds the whole micro-batch with ``sequence_multiple=2 * cp``
and keeps its share: ``batch.context_shard(cp, cp_rank)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..kernels.packed import IGNORE_INDEX, shift_labels
from ..models.common.context_parallel import shard_rows
from ..models.qwen2_5_vl.args import Qwen25VLArgs
from ..models.qwen2_5_vl.positions import ImageTokenError, VisionLayout, vision_layout
from .template import Sample

_HOST_FIELDS = ("image_grid_thw",)  # metadata the host reads; never moved to the device


@dataclass(frozen=True)
class ContextShard:
    """What a context-parallel rank's share of a micro-batch knows of the whole."""

    size: int
    rank: int
    bounds: tuple  # the whole micro-batch's sequence boundaries, padding block included (attention's view)
    cu_seqlens: torch.Tensor  # int32: ``bounds`` as a tensor, on the batch's device
    sequence_loss_tokens: torch.Tensor  # [n] float: loss tokens of each sequence over every rank's share

    def to(self, device, non_blocking: bool = False) -> "ContextShard":
        return dataclasses.replace(self, cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
                                   sequence_loss_tokens=self.sequence_loss_tokens.to(device, non_blocking=non_blocking))


@dataclass
class Batch:
    """One micro-batch. Packed: ``B = 1``, ``cu_seqlens`` set; padded: ``attention_mask`` set."""

    input_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S]: row t's target (token t+1 of its own sequence) or IGNORE_INDEX
    loss_mask: torch.Tensor  # [B, S] bool: labels != IGNORE_INDEX
    position_ids: torch.Tensor  # [3, B, S] M-RoPE ids (padding: 0, 1, 2, ... per padding block)
    lengths: list[int] = field(default_factory=list)  # real tokens of each sequence, in order
    # packed: rows each sequence occupies (its tokens, then padding up to packed_batch's sequence_multiple)
    blocks: list[int] = field(default_factory=list)
    cu_seqlens: Optional[torch.Tensor] = None  # packed: int32 [n + 1] of blocks; rows past the last are padding
    attention_mask: Optional[torch.Tensor] = None  # padded: [B, S] 1 on real tokens
    pixel_values: Optional[torch.Tensor] = None  # [patches, 1176] or None without images
    image_grid_thw: Optional[torch.Tensor] = None  # [images, 3], on the host
    image_positions: Optional[torch.Tensor] = None  # flat (batch-major) indices of the image tokens
    vision: Optional[VisionLayout] = None  # the ViT's layout of these images
    extras: dict = field(default_factory=dict)  # per-token tensors [B, S] a trainer attaches (advantages, ...)
    image_feature_index: Optional[torch.Tensor] = None  # context shard: the ViT feature each image token takes
    context: Optional[ContextShard] = None  # set on a context-parallel rank's share (context_shard)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_sequences(self) -> int:
        """Real sequences (a padding block is not one)."""
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Real tokens, padding excluded."""
        return sum(self.lengths)

    def per_token(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """One value per sequence (e.g. its advantage) spread over its tokens: ``[B, S]``, 0 on padding."""
        if per_sequence.shape != (self.num_sequences,):
            raise ValueError(f"expected one value per sequence ({self.num_sequences}), got {list(per_sequence.shape)}")
        if self.context is not None:
            raise ValueError("per_token needs the whole micro-batch: attach per-token values before context_shard")
        out = torch.zeros(self.input_ids.shape, dtype=per_sequence.dtype, device=per_sequence.device)
        if self.packed:
            n, rows = self.num_sequences, sum(self.blocks)
            if self.cu_seqlens.device == per_sequence.device:  # on the device: no host copy, no sync
                blocks = (self.cu_seqlens[1:n + 1] - self.cu_seqlens[:n]).long()
            else:
                blocks = torch.tensor(self.blocks, dtype=torch.long).to(per_sequence.device)
            out[0, :rows] = per_sequence.repeat_interleave(blocks, output_size=rows)
            if rows > self.num_tokens:  # sequences padded for context parallelism: 0 on their padding
                out[0, :rows] *= self._real_rows().to(out.device, non_blocking=True)
            return out
        return torch.where(self.attention_mask.bool(), per_sequence[:, None], out)

    def _real_rows(self) -> torch.Tensor:
        """[rows of the blocks] bool on the host: True on each sequence's own tokens."""
        return torch.cat([torch.arange(b) < n for n, b in zip(self.lengths, self.blocks)]) if self.blocks \
            else torch.zeros(0, dtype=torch.bool)

    def sequence_bounds(self) -> list[int]:
        """Row boundaries of the sequences and, if any, of the padding block after them (its own
        sequence, so that attention never mixes it with real tokens)."""
        if not self.packed:
            raise ValueError("a padded [B, S] batch has no packed sequences")
        bounds = [0]
        for n in self.blocks:
            bounds.append(bounds[-1] + n)
        if self.input_ids.shape[1] > bounds[-1]:
            bounds.append(self.input_ids.shape[1])
        return bounds

    def packed_seq_params(self):
        """megatron-core's ``PackedSeqParams`` (THD) over :meth:`sequence_bounds`. A context shard's
        are the whole micro-batch's, as Transformer Engine's context-parallel attention takes them."""
        from ..models.common.attention import packed_seq_params

        if self.context is not None:
            bounds, cu = list(self.context.bounds), self.context.cu_seqlens
        else:  # the blocks' cu_seqlens, already on the device, and the padding block's end
            bounds, cu = self.sequence_bounds(), self.cu_seqlens
            if len(bounds) > cu.numel():
                cu = torch.cat([cu, cu.new_full((1,), bounds[-1])])
        return packed_seq_params(cu, bounds, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))

    def context_shard(self, size: int, rank: int) -> "Batch":
        """This context-parallel rank's share of a packed micro-batch, built on the host: two chunks
        of every sequence (``models.common.context_parallel``), per-token tensors and ``extras``
        alike; the images stay whole (every rank runs the ViT on them and keeps its tokens'
        features). Loss sums over the shares are the whole batch's."""
        if size == 1:
            return self
        if not self.packed or self.context is not None:
            raise ValueError("context_shard takes a whole packed micro-batch")
        bounds = self.sequence_bounds()
        rows = torch.tensor(shard_rows(bounds, size, rank), dtype=torch.long)
        take = lambda t: t.index_select(-1, rows.to(t.device))  # noqa: E731  (the token axis is last)
        n = self.num_sequences
        cu = torch.tensor([0] + self.blocks, dtype=torch.long).cumsum(0)
        seq_of_row = torch.bucketize(torch.arange(bounds[-1]), cu[1:], right=True)  # n on the padding block
        loss_tokens = torch.zeros(n + 1).index_add_(0, seq_of_row, self.loss_mask[0].cpu().float())[:n]
        real = torch.cat([self._real_rows(), torch.zeros(bounds[-1] - sum(self.blocks), dtype=torch.bool)])
        local_seq, local_real = seq_of_row[rows], real[rows]
        lengths = torch.zeros(n + 1, dtype=torch.long).index_add_(0, local_seq, local_real.long())[:n].tolist()
        feature_index = positions = None
        if self.image_positions is not None:
            feature = torch.full((bounds[-1],), -1, dtype=torch.long)
            feature[self.image_positions.cpu()] = torch.arange(self.image_positions.numel())
            local = feature[rows]
            positions = (local >= 0).nonzero()[:, 0]
            feature_index = local[positions]
        blocks = [b // size for b in self.blocks]
        return dataclasses.replace(
            self, input_ids=take(self.input_ids), labels=take(self.labels), loss_mask=take(self.loss_mask),
            position_ids=take(self.position_ids), lengths=lengths, blocks=blocks,
            cu_seqlens=torch.tensor([0] + blocks, dtype=torch.int64).cumsum(0).to(torch.int32),
            image_positions=positions, image_feature_index=feature_index,
            extras={k: take(v) for k, v in self.extras.items()},
            context=ContextShard(size, rank, tuple(bounds), torch.tensor(bounds, dtype=torch.int32), loss_tokens))

    def model_inputs(self, *, with_labels: bool = False) -> dict:
        """Keyword arguments of :class:`~megatron_vr1.models.qwen2_5_vl.Qwen25VLModel`'s forward."""
        kwargs = dict(input_ids=self.input_ids, position_ids=self.position_ids, pixel_values=self.pixel_values,
                      image_grid_thw=self.image_grid_thw, image_positions=self.image_positions,
                      vision_layout=self.vision)
        if self.image_feature_index is not None:
            kwargs["image_feature_index"] = self.image_feature_index
        if self.packed:
            kwargs["packed_seq_params"] = self.packed_seq_params()
        else:
            kwargs["attention_mask"] = self.attention_mask
        if with_labels:
            kwargs["labels"] = self.labels
        return kwargs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch with its tensors on ``device`` (host metadata stays where it is)."""
        def move(name, value):
            if isinstance(value, dict):
                return {k: move(k, v) for k, v in value.items()}
            if name in _HOST_FIELDS or value is None or not hasattr(value, "to"):
                return value
            return value.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, **{f.name: move(f.name, getattr(self, f.name))
                                            for f in dataclasses.fields(self)})

    def pin_memory(self) -> "Batch":
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this), for async copies."""
        def pin(value):
            if isinstance(value, dict):
                return {k: pin(v) for k, v in value.items()}
            if isinstance(value, torch.Tensor):
                return value.pin_memory()
            if isinstance(value, VisionLayout):
                return VisionLayout(*(pin(getattr(value, f.name)) for f in dataclasses.fields(value)))
            return value
        return dataclasses.replace(self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name not in _HOST_FIELDS})


def packed_batch(samples: Sequence[Sample], args: Optional[Qwen25VLArgs] = None, *, pad_to_multiple_of: int = 1,
                 sequence_multiple: int = 1, pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> Batch:
    """Samples back to back in one THD micro-batch ``[1, T]``, each with its own positions.

    Each sample's block is padded to a multiple of ``sequence_multiple`` (``2 x`` the context
    parallel size, whose ranks take equal chunks of every sequence) and ``T`` up to a multiple of
    ``pad_to_multiple_of`` (``sequence_multiple`` x tensor parallel size under sequence
    parallelism) with a padding block; padding is ``pad_id`` tokens that are never labels. No
    samples give a fully masked batch of one padding block, so a rank with nothing to do runs the
    same schedule as the others. With ``args`` the image-token positions and the ViT layout are
    computed here, on the host.
    """
    for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("sequence_multiple", sequence_multiple)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if pad_to_multiple_of % sequence_multiple:
        raise ValueError(f"pad_to_multiple_of ({pad_to_multiple_of}) must be a multiple of sequence_multiple "
                         f"({sequence_multiple}): the padding block is split like a sequence")
    lengths = [len(s) for s in samples]
    blocks = [-(-n // sequence_multiple) * sequence_multiple for n in lengths]
    real = sum(blocks)
    total = max(-(-real // pad_to_multiple_of) * pad_to_multiple_of, pad_to_multiple_of if not real else 0)
    ids, targets, positions = [], [], []
    for s, block in zip(samples, blocks):
        ids.append(s.input_ids)
        targets.append(s.loss_mask.bool())
        positions.append(s.position_ids)
        tail = block - len(s)  # after the sequence's own tokens: causal attention keeps them out of its rows
        if tail:
            start = int(s.position_ids.max()) + 1 if len(s) else 0
            ids.append(torch.full((tail,), pad_id, dtype=torch.long))
            targets.append(torch.zeros(tail, dtype=torch.bool))
            positions.append(torch.arange(start, start + tail).expand(3, tail))
    pad = total - real
    ids = torch.cat(ids + [torch.full((pad,), pad_id, dtype=torch.long)])
    targets = torch.cat(targets + [torch.zeros(pad, dtype=torch.bool)])
    positions = torch.cat(positions + [torch.arange(pad).expand(3, pad)], dim=1)
    cu = torch.tensor([0] + blocks, dtype=torch.int64).cumsum(0).to(torch.int32)
    labels = shift_labels(ids[None], cu, target_mask=targets[None], ignore_index=ignore_index)
    batch = Batch(input_ids=ids[None], labels=labels, loss_mask=labels != ignore_index, position_ids=positions[:, None],
                  lengths=lengths, blocks=blocks, cu_seqlens=cu)
    return _with_images(batch, samples, args)


def collate_padded(samples: Sequence[Sample], pad_id: int, args: Optional[Qwen25VLArgs] = None, *,
                   side: str = "right", pad_to_multiple_of: int = 1, ignore_index: int = IGNORE_INDEX) -> Batch:
    """Samples as rows of a ``[B, S]`` batch padded on ``side`` (``right``, or ``left`` for
    generation), with the attention mask, labels and loss mask (padding is never a label) and
    position ids (1 on padding, as transformers has it)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    s = max(len(x) for x in samples)
    s = -(-s // pad_to_multiple_of) * pad_to_multiple_of
    b = len(samples)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    attn = torch.zeros(b, s, dtype=torch.long)
    targets = torch.zeros(b, s, dtype=torch.bool)
    pos = torch.ones(3, b, s, dtype=torch.long)
    for i, x in enumerate(samples):
        cols = slice(0, len(x)) if side == "right" else slice(s - len(x), s)
        ids[i, cols], attn[i, cols], targets[i, cols], pos[:, i, cols] = x.input_ids, 1, x.loss_mask, x.position_ids
    labels = shift_labels(ids, attention_mask=attn, target_mask=targets, ignore_index=ignore_index)
    batch = Batch(input_ids=ids, labels=labels, loss_mask=labels != ignore_index, position_ids=pos,
                  lengths=[len(x) for x in samples], attention_mask=attn)
    return _with_images(batch, samples, args)


def _with_images(batch: Batch, samples: Sequence[Sample], args: Optional[Qwen25VLArgs]) -> Batch:
    with_images = [s for s in samples if s.image_grid_thw.numel()]
    if with_images:
        batch.pixel_values = torch.cat([s.pixel_values for s in with_images])
        batch.image_grid_thw = torch.cat([s.image_grid_thw for s in with_images])
    if args is None:
        return batch
    merge = args.vision.merge_unit
    positions = (batch.input_ids == args.image_token_id).reshape(-1).nonzero()[:, 0]
    needed = int(batch.image_grid_thw.prod(-1).sum()) // merge if with_images else 0
    patches = batch.pixel_values.shape[0] if with_images else 0
    if positions.numel() != needed or patches != needed * merge:
        raise ImageTokenError(f"the batch holds {positions.numel()} image tokens and {patches} patches, but its "
                              f"image grids need {needed} tokens ({needed * merge} patches)")
    batch.image_positions = positions
    if with_images:
        batch.vision = vision_layout(batch.image_grid_thw, args.vision)
    return batch
