"""Rotary embedding on packed (THD) batches without host synchronisation.

megatron-core's unfused THD rotary path splits the packed tensor per sequence and reads each
sequence's offset with ``.item()``: one device synchronisation per sequence, per layer, for query
and key alike. The vision tower packs every attention window as its own sequence, so a 3B SFT step
on an H200 made about 46,000 such reads (``tools/bench_sft.py --profile-step``). This project's
models pass one frequency row per packed token (M-RoPE and the ViT's 2-D rotary are per token),
and then that path is exactly the whole tensor rotated by its own rows: :func:`install` takes that
shortcut and leaves every other case to megatron-core. Under context parallelism the rows are
this rank's (the model computes M-RoPE from this rank's positions), which megatron-core's path
would cut again per sequence.

The ``fused`` layer spec builds its attention from :class:`FusedRotarySelfAttention`, under whose
forward the rotation itself runs as one Triton launch per tensor and direction
(``kernels.rotary``) instead of megatron-core's dozen element-wise passes; any layout that kernel
does not take (interleaved pairs, MLA, a scale) still goes to megatron-core.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.attention import SelfAttention

from ...kernels.functional import rotary
from ...kernels.rope import positions_of

_original_thd = rope_utils._apply_rotary_pos_emb_thd
_original_bshd = rope_utils._apply_rotary_pos_emb_bshd
# the kernel backend while a FusedRotarySelfAttention runs its forward; None: megatron-core's path
_FUSED_BACKEND: contextvars.ContextVar = contextvars.ContextVar("megatron_vr1_fused_rotary", default=None)


def _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved: bool = False, multi_latent_attention: bool = False,
                               mscale: float = 1.0):
    backend = _FUSED_BACKEND.get()
    if (backend is not None and not rotary_interleaved and not multi_latent_attention and mscale == 1.0
            and positions_of(t, freqs) is not None):
        return rotary(t, freqs, backend=backend)
    return _original_bshd(t, freqs, rotary_interleaved=rotary_interleaved,
                          multi_latent_attention=multi_latent_attention, mscale=mscale)


def _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved: bool = False,
                              multi_latent_attention: bool = False, mscale: float = 1.0, cp_group=None):
    if freqs.dim() == 4 and freqs.size(0) == t.size(0):
        # cu_seqlens spans every packed row, so the per-sequence offsets tile freqs exactly
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)
    return _original_thd(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                         multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)


@contextlib.contextmanager
def fused_rotary(backend: str) -> Iterator[None]:
    """Within the block, rotations megatron-core applies run through ``kernels.rotary``."""
    token = _FUSED_BACKEND.set(backend)
    try:
        yield
    finally:
        _FUSED_BACKEND.reset(token)


class FusedRotarySelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` whose rotary embedding runs in one Triton launch per
    tensor and direction (on a GPU; ``kernel_backend`` "auto" runs the torch reference on CPU
    tensors, and tests set "triton" to run the kernel in the interpreter)."""

    kernel_backend = "auto"

    def forward(self, *args, **kwargs):
        with fused_rotary(self.kernel_backend):
            return super().forward(*args, **kwargs)


def install() -> None:
    """Route megatron-core's unfused rotary through the sync-free THD shortcut, and through the
    fused kernel under a :class:`FusedRotarySelfAttention` (idempotent)."""
    rope_utils._apply_rotary_pos_emb_thd = _apply_rotary_pos_emb_thd
    rope_utils._apply_rotary_pos_emb_bshd = _apply_rotary_pos_emb_bshd
