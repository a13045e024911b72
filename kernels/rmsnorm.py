"""RMSNorm with Qwen's numerics in two Triton launches per direction-step.

    y = w * cast(x * rsqrt(mean(x^2) + eps))     (the statistics in fp32, cast to x's dtype before w)

forward   one program per row: the row's 1/rms (saved, fp32) and y;
backward  one program per block of rows: dx = rstd * (gw - x_hat * mean(gw * x_hat)) with
          gw = g * w and x_hat = x * rstd, and that block's partial dw = sum(g * x_hat) in fp32;
          the partials are summed in torch (one small reduction) and cast to w's dtype.
The unfused torch module takes six launches forward and about ten backward, each a full pass
over the activations; these take one and one (plus the reduction of ``[blocks, H]``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16  # backward: rows whose dw one program accumulates before writing its partial


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    h = (xf * rstd).to(x.dtype).to(tl.float32)  # Qwen casts back to the input dtype before the weight
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (w * h).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, H,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(ROWS):
        row = block * ROWS + i
        if row < rows:
            x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0)
            g = tl.load(g_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x.to(tl.float32) * rstd
            gw = g * w
            dx = rstd * (gw - x_hat * (tl.sum(gw * x_hat, 0) / H))
            tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            dw += g * x_hat.to(x.dtype).to(tl.float32)
    tl.store(dw_partial_ptr + block * H + cols, dw, mask=inside)


def _launch_config(hidden: int, itemsize: int) -> tuple[int, int]:
    """(row block, warps): one 16-byte vector per thread and row tensor where 32 warps cover the
    row, which keeps the backward's five live row vectors under 64 registers (compile_check)."""
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // (32 * (16 // itemsize)), 1), 32)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape, hidden = x.shape, x.shape[-1]
        x2 = x.reshape(-1, hidden).contiguous()
        rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _launch_config(hidden, x2.element_size())
        if rows:
            _rms_norm_forward_kernel[(rows,)](x2, weight, y, rstd, hidden, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, hidden = x2.shape
        g2 = g.reshape(-1, hidden).contiguous()
        dx = torch.empty_like(x2)
        programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        partial = torch.empty(programs, hidden, dtype=torch.float32, device=x2.device)
        block, warps = _launch_config(hidden, x2.element_size())
        if rows:
            _rms_norm_backward_kernel[(programs,)](x2, weight, g2, rstd, dx, partial, rows, hidden,
                                                   ROWS=ROWS_PER_PROGRAM, BLOCK=block, num_warps=warps)
        dw = partial.sum(0).to(weight.dtype)
        return dx.reshape(g.shape), dw, None
