"""Data: formats, image processing, chat template, packing, demo data — against transformers."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vr1.config import load_model_conf
from megatron_vr1.data import (EvalDataset, ImageError, RecordError, RLDataset, SampleError, SFTDataset, balance,
                               build_sample, collate_padded, fill_ratio, pack, pack_balanced,
                               packed_batch, load_image, process_images, tokenize_chat)
from megatron_vr1.data.tokenizer import CHAT_TEMPLATE, QWEN2_PATTERN, qwen_bpe_ranks

SIZES = [(640, 480), (1280, 720), (300, 2000)]


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _hf_processor(tokenizer):
    """transformers' Qwen2.5-VL processor. Its constructor insists on a video processor, which
    needs torchvision (no CPU wheel here): assemble it from its parts instead."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    proc.image_processor, proc.tokenizer, proc.chat_template = Qwen2VLImageProcessorPil(), tokenizer, CHAT_TEMPLATE
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


# ---------------------------------------------------------------------------- tokenizer
def test_offline_tokenizer_matches_tiktoken_and_published_ids(tokenizer):
    import tiktoken

    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=qwen_bpe_ranks(), special_tokens={})
    texts = ["Find x. The legs are 3 and 4, so x = sqrt(9 + 16) = 5.", "  多模态推理，几何题。 ", "a\n\n\tb  c",
             "<think> 12 * 34 = 408 </think>", "don't you'll we've 1234567 $$\\frac{1}{2}$$"]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == enc.encode(text)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]) == \
        [151643, 151644, 151645, 151652, 151653, 151655, 151656]


# ---------------------------------------------------------------------------- images
def test_image_processing_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = [_image(w, h, i) for i, (w, h) in enumerate(SIZES + [(50, 40)])]
    ref = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
    pixels, grid = process_images(images)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.equal(pixels, ref["pixel_values"])  # bit for bit


# ---------------------------------------------------------------------------- template
@pytest.mark.parametrize("sizes", [[SIZES[0]], [SIZES[1], SIZES[2]]], ids=["one", "two"])
def test_template_matches_transformers_processor(tokenizer, args, sizes):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    from omegaconf import OmegaConf

    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    question, reply = "Which shape has the larger area?", "<think> 12 > 9 </think><answer> Final Answer: A </answer>"
    hf_messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]},
                   {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
    proc = _hf_processor(tokenizer)
    text = proc.apply_chat_template(hf_messages, tokenize=False)
    ref = proc(text=[text], images=images, return_tensors="pt")

    pixels, grid = process_images(images)
    sample = build_sample(tokenizer, args, [{"role": "user", "content": "<image>" * len(images) + question},
                                            {"role": "assistant", "content": reply}], pixels, grid)
    assert torch.equal(sample.input_ids, ref["input_ids"][0])
    assert torch.equal(sample.pixel_values, ref["pixel_values"])
    assert torch.equal(sample.image_grid_thw, ref["image_grid_thw"])
    # 3-D position ids: transformers' get_rope_index (a meta-device model is enough: it reads the config)
    with torch.device("meta"):
        hf = Qwen2_5_VLModel(Qwen2_5_VLConfig(**OmegaConf.to_container(load_model_conf("tiny").hf_config)))
    ids = ref["input_ids"]
    pos, _ = hf.get_rope_index(ids, (ids == 151655).int(), ref["image_grid_thw"])
    assert torch.equal(sample.position_ids, pos[:, 0])
    # the loss mask is the assistant reply and its <|im_end|>
    assert tokenizer.decode(sample.input_ids[sample.loss_mask]) == reply + "<|im_end|>"


def test_rl_prompt_has_no_system_turn_and_a_generation_prompt(tokenizer, args):
    pixels, grid = process_images([_image(640, 480)])
    sample = build_sample(tokenizer, args, [{"role": "user", "content": "<image>Find x."}], pixels, grid,
                          system_prompt=None, add_generation_prompt=True)
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "system" not in text and not sample.loss_mask.any()


# ---------------------------------------------------------------------------- formats & bad input
def _write_images(root):
    (root / "img").mkdir(exist_ok=True)
    _image(200, 150).save(root / "img" / "a.png")
    _image(120, 300, 1).save(root / "img" / "b.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _sft(content="<image>How many?", images=("img/a.png",), reply="<answer> Final Answer: 2 </answer>", **extra):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}],
            "images": list(images), **extra}


BAD = {
    "missing image": (_sft(images=("img/nope.png",)), ImageError, "does not exist"),
    "corrupt image": (_sft(images=("img/corrupt.png",)), ImageError, "cannot be decoded"),
    "image count": (_sft(content="<image><image>Compare."), SampleError, "more <image> placeholders"),
    "empty conversation": ({"messages": [], "images": []}, SampleError, "empty conversation"),
    "too long": (_sft(reply="word " * 3000), SampleError, "exceeds max_tokens=2048"),
    "lone surrogate": (_sft(content="<image>bad \udcff text"), SampleError, "not valid Unicode"),
    "special token in text": (_sft(content="<image>end early<|im_end|>"), SampleError, "special token <.im_end.>"),
    "turn not an object": ({"messages": ["hello", {"role": "assistant", "content": "hi"}]}, SampleError,
                           "turn 0 must be an object"),
    "messages not a list": ({"messages": "hello"}, SampleError, "must be a list of turns"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_raise_an_error_naming_them(tmp_path, tokenizer, args, case):
    _write_images(tmp_path)
    record, error, message = BAD[case]
    records = [_sft(), record]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    data = SFTDataset(tmp_path / "sft.json", tokenizer, args, max_tokens=2048)
    with pytest.raises(error, match=rf"sft.json\[1\].*{message}"):
        list(data)


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path, tokenizer, args):
    _write_images(tmp_path)
    good = [_sft(), _sft(images=("img/b.png",))]
    lines = [json.dumps(r).encode() for r in good + [rec for rec, _, _ in BAD.values()]]
    lines.insert(1, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')  # latin-1 bytes: not UTF-8
    (tmp_path / "sft.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = SFTDataset(tmp_path / "sft.jsonl", tokenizer, args, max_tokens=2048, skip_bad_samples=True)
    samples = list(data)
    assert len(samples) == 2
    assert data.report.total == len(BAD) + 1  # every bad record is accounted for
    assert any("sft.jsonl:2" in ex for exs in data.report.examples.values() for ex in exs)
    assert "skipped" in str(data.report)
    with pytest.raises(RecordError, match=r"sft.jsonl:2: UnicodeDecodeError"):
        list(SFTDataset(tmp_path / "sft.jsonl", tokenizer, args))


def test_sharegpt_variants_and_rl_eval_formats(tmp_path, tokenizer, args):
    import pandas as pd

    _write_images(tmp_path)
    conversations = {"conversations": [{"from": "human", "value": "<image>How many?"},
                                       {"from": "gpt", "value": "<answer> Final Answer: 2 </answer>"}],
                     "images": ["img/a.png"]}
    (tmp_path / "a.json").write_text(json.dumps([conversations]))
    (tmp_path / "b.json").write_text(json.dumps([_sft()]))
    a, b = list(SFTDataset(tmp_path / "a.json", tokenizer, args)), list(SFTDataset(tmp_path / "b.json", tokenizer, args))
    assert torch.equal(a[0].input_ids, b[0].input_ids)

    rl = [{"id": "g1", "problem": "<image>Find x.", "images": ["img/a.png"], "answer": "5"},
          {"id": "g2", "problem": "What is 2+2?", "images": ["img/b.png"], "answer": "4"}]
    pd.DataFrame(rl).to_parquet(tmp_path / "rl.parquet")
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rl))
    for name in ("rl.parquet", "rl.jsonl"):
        prompts = list(RLDataset(tmp_path / name, tokenizer, args))
        assert [p.answer for p in prompts] == ["5", "4"] and [p.id for p in prompts] == ["g1", "g2"]
        assert all(int(p.sample.image_grid_thw.shape[0]) == 1 for p in prompts)  # <image> added when absent

    ev = {"pid": "7", "question": "Which is larger?", "image": "img/a.png", "choices": ["3", "5"], "answer": "B"}
    (tmp_path / "eval.jsonl").write_text(json.dumps(ev))
    (prompt,) = list(EvalDataset(tmp_path / "eval.jsonl", tokenizer, args))
    text = tokenizer.decode(prompt.sample.input_ids)
    assert "Choices:\nA. 3\nB. 5" in text and prompt.extra["question_type"] == "multi_choice" and prompt.id == "7"
    # MathVista carries both kinds of type, and fields the reward may need
    mathvista = dict(ev, question_type="multi_choice", answer_type="text", precision=None, unit="cm")
    (tmp_path / "mathvista.jsonl").write_text(json.dumps(mathvista))
    (prompt,) = list(EvalDataset(tmp_path / "mathvista.jsonl", tokenizer, args))
    assert {k: prompt.extra[k] for k in ("question_type", "answer_type", "unit", "choices")} == \
        {"question_type": "multi_choice", "answer_type": "text", "unit": "cm", "choices": ["3", "5"]}
    rl_extra = dict(rl[0], kind="geometry", choices=["4", "5"])
    (tmp_path / "rl_extra.jsonl").write_text(json.dumps(rl_extra))
    (prompt,) = list(RLDataset(tmp_path / "rl_extra.jsonl", tokenizer, args))
    assert prompt.extra == {"kind": "geometry", "choices": ["4", "5"]}


def test_parquet_with_embedded_images(tmp_path, tokenizer, args):
    """Geometry3K / EasyR1 parquet files store the images themselves (datasets' Image feature)."""
    import datasets

    images = [_image(200, 150), _image(120, 300, 1)]
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict({"problem": ["<image>Find x.", "<image>Find y."], "answer": ["5", "7"],
                                "images": [[images[0]], [images[1]]]}, features=features).to_parquet(
        tmp_path / "geo.parquet")
    prompts = list(RLDataset(tmp_path / "geo.parquet", tokenizer, args))
    assert [p.answer for p in prompts] == ["5", "7"]
    for prompt, image in zip(prompts, images):
        pixels, grid = process_images([image])
        assert torch.equal(prompt.sample.pixel_values, pixels) and torch.equal(prompt.sample.image_grid_thw, grid)


def test_transparent_images_composite_onto_white_as_transformers_does(tmp_path):
    from PIL import ImageDraw
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgba = Image.new("RGBA", (112, 84), (0, 0, 0, 0))  # a black line drawing on a transparent background
    ImageDraw.Draw(rgba).line([(5, 5), (100, 70)], fill=(0, 0, 0, 255), width=4)
    la = rgba.convert("LA")
    palette = rgba.convert("P")
    palette.info["transparency"] = 0
    for img in (rgba, la, palette):
        img.save(tmp_path / "x.png")
        loaded = load_image(tmp_path / "x.png")
        assert loaded.getpixel((100, 10)) == (255, 255, 255)  # background is white, not black
        ref = Qwen2VLImageProcessorPil()(images=[Image.open(tmp_path / "x.png")], return_tensors="pt")
        assert torch.equal(process_images([loaded])[0], ref["pixel_values"]), img.mode


def test_decompression_bombs_are_named_image_errors(tmp_path, monkeypatch):
    _image(200, 150).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a > 179 MP scan
    with pytest.raises(ImageError, match="big.png cannot be decoded"):
        load_image(tmp_path / "big.png")


def test_reply_tokens_are_those_generation_produces(tokenizer, args):
    """A reply starting with a newline keeps its own tokens (and trains on them) instead of merging
    with the header's newline."""
    reply = "\n<think> 2 </think><answer> Final Answer: 2 </answer>"
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": reply}]
    ids, mask = tokenize_chat(tokenizer, messages, [], system_prompt=None)
    prompt_ids, _ = tokenize_chat(tokenizer, messages[:1], [], system_prompt=None, add_generation_prompt=True)
    reply_ids = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)].tolist() == prompt_ids.tolist()
    assert ids[len(prompt_ids):len(prompt_ids) + len(reply_ids)].tolist() == reply_ids
    assert mask.tolist() == [False] * len(prompt_ids) + [True] * len(reply_ids) + [False]  # the trailing newline


def test_skip_report_counts_one_pass(tmp_path, tokenizer, args):
    _write_images(tmp_path)
    (tmp_path / "sft.json").write_text(json.dumps([_sft(), _sft(images=("img/nope.png",))]))
    data = SFTDataset(tmp_path / "sft.json", tokenizer, args, skip_bad_samples=True)
    for _ in range(3):
        assert len(list(data)) == 1 and data.report.total == 1


def test_100k_records_stream_without_holding_images(tmp_path, tokenizer, args, monkeypatch):
    import tracemalloc

    from megatron_vr1.data import formats

    _write_images(tmp_path)
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(100_000):
            f.write(json.dumps(_sft(images=("img/a.png" if i % 2 else "img/b.png",), id=i)) + "\n")
    opened = []
    real = formats.load_image
    monkeypatch.setattr(formats, "load_image", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    data = SFTDataset(tmp_path / "big.jsonl", tokenizer, args)
    assert len(data) == 100_000 and not opened  # loading decoded nothing
    tracemalloc.start()
    it = iter(data)
    next(it)
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(300):
        next(it)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(opened) == 301  # one decode per sample, when it is reached
    assert current - base < 20 << 20  # nothing accumulates as samples stream by


# ---------------------------------------------------------------------------- packing
def test_pack_fills_long_tailed_rollouts():
    rng = random.Random(0)
    # PTST-like: prompts of a few hundred tokens, responses long-tailed up to the 4K budget
    lengths = [rng.randint(200, 1200) + min(4096, int(rng.lognormvariate(6.5, 0.9))) for _ in range(2048)]
    bins = pack(lengths, 16384)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16384 for b in bins)
    assert fill_ratio(bins, lengths, 16384) >= 0.97
    ranks = balance(bins, lengths, 4)
    assert len({len(r) for r in ranks}) == 1 and sorted(map(tuple, bins)) == sorted(tuple(b) for r in ranks for b in r if b)
    even = pack_balanced(lengths, 16384, 4)
    assert len({len(r) for r in even}) == 1
    assert sorted(i for r in even for b in r for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16384 for r in even for b in r)
    loads = [sum(lengths[i] for b in r for i in b) for r in even]
    assert max(loads) - min(loads) <= 0.01 * max(loads)
    assert fill_ratio([b for r in even for b in r], lengths, 16384) >= 0.97
    with pytest.raises(ValueError, match="sample 1 has 20000 tokens"):
        pack([10, 20000], 16384)


def _qa(tokenizer, args, i, size=None):
    """A one-turn sample; with ``size`` it carries one image of that size."""
    if size is None:
        return build_sample(tokenizer, args, [{"role": "user", "content": f"Q{i}?"},
                                              {"role": "assistant", "content": f"A{i}."}],
                            *process_images([]))
    pixels, grid = process_images([_image(size[0], size[1], i)])
    return build_sample(tokenizer, args, [{"role": "user", "content": "<image>Q?"},
                                          {"role": "assistant", "content": f"A{i}."}], pixels, grid)


def test_packed_batch_keeps_sequences_apart(tokenizer, args):
    samples = [_qa(tokenizer, args, i, (w // 2, h // 2)) for i, (w, h) in enumerate(SIZES[:2])]
    batch = packed_batch(samples, args)
    cu = batch.cu_seqlens.tolist()
    assert cu == [0, len(samples[0]), len(samples[0]) + len(samples[1])]
    assert batch.input_ids.shape == batch.labels.shape == batch.loss_mask.shape == (1, cu[-1])
    assert batch.labels[0, cu[1] - 1] == -100  # never the next sequence's first token
    assert batch.position_ids[0, 0, cu[1]] == 0  # positions restart
    assert torch.equal(batch.position_ids[:, 0, cu[1]:], samples[1].position_ids)
    assert tokenizer.decode(batch.labels[batch.loss_mask]) == "A0.<|im_end|>A1.<|im_end|>"
    assert torch.equal(batch.loss_mask, batch.labels != -100)
    image_id = args.image_token_id
    assert torch.equal(batch.image_positions, (batch.input_ids[0] == image_id).nonzero()[:, 0])
    assert batch.vision.num_patches == batch.pixel_values.shape[0]


def test_packed_batch_pads_to_a_multiple_without_new_labels(tokenizer, args):
    samples = [_qa(tokenizer, args, 0), _qa(tokenizer, args, 1, (64, 48))]
    plain = packed_batch(samples, args)
    padded = packed_batch(samples, args, pad_to_multiple_of=8, pad_id=151643)
    total = plain.input_ids.shape[1]
    assert padded.input_ids.shape[1] % 8 == 0 and padded.input_ids.shape[1] >= total
    assert total % 8, "the case must need padding"
    assert torch.equal(padded.labels[:, :total], plain.labels) and (padded.labels[:, total:] == -100).all()
    assert padded.num_tokens == total and padded.num_sequences == 2
    params = padded.packed_seq_params()  # the padding is its own block for attention
    assert params.cu_seqlens_q.tolist() == plain.cu_seqlens.tolist() + [padded.input_ids.shape[1]]
    # nothing to do: one fully masked padding block, so the rank runs the same schedule
    empty = packed_batch([], args, pad_to_multiple_of=4)
    assert empty.input_ids.shape == (1, 4) and not empty.loss_mask.any() and empty.num_sequences == 0
    assert empty.packed_seq_params().cu_seqlens_q.tolist() == [0, 4]


def test_collate_padded_keeps_the_loss_mask_and_labels_no_padding(tokenizer, args):
    samples = [_qa(tokenizer, args, 0, (64, 48)), _qa(tokenizer, args, 1)]
    for side in ("right", "left"):
        batch = collate_padded(samples, pad_id=151643, args=args, side=side, pad_to_multiple_of=4)
        assert batch.input_ids.shape[1] % 4 == 0
        for row, sample in enumerate(samples):
            real = batch.attention_mask[row].bool()
            assert torch.equal(batch.input_ids[row][real], sample.input_ids)
            # the labels of a row are exactly its reply's tokens, wherever the padding is
            assert tokenizer.decode(batch.labels[row][batch.loss_mask[row]]) == f"A{row}.<|im_end|>"
            assert (batch.labels[row][~real] == -100).all()
        assert torch.equal(batch.image_positions, (batch.input_ids == args.image_token_id).reshape(-1).nonzero()[:, 0])


# ---------------------------------------------------------------------------- demo data
def test_demo_data_is_deterministic_and_loads(tmp_path, tokenizer, args):
    from megatron_vr1.data.demo import generate

    generate(tmp_path / "a", n_sft=8, n_rl=8, n_eval=8, seed=3)
    generate(tmp_path / "b", n_sft=8, n_rl=8, n_eval=8, seed=3)
    for name in ("sft.json", "rl.jsonl", "eval.jsonl", "images/rl_00005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    sft = list(SFTDataset(tmp_path / "a" / "sft.json", tokenizer, args))
    assert len(sft) == 8 and all(s.loss_mask.any() for s in sft)
    rl = list(RLDataset(tmp_path / "a" / "rl.jsonl", tokenizer, args))
    ev = list(EvalDataset(tmp_path / "a" / "eval.jsonl", tokenizer, args))
    assert len(rl) == 8 and len(ev) == 8
    for rec in map(json.loads, (tmp_path / "a" / "rl.jsonl").read_text().splitlines()):
        if rec["kind"] == "arithmetic":
            continue
        assert rec["answer"].lstrip("-").isdigit() or rec["answer"] in "ABCD"
    reply = json.loads((tmp_path / "a" / "sft.json").read_text())[0]["messages"][1]["content"]
    assert reply.startswith("<think> ") and "</think><answer> Final Answer: " in reply and reply.endswith(" </answer>")


def test_edited_file_is_read_again(tmp_path, tokenizer, args):
    _write_images(tmp_path)
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"problem": "<image>Q?", "images": ["img/a.png"], "answer": "1"}))
    assert [p.answer for p in RLDataset(path, tokenizer, args)] == ["1"]
    path.write_text(json.dumps({"problem": "<image>Q?", "images": ["img/a.png"], "answer": "22"}))
    assert [p.answer for p in RLDataset(path, tokenizer, args)] == ["22"]  # no stale cache


def test_the_data_layer_does_not_import_the_model_stack():
    """Data workers and the rollout engine use the data layer without paying for megatron-core."""
    import subprocess
    import sys

    code = ("import sys, megatron_vr1.data; "
            "print(sorted(m for m in sys.modules if m == 'megatron.core' or m == 'triton'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
