"""Rotary position embedding in one Triton launch per tensor and direction.

    y = t * cos(f) + rotate_half(t) * sin(f)     over the first ``rot_dim`` channels; the rest pass

``t`` is ``[S, B, H, D]`` (megatron-core's sequence-first layout) or packed ``[T, H, D]``, ``f``
one fp32 angle row per position, ``[S, 1, 1, rot_dim]`` (M-RoPE's rows, or the ViT's 2-D rows,
are per position already). The unfused path takes a cos, a sin, two casts, a slice, a negation,
two concatenations, two products and a sum, each a pass over the tensor, and as many again
backward; here the angles' cos and sin are computed in registers, and the backward is the same
kernel with the rotation transposed (``rotate_half`` is antisymmetric). Like megatron-core's,
cos and sin are cast to the tensor's dtype before they multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS_PER_PROGRAM = 16  # heads (x sequences) of one position per program
NUM_WARPS = 8


@triton.jit
def _rope_kernel(t_ptr, f_ptr, out_ptr, rows_per_position, D, HALF, BACKWARD: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    half = tl.arange(0, BLOCK_HALF)
    cols = half[None, :]
    in_rows = rows < rows_per_position
    in_half = cols < HALF
    # one angle row for the position: its cos and sin once, broadcast over the rows
    f1 = tl.load(f_ptr + pos * 2 * HALF + half, mask=half < HALF, other=0.0)
    f2 = tl.load(f_ptr + pos * 2 * HALF + HALF + half, mask=half < HALF, other=0.0)
    base = (pos * rows_per_position + rows) * D
    x1 = tl.load(t_ptr + base + cols, mask=in_rows & in_half, other=0.0)
    x2 = tl.load(t_ptr + base + HALF + cols, mask=in_rows & in_half, other=0.0)
    dtype = x1.dtype
    c1 = tl.cos(f1).to(dtype).to(tl.float32)[None, :]
    s1 = tl.sin(f1).to(dtype).to(tl.float32)[None, :]
    c2 = tl.cos(f2).to(dtype).to(tl.float32)[None, :]
    s2 = tl.sin(f2).to(dtype).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if BACKWARD:  # d t = g * cos + rotate_half^T(g * sin), rotate_half^T = -rotate_half
        y1 = a * c1 + b * s2
        y2 = b * c2 - a * s1
    else:
        y1 = a * c1 - b * s1
        y2 = b * c2 + a * s2
    tl.store(out_ptr + base + cols, y1.to(dtype), mask=in_rows & in_half)
    tl.store(out_ptr + base + HALF + cols, y2.to(dtype), mask=in_rows & in_half)
    if BLOCK_PASS > 0:  # channels past rot_dim pass through (and so do their gradients)
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        keep = in_rows & (rest < D)
        tl.store(out_ptr + base + rest, tl.load(t_ptr + base + rest, mask=keep, other=0.0), mask=keep)


def _launch(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    """``t`` as ``[positions, rows, D]``, ``freqs`` as ``[positions, rot_dim]`` fp32."""
    positions, rows, d = t.shape
    half = freqs.shape[-1] // 2
    out = torch.empty_like(t)
    if t.numel():
        block_pass = triton.next_power_of_2(d - 2 * half) if d > 2 * half else 0
        block_rows = min(MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(rows))
        grid = (positions, triton.cdiv(rows, block_rows))
        _rope_kernel[grid](t, freqs, out, rows, d, half, BACKWARD=backward, BLOCK_ROWS=block_rows,
                           BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=block_pass, num_warps=NUM_WARPS)
    return out


def positions_of(t: torch.Tensor, freqs: torch.Tensor) -> int | None:
    """How many angle rows ``freqs`` gives ``t`` (``[S, B, H, D]`` or ``[T, H, D]``): one per
    position (``[S, 1, 1, r]``) or per position and sequence (``[S, B, 1, r]``); None for any other
    layout, which this kernel does not take."""
    if freqs.dim() != 4 or freqs.shape[2] != 1 or freqs.shape[0] != t.shape[0] or freqs.shape[-1] % 2:
        return None
    if freqs.shape[-1] > t.shape[-1]:
        return None
    if freqs.shape[1] == 1:
        return freqs.shape[0]
    return freqs.shape[0] * freqs.shape[1] if t.dim() == 4 and freqs.shape[1] == t.shape[1] else None


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        positions = positions_of(t, freqs)
        rows = t.numel() // (positions * t.shape[-1]) if positions else 0
        angles = freqs.reshape(positions, freqs.shape[-1]).float().contiguous()
        ctx.save_for_backward(angles)
        ctx.shape = t.shape
        return _launch(t.contiguous().view(positions, rows, t.shape[-1]), angles, backward=False).view(t.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (angles,) = ctx.saved_tensors
        shape = ctx.shape
        g3 = g.contiguous().view(angles.shape[0], -1, shape[-1])
        return _launch(g3, angles, backward=True).view(shape), None
