"""Qwen2-VL chat template: token ids, loss mask, image-pad expansion and 3-D position ids.

The conversation is rendered to text exactly as the checkpoints' chat template does (each
``<image>`` becomes ``<|vision_start|>`` + one ``<|image_pad|>`` per merged image token +
``<|vision_end|>``). Prompt and reply segments are tokenised separately, so a reply's tokens are
exactly those a generation after the prompt produces (tokenising the whole text at once would
merge the header's newline with a reply that starts with whitespace), and the loss mask marks
the tokens of assistant replies and their closing ``<|im_end|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..models.qwen2_5_vl import Qwen25VLArgs, get_rope_index
from ..models.qwen2_5_vl.positions import ImageTokenError
from .images import ImageConfig, image_token_count

IMAGE_PLACEHOLDER = "<image>"
# special tokens the template writes itself: inside a message's text they would end turns or
# claim image positions, so such text is refused rather than tokenised into structure
STRUCTURAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A record that cannot become a training sample."""


@dataclass
class Sample:
    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] bool: positions whose token is a training target
    position_ids: torch.Tensor  # [3, S]
    pixel_values: torch.Tensor  # [patches, 1176]
    image_grid_thw: torch.Tensor  # [images, 3]

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def render(messages: Sequence[dict], grids: Sequence[tuple[int, int, int]], *,
           system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT, add_generation_prompt: bool = False,
           image_cfg: ImageConfig = ImageConfig()) -> tuple[str, list[tuple[int, int]]]:
    """Chat text (image pads expanded) and the character spans that are training targets.

    ``system_prompt`` is used when the conversation has no system turn; ``None`` means none at
    all (Vision-R1's RL prompts).
    """
    if not messages:
        raise SampleError("empty conversation")
    parts: list[str] = []
    targets: list[tuple[int, int]] = []
    pos = 0

    def emit(text: str, target: bool = False) -> None:
        nonlocal pos
        if target:
            targets.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)

    if messages[0]["role"] != "system" and system_prompt is not None:
        emit(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
    image = 0
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise SampleError(f"turn {i}: unknown role {role!r}")
        if not isinstance(content, str):
            raise SampleError(f"turn {i}: content must be text, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError(f"turn {i}: text is not valid Unicode ({e.reason} at {e.start})") from e
        if role == "system" and i:
            raise SampleError(f"turn {i}: a system turn may only come first")
        for token in STRUCTURAL_TOKENS:
            if token in content:
                raise SampleError(f"turn {i}: text contains the special token {token}")
        pieces = content.split(IMAGE_PLACEHOLDER)
        if role == "assistant" and len(pieces) > 1:
            raise SampleError(f"turn {i}: <image> in an assistant reply")
        text = pieces[0]
        for piece in pieces[1:]:
            if image >= len(grids):
                raise SampleError(f"more <image> placeholders than the {len(grids)} image(s) of the record")
            text += "<|vision_start|>" + "<|image_pad|>" * image_token_count(grids[image], image_cfg) + "<|vision_end|>"
            text += piece
            image += 1
        emit(f"<|im_start|>{role}\n")
        if role == "assistant":
            emit(text + "<|im_end|>", target=True)
            emit("\n")
        else:
            emit(text + "<|im_end|>\n")
    if image != len(grids):
        raise SampleError(f"{len(grids)} image(s) but {image} <image> placeholder(s)")
    if add_generation_prompt:
        emit("<|im_start|>assistant\n")
    return "".join(parts), targets


def tokenize_chat(tokenizer, messages: Sequence[dict], grids: Sequence[tuple[int, int, int]], **render_kwargs
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, loss_mask) of a conversation."""
    text, targets = render(messages, grids, **render_kwargs)
    bounds = [0] + [b for span in targets for b in span] + [len(text)]
    ids: list[int] = []
    mask: list[bool] = []
    for k in range(len(bounds) - 1):  # prompt, reply, prompt, ... : odd segments are targets
        segment = text[bounds[k]:bounds[k + 1]]
        if segment:
            piece = tokenizer(segment, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [k % 2 == 1] * len(piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def build_sample(tokenizer, args: Qwen25VLArgs, messages: Sequence[dict], pixel_values: torch.Tensor,
                 image_grid_thw: torch.Tensor, *, image_cfg: ImageConfig = ImageConfig(), **render_kwargs) -> Sample:
    """A model-ready sample: ids, loss mask, 3-D position ids, and the image tensors."""
    grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    ids, mask = tokenize_chat(tokenizer, messages, grids, image_cfg=image_cfg, **render_kwargs)
    try:
        position_ids, _ = get_rope_index(ids[None], image_grid_thw if grids else None, args)
    except ImageTokenError as e:
        raise SampleError(str(e)) from e
    return Sample(ids, mask, position_ids[:, 0], pixel_values, image_grid_thw)
