"""The HF <-> Megatron mapping: shards of all TP ranks merge back to the HF tensors, bit for bit."""

import pytest
import torch

from megatron_vr1.models.qwen2_5_vl import Qwen25VLArgs, canonical_hf_name, param_mappings
from megatron_vr1.models.qwen2_5_vl.hf_mapping import QKV, VocabSplit, hf_names
from tiny import hf_model, tiny_hf_config


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_shard_then_merge_is_identity(tied, tp):
    cfg = tiny_hf_config(tied=tied)
    args = Qwen25VLArgs.from_hf_config(cfg)
    state = {canonical_hf_name(k): v for k, v in hf_model(cfg).state_dict().items()}
    if tied:
        assert "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    padded = args.padded_vocab_size(tp, 16)
    seen = set()
    for name, m in param_mappings(args, padded).items():
        tensors = [state[h] for h in m.hf]
        shards = [m.shard(tensors, r, tp) for r in range(tp)]
        assert len({s.shape for s in shards}) == 1, name
        merged = m.merge(shards, args.vocab_size) if isinstance(m, VocabSplit) else m.merge(shards)
        assert len(merged) == len(tensors)
        for a, b in zip(merged, tensors):
            assert torch.equal(a, b), name
        seen.update(m.hf)
    # every HF tensor is consumed (tied: lm_head is not a separate tensor)
    expected = {k for k in state if not (tied and k == "lm_head.weight")}
    assert seen == expected == set(hf_names(args))


def test_qkv_interleaves_per_group():
    m = QKV("x", ("q", "k", "v"), num_heads=4, num_groups=2, head_dim=1)
    q, k, v = torch.arange(4.0).view(4, 1), torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    full = m.full([q, k, v]).flatten().tolist()
    assert full == [0, 1, 10, 20, 2, 3, 11, 21]
    assert m.shard([q, k, v], 1, 2).flatten().tolist() == [2, 3, 11, 21]


def test_both_hf_key_layouts_are_read():
    assert canonical_hf_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert canonical_hf_name("model.visual.blocks.3.attn.qkv.bias") == "visual.blocks.3.attn.qkv.bias"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"


def test_missing_or_misshaped_tensor_is_named(model_parallel_1):
    from megatron_vr1.models.qwen2_5_vl import ParallelLayout, build_model, load_hf_state_dict

    cfg = tiny_hf_config()
    args = Qwen25VLArgs.from_hf_config(cfg)
    state = dict(hf_model(cfg).state_dict())
    model = build_model(args, ParallelLayout(make_vocab_size_divisible_by=16), backend="local")
    kw = dict(padded_vocab=model.padded_vocab_size, tp_rank=0, tp_size=1, layer_offset=0)
    broken = dict(state)
    del broken["model.language_model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        load_hf_state_dict(model, broken, args, **kw)
    broken = dict(state)
    broken["model.visual.blocks.0.mlp.down_proj.weight"] = torch.zeros(32, 40)
    with pytest.raises(ValueError, match=r"vision\.layers\.0\.mlp\.linear_fc2\.weight"):
        load_hf_state_dict(model, broken, args, **kw)
