"""Tiny random Qwen2.5-VL configs and inputs shared by the tests and their torchrun workers."""

from __future__ import annotations

import copy
from typing import Any

import torch

IMAGE, VIDEO, VSTART, VEND = 245, 246, 243, 244


def tiny_hf_config(*, tied: bool = False, layers: int = 3) -> dict[str, Any]:
    """A published-layout config.json, small enough for CPU, shaped like the real thing.

    The vocab (250) is not a multiple of the padding divisor, the KV heads are grouped, the ViT
    has window and full-attention blocks, and the M-RoPE sections are uneven.
    """
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": 250,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": tied,
        "max_position_embeddings": 4096,
        "bos_token_id": 240,
        "eos_token_id": 241,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": VSTART,
        "vision_end_token_id": VEND,
        "torch_dtype": "float32",
        "vision_config": {
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 4,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "hidden_act": "silu",
        },
    }


def hf_model(config: dict[str, Any], seed: int = 0):
    """transformers' Qwen2.5-VL with random weights (eager attention: an independent reference)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(**copy.deepcopy(config))
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    # post_init leaves norms at 1: randomise them so a wrong norm mapping cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_q.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


# Images by (t, h, w) patch grid: 12x16 patches spans several 4x4-unit windows, some partial.
GRIDS = {"big": (1, 12, 16), "small": (1, 8, 10), "tall": (1, 20, 6)}


def make_case(name: str, seed: int = 0, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """input_ids [1, S] with image placeholders, pixel_values and image_grid_thw for a named case.

    ``multiple_of`` appends text tokens until S divides evenly (sequence parallelism needs it).
    """
    g = torch.Generator().manual_seed(seed)
    images = {"one_image": ["big"], "two_images": ["big", "small"], "no_image": [], "tall": ["tall"]}[name]
    ids: list[int] = torch.randint(0, 240, (5,), generator=g).tolist()
    for img in images:
        t, h, w = GRIDS[img]
        ids += [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]
        ids += torch.randint(0, 240, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
    if not images:
        ids += torch.randint(0, 240, (40,), generator=g).tolist()
    ids += torch.randint(0, 240, (-len(ids) % multiple_of,), generator=g).tolist()
    batch: dict[str, torch.Tensor] = {"input_ids": torch.tensor([ids])}
    if images:
        grid = torch.tensor([GRIDS[i] for i in images])
        patches = int(grid.prod(-1).sum())
        batch["pixel_values"] = torch.randn(patches, 3 * 2 * 14 * 14, generator=g)
        batch["image_grid_thw"] = grid
    return batch


def hf_logits(model, batch: dict[str, torch.Tensor], image_token: int = IMAGE) -> torch.Tensor:
    kwargs = dict(batch)
    kwargs["mm_token_type_ids"] = (batch["input_ids"] == image_token).int()
    with torch.no_grad():
        return model(**kwargs).logits.float()


def chat_samples(tokenizer, args, cases, seed: int = 0) -> list:
    """Training samples of ``(question, [(width, height) of each image], reply)`` chats, through
    the data layer, with random images of those sizes."""
    import numpy as np
    from PIL import Image

    from megatron_vr1.data import build_sample, process_images

    rng = np.random.default_rng(seed)
    samples = []
    for question, sizes, reply in cases:
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        pixels, grid = process_images(images)
        samples.append(build_sample(tokenizer, args, [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": reply}], pixels, grid))
    return samples
