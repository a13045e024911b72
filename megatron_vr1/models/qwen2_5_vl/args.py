"""Qwen2.5-VL architecture arguments, read from a Hugging Face ``config.json``.

Both layouts are accepted: the published one (text fields at the top level, ``rope_scaling``
with ``type: mrope``) and the one transformers >= 4.52 writes (``text_config`` /
``vision_config`` sub-dicts, ``rope_parameters``). Keys that would change the architecture in
a way this implementation does not support are errors, and so are keys nobody here knows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

# Keys that never change the network: bookkeeping, generation defaults, token ids we do not use.
_INERT_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "_name_or_path", "use_cache", "initializer_range", "bos_token_id", "eos_token_id",
        "pad_token_id", "vision_token_id", "max_position_embeddings", "max_window_layers",
        "sliding_window", "output_hidden_states", "output_attentions", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
        "tokens_per_second", "in_chans", "in_channels", "spatial_patch_size", "attention_dropout",
        "tie_encoder_decoder", "torchscript", "pruned_heads", "add_cross_attention",
        "tf_legacy_loss", "use_bfloat16", "finetuning_task", "tokenizer_class", "prefix",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "is_decoder",
        "cross_attention_hidden_size", "output_scores", "return_dict_in_generate",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "num_beams", "num_beam_groups", "diversity_penalty",
        "max_length", "min_length", "do_sample", "early_stopping", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "forced_bos_token_id", "forced_eos_token_id", "num_labels", "quantization_config",
        "image_token_index", "video_token_index",
    }
)
# Keys this module reads (at the top level or in text_config).
_TEXT_KEYS = frozenset(
    {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
        "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "layer_types",
        "tie_word_embeddings", "attention_bias",
    }
)
_TOP_KEYS = frozenset(
    {
        "text_config", "vision_config", "image_token_id", "video_token_id",
        "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings",
    }
)
_VISION_KEYS = frozenset(
    {
        "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "patch_size",
        "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
        "fullatt_block_indexes", "rope_parameters", "rope_theta", "num_attention_heads",
        "num_hidden_layers",
    }
)


class ConfigError(ValueError):
    """A config.json this model cannot build faithfully."""


@dataclass(frozen=True)
class VisionArgs:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    in_channels: int = 3
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch (``pixel_values.shape[-1]``)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged_units(self) -> int:
        """Side of an attention window, counted in merged 2x2 units."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class Qwen25VLArgs:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    attention_dropout: float = 0.0
    vision: VisionArgs = field(default_factory=VisionArgs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path, *, strict: bool = True) -> "Qwen25VLArgs":
        """Build from a config.json dict (or a path to the file or its directory)."""
        if not isinstance(config, Mapping):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            with open(path) as f:
                config = json.load(f)
        config = dict(config)
        model_type = config.get("model_type", "qwen2_5_vl")
        if model_type not in ("qwen2_5_vl",):
            raise ConfigError(f"config.json model_type {model_type!r} is not 'qwen2_5_vl'")
        text = dict(config.get("text_config") or {})
        if text.get("model_type") not in (None, "qwen2_5_vl_text", "qwen2_5_vl"):
            raise ConfigError(f"text_config.model_type {text['model_type']!r} is not qwen2_5_vl_text")
        # Flat (published) layout: the text fields live at the top level.
        for key in _TEXT_KEYS:
            if key not in text and key in config:
                text[key] = config[key]
        vision = dict(config.get("vision_config") or {})
        if strict:
            _check_known("config.json", config, _TOP_KEYS | _TEXT_KEYS | _INERT_KEYS | _generic_keys())
            _check_known("text_config", text, _TEXT_KEYS | _INERT_KEYS | _generic_keys())
            _check_known("vision_config", vision, _VISION_KEYS | _INERT_KEYS | _generic_keys())

        for where, d in (("config.json", text), ("vision_config", vision)):
            act = d.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{where}.hidden_act={act!r}: Qwen2.5-VL uses 'silu' (SwiGLU)")
        if text.get("use_sliding_window", False):
            raise ConfigError("config.json use_sliding_window=true: sliding-window attention is not supported")
        layer_types = text.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"config.json layer_types {sorted(set(layer_types))}: only full_attention is supported")
        if text.get("attention_bias") is False:
            raise ConfigError("config.json attention_bias=false: Qwen2.5-VL has a QKV bias")

        hidden = int(_require(text, "hidden_size"))
        heads = int(_require(text, "num_attention_heads"))
        head_dim = int(text.get("head_dim") or hidden // heads)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"config.json rope type {rope_type!r}: only M-RoPE without scaling is supported")
        rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 1e6)))
        mrope = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
        if len(mrope) != 3 or sum(mrope) * 2 != head_dim:
            raise ConfigError(
                f"config.json mrope_section {list(mrope)} must have 3 parts summing to head_dim/2 = {head_dim // 2}"
            )

        vrope = dict(vision.get("rope_parameters") or {})
        if vrope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config rope_type {vrope['rope_type']!r}: only axial 2D rotary is supported")
        vdefaults = VisionArgs()
        v = VisionArgs(
            depth=int(vision.get("depth", vision.get("num_hidden_layers", vdefaults.depth))),
            hidden_size=int(vision.get("hidden_size", vdefaults.hidden_size)),
            intermediate_size=int(vision.get("intermediate_size", vdefaults.intermediate_size)),
            num_heads=int(vision.get("num_heads", vision.get("num_attention_heads", vdefaults.num_heads))),
            patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", vdefaults.patch_size))),
            temporal_patch_size=int(vision.get("temporal_patch_size", vdefaults.temporal_patch_size)),
            spatial_merge_size=int(vision.get("spatial_merge_size", vdefaults.spatial_merge_size)),
            window_size=int(vision.get("window_size", vdefaults.window_size)),
            out_hidden_size=int(vision.get("out_hidden_size", hidden)),
            fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", vdefaults.fullatt_block_indexes)),
            rope_theta=float(vrope.get("rope_theta", vision.get("rope_theta", vdefaults.rope_theta))),
            in_channels=int(vision.get("in_channels", vision.get("in_chans", vdefaults.in_channels))),
        )
        tie = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        args = cls(
            vocab_size=int(_require(text, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_require(text, "intermediate_size")),
            num_layers=int(_require(text, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            mrope_section=mrope,  # type: ignore[arg-type]
            tie_word_embeddings=tie,
            image_token_id=int(config.get("image_token_id", 151655)),
            video_token_id=int(config.get("video_token_id", 151656)),
            vision_start_token_id=int(config.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(config.get("vision_end_token_id", 151653)),
            attention_dropout=float(text.get("attention_dropout", 0.0) or 0.0),
            vision=v,
        )
        args.validate()
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """The published (flat) config.json layout, readable by transformers 4.x and 5.x and vLLM."""
        v = self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": self.attention_dropout,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "hidden_act": "silu",
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
            },
        }

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        v = self.vision
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} not divisible by num_key_value_heads {self.num_kv_heads}")
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if v.head_dim % 4:
            raise ConfigError(f"vision head dim {v.head_dim} must be a multiple of 4 for the 2D rotary")
        if v.out_hidden_size != self.hidden_size:
            raise ConfigError(f"vision out_hidden_size {v.out_hidden_size} != LM hidden_size {self.hidden_size}")
        if v.window_size % (v.spatial_merge_size * v.patch_size):
            raise ConfigError(f"vision window_size {v.window_size} not a multiple of merge x patch size")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(f"vision fullatt_block_indexes {bad} out of range for depth {v.depth}")

    def check_parallel(self, tensor_parallel: int, pipeline_parallel: int = 1,
                       num_layers_in_first_pipeline_stage: int | None = None) -> None:
        """Clear errors for layouts megatron-core would reject deep inside (or get wrong)."""
        tp, v = tensor_parallel, self.vision
        if tp < 1 or pipeline_parallel < 1:
            raise ConfigError(f"tensor_parallel and pipeline_parallel must be >= 1, got {tp} and {pipeline_parallel}")
        if pipeline_parallel == 1 and num_layers_in_first_pipeline_stage not in (None, self.num_layers):
            raise ConfigError(f"num_layers_in_first_pipeline_stage={num_layers_in_first_pipeline_stage} needs "
                              "pipeline_parallel > 1")
        checks = [
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("vision num_heads", v.num_heads),
            ("vision intermediate_size", v.intermediate_size),
            ("vision merger hidden size", v.hidden_size * v.merge_unit),
        ]
        for name, value in checks:
            if value % tp:
                raise ConfigError(f"tensor_parallel={tp} does not divide {name}={value}")
        pp = pipeline_parallel
        if pp > 1:
            first = num_layers_in_first_pipeline_stage
            if first is None:
                if self.num_layers % pp:
                    raise ConfigError(f"pipeline_parallel={pp} does not divide num_hidden_layers={self.num_layers}; "
                                      "set num_layers_in_first_pipeline_stage")
            elif not 0 <= first < self.num_layers or (self.num_layers - first) % (pp - 1):
                raise ConfigError(
                    f"num_layers_in_first_pipeline_stage={first}: the other {self.num_layers - first} layers "
                    f"do not split evenly over {pp - 1} stages"
                )

    def padded_vocab_size(self, tensor_parallel: int, divisible_by: int = 1) -> int:
        """Megatron's vocab padding: a multiple of ``divisible_by * tensor_parallel``.

        Rows past ``vocab_size`` are zero and their logits must be ignored by losses.
        """
        multiple = divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(d: Mapping[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json is missing {key!r}")
    return d[key]


def _check_known(where: str, d: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ConfigError(
            f"{where} has key(s) {unknown} that megatron-vr1's Qwen2.5-VL does not know; they may "
            "change the architecture. Remove them, or pass strict=False if they are inert."
        )


_GENERIC: frozenset[str] | None = None


def _generic_keys() -> frozenset[str]:
    """Keys every transformers ``PretrainedConfig`` writes: bookkeeping, never architecture."""
    global _GENERIC
    if _GENERIC is None:
        from transformers import PretrainedConfig

        _GENERIC = frozenset(PretrainedConfig().to_dict())
    return _GENERIC
