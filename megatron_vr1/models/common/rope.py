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
"""

from __future__ import annotations

from megatron.core.models.common.embeddings import rope_utils

_original_thd = rope_utils._apply_rotary_pos_emb_thd


def _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved: bool = False,
                              multi_latent_attention: bool = False, mscale: float = 1.0, cp_group=None):
    if freqs.dim() == 4 and freqs.size(0) == t.size(0):
        # cu_seqlens spans every packed row, so the per-sequence offsets tile freqs exactly
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)
    return _original_thd(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                         multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)


def install() -> None:
    """Route megatron-core's unfused THD rotary through the sync-free shortcut (idempotent)."""
    rope_utils._apply_rotary_pos_emb_thd = _apply_rotary_pos_emb_thd
