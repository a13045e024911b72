"""Position bookkeeping of Qwen2.5-VL: 3-D M-RoPE ids for the LM, windows and 2-D rotary for the ViT.

Everything here is plain integer work on ``input_ids`` and ``grid_thw`` (no weights), so the data
pipeline can precompute it and the model can recompute it on any pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .args import Qwen25VLArgs, VisionArgs


class ImageTokenError(ValueError):
    """Image placeholder tokens disagree with the image grids."""


def image_token_counts(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """LM tokens per image: ``t * h * w / merge**2``."""
    return [int(t * h * w) // merge_size**2 for t, h, w in grid_thw.tolist()]


def _image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, tok in enumerate(ids):
        if tok == image_token_id and start is None:
            start = i
        elif tok != image_token_id and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    args: Qwen25VLArgs,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids ``[3, B, S]`` and per-sample deltas ``[B, 1]`` (``max_pos + 1 - len``).

    Text tokens advance all three ids together; an image of merged grid ``(t, h, w)`` that starts
    at position ``p`` gets ids ``(p + t_i, p + h_i, p + w_i)`` and the text after it starts at
    ``p + max(h, w)``. Each contiguous run of image tokens is one image, taken in order from
    ``image_grid_thw``. Padding (``attention_mask == 0``) gets position 1, as transformers does.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if (input_ids == args.video_token_id).any():
        raise ImageTokenError("video tokens found in input_ids: video inputs are not supported")
    merge = args.vision.spatial_merge_size
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    b, s = input_ids.shape
    position_ids = torch.ones(3, b, s, dtype=torch.long, device=input_ids.device)
    deltas = []
    next_image = 0
    for row in range(b):
        keep = attention_mask[row].bool() if attention_mask is not None else torch.ones(s, dtype=torch.bool, device=input_ids.device)
        ids = input_ids[row][keep].tolist()
        pieces, pos, cursor = [], 0, 0
        for start, end in _image_runs(ids, args.image_token_id):
            if next_image >= len(grids):
                raise ImageTokenError(
                    f"sample {row}: image-token run at {start}..{end} but only {len(grids)} image grid(s) were given"
                )
            t, h, w = (int(x) for x in grids[next_image])
            gt, gh, gw = t, h // merge, w // merge
            if end - start != gt * gh * gw:
                raise ImageTokenError(
                    f"sample {row}: image {next_image} has {end - start} image tokens but its grid "
                    f"(t={t}, h={h}, w={w}) needs {gt * gh * gw} (t*h*w/{merge}^2)"
                )
            if start > cursor:
                pieces.append(torch.arange(start - cursor).expand(3, -1) + pos)
                pos += start - cursor
            ti = torch.arange(gt).view(-1, 1, 1).expand(gt, gh, gw).reshape(-1)
            hi = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw).reshape(-1)
            wi = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw).reshape(-1)
            pieces.append(torch.stack([ti, hi, wi]) + pos)
            pos += max(gh, gw)
            cursor = end
            next_image += 1
        if cursor < len(ids):
            pieces.append(torch.arange(len(ids) - cursor).expand(3, -1) + pos)
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, row, keep] = positions.to(position_ids.device)
        deltas.append((int(positions.max()) + 1 if positions.numel() else 0) - len(ids))
    if next_image != len(grids):
        raise ImageTokenError(f"{len(grids)} image grid(s) given but input_ids hold {next_image} image-token run(s)")
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def packed_position_ids(
    sequences: Sequence[torch.Tensor], image_grid_thw: torch.Tensor | None, args: Qwen25VLArgs
) -> torch.Tensor:
    """Position ids ``[3, 1, T]`` for sequences packed back to back (THD): each starts from 0."""
    counts = image_token_counts(image_grid_thw, args.vision.spatial_merge_size) if image_grid_thw is not None else []
    out, image = [], 0
    for seq in sequences:
        n = len(_image_runs(seq.tolist(), args.image_token_id))
        grids = image_grid_thw[image:image + n] if n else None
        if n and len(counts) < image + n:
            raise ImageTokenError(f"packed sequence {len(out)} needs image grids beyond the {len(counts)} given")
        pos, _ = get_rope_index(seq.view(1, -1), grids, args)
        out.append(pos)
        image += n
    if image != len(counts):
        raise ImageTokenError(f"{len(counts)} image grid(s) given but the packed sequences hold {image} image(s)")
    return torch.cat(out, dim=2)


@dataclass
class VisionLayout:
    """Where each patch goes in the ViT: window order, attention blocks, rotary angles.

    Computed on the host from the image grids (by the data pipeline, so that the ViT's forward
    never waits on the device), then moved with :meth:`to`. The sizes are plain ints for the
    same reason.
    """

    window_index: torch.Tensor  # [N / merge_unit] merged-unit order used inside the ViT
    reverse_index: torch.Tensor  # its inverse: window order back to raster order
    cu_window_seqlens: torch.Tensor  # int32 boundaries of windows (in patches, window order)
    cu_seqlens: torch.Tensor  # int32 boundaries of whole images / frames
    rotary_angles: torch.Tensor  # [N, head_dim] angles in window order (h half, w half, repeated)
    num_patches: int
    max_window: int  # longest window, in patches
    max_image: int  # largest image / frame, in patches
    window_bounds: tuple = ()  # cu_window_seqlens as host ints
    image_bounds: tuple = ()  # cu_seqlens as host ints

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VisionLayout":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return VisionLayout(move(self.window_index), move(self.reverse_index), move(self.cu_window_seqlens),
                            move(self.cu_seqlens), move(self.rotary_angles), self.num_patches, self.max_window,
                            self.max_image, self.window_bounds, self.image_bounds)


def vision_layout(grid_thw: torch.Tensor, vision: VisionArgs) -> VisionLayout:
    """The ViT layout of images with merged-patch grids ``grid_thw [n, 3]`` (``n`` may be 0)."""
    merge, unit = vision.spatial_merge_size, vision.merge_unit
    win = vision.window_merged_units
    dim = vision.head_dim // 2  # rotary dims per axis pair (h and w each get dim/2 angles)
    inv_freq = 1.0 / (vision.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    window_index, cu_window, cu_full, angles = [], [0], [0], []
    offset = 0
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw.tolist()):
        gh, gw = h // merge, w // merge
        # 2-D rotary angles of every patch, patches listed block-major over merge x merge units.
        hpos = torch.arange(h).view(gh, merge, 1, 1).expand(gh, merge, gw, merge).permute(0, 2, 1, 3).reshape(-1)
        wpos = torch.arange(w).view(1, 1, gw, merge).expand(gh, merge, gw, merge).permute(0, 2, 1, 3).reshape(-1)
        hw = torch.cat([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], dim=-1)
        angles.append(hw.repeat(t, 1))
        # Windows of win x win merged units, row-major over the (padded) grid, per frame.
        units = torch.arange(t * gh * gw).view(t, gh, gw)
        for frame in range(t):
            for r0 in range(0, gh, win):
                for c0 in range(0, gw, win):
                    block = units[frame, r0:r0 + win, c0:c0 + win].reshape(-1)
                    window_index.append(block + offset)
                    cu_window.append(cu_window[-1] + block.numel() * unit)
            cu_full.append(cu_full[-1] + h * w)
        offset += t * gh * gw
    index = torch.cat(window_index) if window_index else torch.zeros(0, dtype=torch.long)
    ang = torch.cat(angles) if angles else torch.zeros(0, dim)
    ang = ang.view(-1, unit, ang.shape[-1])[index].reshape(-1, ang.shape[-1])
    lengths = lambda cu: max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)  # noqa: E731
    return VisionLayout(
        window_index=index,
        reverse_index=torch.argsort(index),
        cu_window_seqlens=torch.tensor(cu_window, dtype=torch.int32),
        cu_seqlens=torch.tensor(cu_full, dtype=torch.int32),
        rotary_angles=torch.cat([ang, ang], dim=-1),
        num_patches=cu_full[-1],
        max_window=lengths(cu_window),
        max_image=lengths(cu_full),
        window_bounds=tuple(cu_window),
        image_bounds=tuple(cu_full),
    )
