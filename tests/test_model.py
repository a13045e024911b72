"""Megatron Qwen2.5-VL vs transformers in one CPU process (TP=1, PP=1)."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vr1.models.qwen2_5_vl import (ImageTokenError, ParallelLayout, Qwen25VLArgs, build_model,
                                            load_hf_state_dict, packed_position_ids)
from tiny import IMAGE, hf_logits, hf_model, make_case, tiny_hf_config

TOL = 1e-4


def _pair(tied: bool):
    cfg = tiny_hf_config(tied=tied)
    args = Qwen25VLArgs.from_hf_config(cfg)
    hf = hf_model(cfg)
    model = build_model(args, ParallelLayout(make_vocab_size_divisible_by=16), backend="local").eval()
    load_hf_state_dict(model, hf.state_dict(), args, padded_vocab=model.padded_vocab_size,
                       tp_rank=0, tp_size=1, layer_offset=model.layer_offset)
    return args, hf, model


@pytest.fixture(scope="module")
def untied(model_parallel_1):
    return _pair(False)


@pytest.fixture(scope="module")
def tied(model_parallel_1):
    return _pair(True)


@pytest.mark.parametrize("case", ["no_image", "one_image", "two_images", "tall"])
def test_logits_match_transformers(untied, case):
    args, hf, model = untied
    batch = make_case(case)
    with torch.no_grad():
        ours = model(**batch)[..., : args.vocab_size]
    assert ours.shape == (1, batch["input_ids"].shape[1], args.vocab_size)
    assert (ours - hf_logits(hf, batch)).abs().max().item() <= TOL


def test_tied_embeddings_match_transformers(tied):
    args, hf, model = tied
    assert "language_model.output_layer.weight" not in dict(model.named_parameters())
    batch = make_case("two_images")
    with torch.no_grad():
        ours = model(**batch)[..., : args.vocab_size]
    assert (ours - hf_logits(hf, batch)).abs().max().item() <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(untied, side):
    """Two samples of different lengths, padded on either side, with an attention mask."""
    args, hf, model = untied
    a, b = make_case("two_images"), make_case("one_image", seed=5)
    s, sb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    pad = torch.zeros(1, s - sb, dtype=torch.long)
    row = [b["input_ids"], pad] if side == "right" else [pad, b["input_ids"]]
    ids = torch.cat([a["input_ids"], torch.cat(row, 1)])
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, sb:] = 0
    else:
        mask[1, : s - sb] = 0
    batch = dict(input_ids=ids, attention_mask=mask,
                 pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                 image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]))
    with torch.no_grad():
        ours = model(**batch)[..., : args.vocab_size]
    ref = hf_logits(hf, batch)
    keep = mask.bool()
    assert torch.isfinite(ours).all()
    assert (ours[keep] - ref[keep]).abs().max().item() <= TOL


def test_packed_batch_equals_sequences_alone(untied):
    args, _, model = untied
    cases = [make_case("one_image", seed=1), make_case("no_image", seed=2), make_case("two_images", seed=3)]
    seqs = [c["input_ids"][0] for c in cases]
    grid = torch.cat([c["image_grid_thw"] for c in cases if "image_grid_thw" in c])
    pixels = torch.cat([c["pixel_values"] for c in cases if "pixel_values" in c])
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    with torch.no_grad():
        out = model(input_ids=torch.cat(seqs).view(1, -1), position_ids=packed_position_ids(seqs, grid, args),
                    pixel_values=pixels, image_grid_thw=grid, packed_seq_params=packed)
        alone = torch.cat([model(**c) for c in cases], dim=1)
    assert out.shape == alone.shape
    assert (out - alone).abs().max().item() <= TOL


def test_image_tokens_must_match_pixels(untied):
    _, _, model = untied
    batch = make_case("one_image")
    ids = batch["input_ids"].clone()
    ids[0, ids[0].tolist().index(IMAGE)] = 7  # one image token fewer
    with pytest.raises(ImageTokenError, match="47 image tokens but its grid"):
        model(**dict(batch, input_ids=ids))
    with pytest.raises(ImageTokenError, match="only 0 image grid"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ImageTokenError, match="no pixel_values"):
        model(input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="pixel_values shape"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:-4]))


def test_gradients_flow_to_every_parameter(untied):
    args, _, model = untied
    model.train()
    try:
        model.zero_grad()
        model(**make_case("two_images")).float().pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing
    finally:
        model.eval()
        model.zero_grad()


def test_bf16_close_to_fp32(untied, model_parallel_1):
    args, hf, model = untied
    bf = build_model(args, ParallelLayout(make_vocab_size_divisible_by=16), backend="local",
                     dtype=torch.bfloat16).eval()
    bf.load_state_dict(model.state_dict())
    batch = make_case("one_image")
    with torch.no_grad():
        lo, hi = bf(**batch).float(), model(**batch)
    assert (lo - hi).abs().max().item() < 0.05 * hi.abs().max().item()


def test_sequence_parallel_needs_divisible_length(model_parallel_1):
    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    model = build_model(args, ParallelLayout(make_vocab_size_divisible_by=16), backend="local")
    model.config.sequence_parallel = True  # as a TP>1 layout would set it
    model.layout = ParallelLayout(tensor_parallel=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="multiple of tensor_parallel"):
        model(**make_case("no_image", multiple_of=1))


def test_labels_give_per_token_cross_entropy(untied):
    args, _, model = untied
    batch = make_case("one_image")
    labels = torch.randint(0, args.vocab_size, batch["input_ids"].shape)
    with torch.no_grad():
        logits = model(**batch)
        loss = model(**batch, labels=labels)
    ref = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    assert loss.shape == labels.shape
    assert (loss[0] - ref).abs().max().item() <= 1e-5


def test_fused_spec_gives_the_local_specs_logits_and_gradients(untied, model_parallel_1, monkeypatch):
    """backend=fused (Triton RMSNorm and rotary, run here in Triton's interpreter) loads the local
    model's state dict as it is and gives its logits and every parameter's gradient."""
    from megatron_vr1.kernels import rope as rope_kernel
    from megatron_vr1.models.common.norm import FusedRMSNorm
    from megatron_vr1.models.common.rope import FusedRotarySelfAttention

    args, _, model = untied
    monkeypatch.setattr(FusedRMSNorm, "kernel_backend", "triton")
    monkeypatch.setattr(FusedRotarySelfAttention, "kernel_backend", "triton")
    launches = []
    launch = rope_kernel._launch
    monkeypatch.setattr(rope_kernel, "_launch", lambda *a, **k: launches.append(k["backward"]) or launch(*a, **k))
    fused = build_model(args, ParallelLayout(make_vocab_size_divisible_by=16), backend="fused")
    # two per LM layer and ViT block, and the final norm
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 2 * (args.num_layers + args.vision.depth) + 1
    fused.load_state_dict(model.state_dict())
    batch = make_case("one_image")
    model.train()
    try:
        grads = []
        for m in (model, fused):
            m.zero_grad()
            out = m(**batch)
            out.float().pow(2).mean().backward()
            grads.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    finally:
        model.eval()
        model.zero_grad()
    (want, want_grads), (got, got_grads) = grads
    # query and key of every LM layer and ViT block went through the kernel, both ways
    layers = args.num_layers + args.vision.depth
    assert launches.count(False) == launches.count(True) == 2 * layers, launches
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
