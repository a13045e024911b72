"""Group-normalised advantages in one Triton launch: one program per group of rollouts."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_STD_CODES = {"unbiased": 0, "population": 1, None: 2}


@triton.jit
def _group_advantage_kernel(rewards_ptr, offsets_ptr, out_ptr, eps, STD_MODE: tl.constexpr,
                            BLOCK: tl.constexpr):
    group = tl.program_id(0)
    start = tl.load(offsets_ptr + group).to(tl.int64)
    end = tl.load(offsets_ptr + group + 1).to(tl.int64)
    n = end - start
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    nf = n.to(tl.float32)
    mean = tl.sum(r, 0) / nf
    centred = tl.where(valid, r - mean, 0.0)
    if STD_MODE == 2:  # Dr.GRPO: no std normalisation
        adv = centred
    else:
        sq = tl.sum(centred * centred, 0)
        if STD_MODE == 0:
            var = sq / tl.maximum(nf - 1.0, 1.0)  # a group of one has std 0, not NaN
        else:
            var = sq / nf
        adv = centred / (tl.sqrt(var) + eps)
    tl.store(out_ptr + idx, adv, mask=valid)


def group_advantages_triton(rewards: torch.Tensor, offsets: torch.Tensor, *, std: Optional[str] = "unbiased",
                            eps: float = 1e-6, max_group: int) -> torch.Tensor:
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    block = max(16, triton.next_power_of_2(max_group))
    _group_advantage_kernel[(len(offsets) - 1,)](rewards.contiguous(), offsets, out, eps,
                                                 STD_MODE=_STD_CODES[std], BLOCK=block)
    return out
