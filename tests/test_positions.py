"""3-D M-RoPE ids and ViT windows against transformers' own implementation."""

import pytest
import torch

from megatron_vr1.models.qwen2_5_vl import ImageTokenError, Qwen25VLArgs, get_rope_index, vision_layout
from megatron_vr1.models.qwen2_5_vl.positions import packed_position_ids
from tiny import IMAGE, VEND, VSTART, hf_model, make_case, tiny_hf_config


@pytest.fixture(scope="module")
def hf_and_args():
    cfg = tiny_hf_config()
    return hf_model(cfg), Qwen25VLArgs.from_hf_config(cfg)


@pytest.mark.parametrize("case", ["no_image", "one_image", "two_images", "tall"])
def test_rope_index_matches_transformers(hf_and_args, case):
    hf, args = hf_and_args
    batch = make_case(case)
    ids, grid = batch["input_ids"], batch.get("image_grid_thw")
    ours, deltas = get_rope_index(ids, grid, args)
    if grid is None:  # transformers needs a grid; text-only ids are plain 0..S-1
        assert torch.equal(ours, torch.arange(ids.shape[1]).expand(3, 1, -1))
        return
    ref, ref_deltas = hf.model.get_rope_index(ids, (ids == IMAGE).int(), grid)
    assert torch.equal(ours, ref)
    assert torch.equal(deltas, ref_deltas)


def test_rope_index_batched_with_padding_matches_transformers(hf_and_args):
    hf, args = hf_and_args
    a, b = make_case("two_images"), make_case("one_image", seed=3)
    s = a["input_ids"].shape[1]
    pad = s - b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], torch.cat([torch.zeros(1, pad, dtype=torch.long), b["input_ids"]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding
    grid = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    ours, deltas = get_rope_index(ids, grid, args, attention_mask=mask)
    ref, ref_deltas = hf.model.get_rope_index(ids, (ids == IMAGE).int(), grid, attention_mask=mask)
    assert torch.equal(ours[:, mask.bool()], ref[:, mask.bool()])
    assert torch.equal(deltas, ref_deltas)


@pytest.mark.parametrize("grids", [[(1, 12, 16)], [(1, 12, 16), (1, 8, 10)], [(1, 20, 6), (2, 16, 16)], [(1, 16, 32)]])
def test_vision_layout_matches_transformers(grids):
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    v = args.vision
    grid = torch.tensor(grids)
    ours = vision_layout(grid, v)
    index, cu_window = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
    assert torch.equal(ours.window_index, index)
    assert torch.equal(ours.cu_window_seqlens, cu_window)
    assert torch.equal(ours.cu_seqlens, get_vision_cu_seqlens(grid))
    # rotary angles: HF's (h, w) ids times the inverse frequencies, permuted into windows
    pos = get_vision_position_ids(grid, v.spatial_merge_size)
    dim = v.head_dim // 2
    inv = 1.0 / (v.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    ang = torch.cat([pos[:, 0, None] * inv, pos[:, 1, None] * inv], -1)
    ang = ang.view(-1, 4, ang.shape[-1])[index].reshape(-1, ang.shape[-1])
    assert torch.equal(ours.rotary_angles, torch.cat([ang, ang], -1))


def test_image_token_count_must_match_grid():
    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    ids = torch.tensor([[1, VSTART] + [IMAGE] * 47 + [VEND, 2]])
    with pytest.raises(ImageTokenError, match="47 image tokens but its grid .* needs 48"):
        get_rope_index(ids, torch.tensor([[1, 12, 16]]), args)
    with pytest.raises(ImageTokenError, match="only 0 image grid"):
        get_rope_index(ids, None, args)
    ok = torch.tensor([[1, VSTART] + [IMAGE] * 48 + [VEND, 2]])
    with pytest.raises(ImageTokenError, match="2 image grid\\(s\\) given but input_ids hold 1"):
        get_rope_index(ok, torch.tensor([[1, 12, 16], [1, 8, 8]]), args)


def test_packed_positions_restart_per_sequence():
    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    cases = [make_case("one_image"), make_case("no_image", seed=1), make_case("two_images", seed=2)]
    seqs = [c["input_ids"][0] for c in cases]
    grid = torch.cat([c["image_grid_thw"] for c in cases if "image_grid_thw" in c])
    packed = packed_position_ids(seqs, grid, args)
    alone = [get_rope_index(c["input_ids"], c.get("image_grid_thw"), args)[0] for c in cases]
    assert torch.equal(packed, torch.cat(alone, dim=2))
