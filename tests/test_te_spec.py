"""The Transformer Engine spec builds the same model and agrees with the local spec (GPU only)."""

import pytest
import torch

from megatron_vr1 import platform

pytestmark = pytest.mark.skipif(
    not platform.has_transformer_engine(),
    reason="needs CUDA and transformer_engine (the `gpu` extra); this machine has "
    + ("no CUDA" if not torch.cuda.is_available() else "no transformer_engine"),
)


def test_te_spec_matches_local_spec_in_bf16(model_parallel_1):
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model, load_hf_state_dict
    from tiny import hf_model, make_case, tiny_hf_config

    cfg = tiny_hf_config()
    args = Qwen25VLArgs.from_hf_config(cfg)
    state = hf_model(cfg).state_dict()
    layout = ParallelLayout(make_vocab_size_divisible_by=16)
    outs = {}
    for backend in ("local", "te"):
        model = build_model(args, layout, backend=backend, dtype=torch.bfloat16).cuda().eval()
        names = dict(model.named_parameters())
        if backend == "te":
            assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names)
        load_hf_state_dict(model, state, args, padded_vocab=model.padded_vocab_size, tp_rank=0, tp_size=1,
                           layer_offset=model.layer_offset)
        batch = {k: v.cuda() for k, v in make_case("two_images").items()}
        with torch.no_grad():
            outs[backend] = model(**batch)[..., : args.vocab_size].float()
    scale = outs["local"].abs().max().item()
    assert (outs["te"] - outs["local"]).abs().max().item() <= 0.03 * scale
