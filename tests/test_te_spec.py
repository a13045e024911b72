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


def _te_and_local(args, layout, state, dtype=torch.float32):
    from megatron_vr1.models.qwen2_5_vl import build_model, load_hf_state_dict

    models = {}
    for backend in ("local", "te"):
        model = build_model(args, layout, backend=backend, dtype=dtype).cuda().eval()
        load_hf_state_dict(model, state, args, padded_vocab=model.padded_vocab_size, tp_rank=0, tp_size=1,
                           layer_offset=model.layer_offset)
        models[backend] = model
    return models


def test_te_refuses_padded_batches_and_matches_local_on_packed_ones(model_parallel_1):
    """Under TE the LM layers' causal mask type ignores a padding mask: a padded batch is refused,
    a packed (THD) one agrees with the local spec."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, packed_position_ids
    from tiny import hf_model, make_case, tiny_hf_config

    cfg = tiny_hf_config()
    args = Qwen25VLArgs.from_hf_config(cfg)
    models = _te_and_local(args, ParallelLayout(make_vocab_size_divisible_by=16), hf_model(cfg).state_dict())
    case = make_case("two_images")
    ids = case["input_ids"]
    with pytest.raises(ValueError, match="ignores a padding mask"):
        models["te"](input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(),
                     pixel_values=case["pixel_values"].cuda(), image_grid_thw=case["image_grid_thw"])
    cases = [make_case("one_image", seed=1), make_case("no_image", seed=2), case]
    seqs = [c["input_ids"][0] for c in cases]
    grid = torch.cat([c["image_grid_thw"] for c in cases if "image_grid_thw" in c])
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int().cuda()
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    kwargs = dict(input_ids=torch.cat(seqs).view(1, -1).cuda(),
                  position_ids=packed_position_ids(seqs, grid, args).cuda(),
                  pixel_values=torch.cat([c["pixel_values"] for c in cases if "pixel_values" in c]).cuda(),
                  image_grid_thw=grid, packed_seq_params=packed)
    with torch.no_grad():
        out = {k: m(**kwargs)[..., : args.vocab_size].float() for k, m in models.items()}
    assert (out["te"] - out["local"]).abs().max().item() <= 1e-3 * out["local"].abs().max().item()


def test_te_model_loads_a_converted_checkpoint(tmp_path, model_parallel_1):
    """The converter writes local-spec layers (no TE ``_extra_state``); a TE-built model loads it
    and gives transformers' logits."""
    from megatron_vr1.checkpoint import hf_to_mcore, load_model
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model
    from tiny import hf_logits, hf_model, make_case, tiny_hf_config

    cfg = tiny_hf_config()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", dtype="fp32")
    args = Qwen25VLArgs.from_hf_config(cfg)
    model = build_model(args, ParallelLayout(), backend="te").cuda().eval()
    load_model(model, tmp_path / "mcore")
    case = make_case("two_images")
    with torch.no_grad():
        ours = model(**{k: v.cuda() for k, v in case.items()})[..., : args.vocab_size].float().cpu()
    ref = hf_logits(hf, case)
    assert (ours - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
