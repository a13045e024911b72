"""Hugging Face <-> Megatron-Core checkpoint conversion for Qwen2.5-VL, one tensor at a time.

Both directions build the model on the meta device (TP=1, PP=1: the distributed checkpoint
stores global tensors, so it loads at any TP/PP) and move tensors through the one HF mapping.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import platform
from ..models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model
from ..models.qwen2_5_vl.hf_mapping import VocabSplit, iter_model_mappings, param_mappings
from ..models.qwen2_5_vl.parallel import META_BUILD_OVERRIDES
from .hf_files import (CheckpointError, HFCheckpointReader, atomic_dir, check_tensors, copy_side_files,
                       write_safetensors_shards)
from .megatron_files import checkpoint_param_shapes, iter_checkpoint_params, load_model, read_metadata, save_streaming, write_metadata

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_ASSETS = "hf_assets"  # tokenizer / processor / generation files kept inside a Megatron checkpoint


@contextmanager
def single_process() -> Iterator[None]:
    """Parallel state of one process (TP=1, PP=1), started here if nobody did."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if not started and dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process, not under a multi-rank job")
    platform.init_distributed(1, 1)
    try:
        yield
    finally:
        if started:
            platform.shutdown_distributed()


def expected_hf_shapes(args: Qwen25VLArgs) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the published checkpoint, as transformers builds the model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..models.qwen2_5_vl import canonical_hf_name

    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**args.to_hf_config()))
    shapes = {canonical_hf_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # the same tensor as embed_tokens; checkpoints omit it
    return shapes


def _meta_model(args: Qwen25VLArgs, dtype: torch.dtype, padded_vocab: int):
    with torch.device("meta"):
        return build_model(args, ParallelLayout(), backend="local", dtype=dtype,
                           config_overrides=META_BUILD_OVERRIDES, padded_vocab_size=padded_vocab)


def _deep_update(base: dict, ours: dict) -> dict:
    """``base`` with every key of ``ours`` set, nested dicts merged: fields the source config
    carries that the model does not read (``tokens_per_second``, token ids) survive."""
    out = dict(base)
    for key, value in ours.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                num_layers_in_first_pipeline_stage: Optional[int] = None, dtype: str = "auto",
                make_vocab_size_divisible_by: int = 1, overwrite: bool = False) -> dict:
    """Convert a HF folder into a Megatron-Core distributed checkpoint laid out for TP x PP.

    ``dtype``: ``"auto"`` keeps the checkpoint's own (its embedding's) dtype; ``bf16`` / ``fp16``
    / ``fp32`` cast every tensor.
    """
    args = Qwen25VLArgs.from_hf_config(hf_dir)
    layout = ParallelLayout(tensor_parallel, pipeline_parallel, num_layers_in_first_pipeline_stage,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    args.check_parallel(tensor_parallel, pipeline_parallel, num_layers_in_first_pipeline_stage)
    reader = HFCheckpointReader(hf_dir)
    if dtype == "auto":
        torch_dtype = reader.dtype("model.embed_tokens.weight")
        if torch_dtype not in DTYPES.values():
            raise CheckpointError(f"{hf_dir} stores {torch_dtype}: choose a dtype (bf16, fp16 or fp32)")
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    expected = expected_hf_shapes(args)
    tied_head = args.tie_word_embeddings and "lm_head.weight" in reader.names()
    check_tensors(reader, {**expected, **({"lm_head.weight": expected["model.embed_tokens.weight"]} if tied_head else {})})
    if tied_head and not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise CheckpointError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")

    padded = args.padded_vocab_size(tensor_parallel, make_vocab_size_divisible_by)
    table = param_mappings(args, padded)
    read: set[str] = set()

    def param_fn(name: str) -> torch.Tensor:
        m = table[name]
        read.update(m.hf)
        return m.shard([reader.get(h) for h in m.hf], 0, 1)

    with single_process(), atomic_dir(out, overwrite, inputs=[hf_dir]) as tmp:
        model = _meta_model(args, torch_dtype, padded)
        uses = Counter(h for _, _, m in iter_model_mappings(model, args, padded, 0) for h in m.hf)
        twice = sorted(h for h, n in uses.items() if n > 1)
        if twice:
            raise CheckpointError(f"tensors {twice} would feed more than one Megatron parameter")
        save_streaming(model, param_fn, tmp, torch_dtype)
        unread = sorted(set(expected) - read)
        if unread:
            raise CheckpointError(f"{hf_dir}: tensors {unread} were never converted")
        write_metadata(tmp, args, layout, torch_dtype, padded, extra={"source": "hf", "hf_tensors": len(read)})
        (tmp / HF_ASSETS).mkdir()
        copy_side_files(hf_dir, tmp / HF_ASSETS)
        shutil.copy2(Path(hf_dir) / "config.json", tmp / HF_ASSETS / "config.json")  # the export starts from it
    return {"tensors": len(read), "padded_vocab_size": padded, "dtype": str(torch_dtype).replace("torch.", "")}


def _merge_full(m, full: torch.Tensor, vocab_size: int) -> list[torch.Tensor]:
    return m.merge([full], vocab_size) if isinstance(m, VocabSplit) else m.merge([full])


def _hf_tensors(model, args: Qwen25VLArgs, ckpt: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    table = param_mappings(args, model.padded_vocab_size)
    for name, full in iter_checkpoint_params(model, ckpt, dtype):
        m = table[name]
        yield from zip(m.hf, _merge_full(m, full, args.vocab_size))


def _hf_plan(model, args: Qwen25VLArgs, dtype: torch.dtype):
    """What :func:`_hf_tensors` will produce, in order, from shapes alone (the model is on meta)."""
    table = param_mappings(args, model.padded_vocab_size)
    plan = []
    for name, shape in checkpoint_param_shapes(model):
        m = table[name]
        merged = _merge_full(m, torch.empty(shape, dtype=dtype, device="meta"), args.vocab_size)
        plan += [(h, tuple(t.shape), dtype) for h, t in zip(m.hf, merged)]
    return plan


def mcore_to_hf(mcore_dir: str | Path, out: str | Path, *, hf_config: str | Path | None = None,
                max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> dict:
    """Convert a Megatron-Core checkpoint (any TP/PP) into a HF folder that transformers and vLLM load."""
    mcore_dir = Path(mcore_dir)
    meta = read_metadata(mcore_dir)
    args = Qwen25VLArgs.from_hf_config(meta["hf_config"])
    if hf_config is not None:
        given = Qwen25VLArgs.from_hf_config(hf_config)
        if given != args:
            raise CheckpointError(f"--hf-config {hf_config} describes another architecture than {mcore_dir}")
    dtype = getattr(torch, meta["dtype"])
    source = Path(hf_config) if hf_config is not None else mcore_dir / HF_ASSETS
    inputs = [mcore_dir] + ([hf_config] if hf_config is not None else [])
    with single_process(), atomic_dir(out, overwrite, inputs=inputs) as tmp:
        model = _meta_model(args, dtype, meta["padded_vocab_size"])
        index = write_safetensors_shards(_hf_plan(model, args, dtype), _hf_tensors(model, args, mcore_dir, dtype),
                                         tmp, max_shard_bytes)
        missing = sorted(set(expected_hf_shapes(args)) - set(index["weight_map"]))
        if missing:
            raise CheckpointError(f"{mcore_dir}: no data for HF tensors {missing}")
        base = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
        # transformers 5 writes "dtype", 4.x "torch_dtype": both must name what the shards hold
        config = _deep_update(base, dict(args.to_hf_config(), torch_dtype=meta["dtype"], dtype=meta["dtype"],
                                         transformers_version=_transformers_version()))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(source, tmp)
        serve_as_trained(tmp)
    return {"tensors": len(index["weight_map"]), "bytes": index["metadata"]["total_size"]}


# Vision-R1's evaluation sampling (conf/eval.yaml's defaults): what a server started on an export
# samples with unless a request says otherwise
SERVED_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0,
                   "max_new_tokens": 16000}
# the default system turn of Qwen2-VL's chat template: RL and evaluation prompts have none
DEFAULT_SYSTEM_TURN = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                       "You are a helpful assistant.<|im_end|>\n{% endif %}")


def serve_as_trained(folder: Path) -> None:
    """Make an exported folder serve the prompts the model was rolled out and evaluated with: the
    chat template without its default system turn (a request's own system message still renders),
    and ``generation_config.json`` with the evaluation's sampling."""
    from ..data.tokenizer import CHAT_TEMPLATE

    def plain(template: str) -> str:
        if DEFAULT_SYSTEM_TURN in template:
            return template.replace(DEFAULT_SYSTEM_TURN, "")
        return CHAT_TEMPLATE.replace(DEFAULT_SYSTEM_TURN, "")  # a template we cannot edit: Qwen2-VL's own

    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if isinstance(config.get("chat_template"), str):
            config["chat_template"] = plain(config["chat_template"])
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if (folder / "chat_template.json").is_file():
        data = json.loads((folder / "chat_template.json").read_text())
        data["chat_template"] = plain(data["chat_template"])
        (folder / "chat_template.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
    if (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(plain((folder / "chat_template.jinja").read_text()))
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else \
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    gen.update(SERVED_SAMPLING)
    gen_file.write_text(json.dumps(gen, indent=2))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def fixed_prompt(args: Qwen25VLArgs) -> dict[str, torch.Tensor]:
    """A deterministic prompt with text and one 8x8-patch image, valid for any Qwen2.5-VL vocab."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(args.vocab_size, 150000), (12,), generator=g).tolist()
    grid = torch.tensor([[1, 8, 8]])
    image = [args.vision_start_token_id] + [args.image_token_id] * 16 + [args.vision_end_token_id]
    ids = text[:6] + image + text[6:]
    pixels = torch.randn(64, args.vision.patch_dim, generator=g)
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_grid_thw": grid}


@torch.no_grad()
def verify(hf_dir: str | Path, mcore_dir: str | Path) -> float:
    """Max |logit difference| between the HF folder (transformers) and the Megatron checkpoint, fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    meta = read_metadata(mcore_dir)
    args = Qwen25VLArgs.from_hf_config(meta["hf_config"])
    batch = fixed_prompt(args)
    with single_process():
        model = build_model(args, ParallelLayout(), backend="local", dtype=torch.float32,
                            padded_vocab_size=meta["padded_vocab_size"]).eval()
        load_model(model, mcore_dir)
        ours = model(**batch)[..., : args.vocab_size].float()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = batch["input_ids"]
    ref = hf(**batch, mm_token_type_ids=(ids == args.image_token_id).int()).logits.float()
    return (ours - ref).abs().max().item()
