"""The one Hugging Face <-> Megatron name-and-layout mapping of Qwen2.5-VL.

Megatron names here are those of :class:`~.model.Qwen25VLModel` with *global* LM layer numbers;
HF names are the published checkpoint layout (``model.*``, ``visual.*``, ``lm_head.*``).
Each :class:`ParamMapping` turns the HF tensors of one Megatron parameter into the shard a given
tensor-parallel rank holds (``shard``) and the shards of all ranks back into HF tensors
(``merge``). Loading, the converter and the rollout weight export all go through this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from .args import Qwen25VLArgs

# transformers >= 4.52 in memory (and some re-saved checkpoints) nest the submodules.
_NEW_LAYOUT = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_hf_name(name: str) -> str:
    """Map either HF key layout to the published one."""
    for new, old in _NEW_LAYOUT:
        if name.startswith(new):
            return old + name[len(new):]
    return name


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter made of one or more HF tensors."""

    megatron: str
    hf: tuple[str, ...]

    def shard(self, tensors: Sequence[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


class Replicated(ParamMapping):
    def shard(self, tensors, tp_rank, tp_size):
        return tensors[0]

    def merge(self, shards):
        return [shards[0]]


@dataclass(frozen=True)
class Split(ParamMapping):
    """Sharded along ``dim`` (0: column-parallel, 1: row-parallel)."""

    dim: int = 0

    def shard(self, tensors, tp_rank, tp_size):
        return _chunk(tensors[0], tp_size, self.dim, self.megatron)[tp_rank]

    def merge(self, shards):
        return [torch.cat(list(shards), dim=self.dim)]


@dataclass(frozen=True)
class VocabSplit(ParamMapping):
    """Vocab-parallel rows (exactly ``vocab_size`` of them in HF), zero-padded up to ``padded_vocab``."""

    padded_vocab: int = 0
    vocab_size: int = 0

    def shard(self, tensors, tp_rank, tp_size):
        t = tensors[0]
        if t.shape[0] != self.vocab_size:  # a short table must not be zero-filled into a "valid" one
            raise ValueError(f"{self.hf[0]} has {t.shape[0]} rows, the config's vocab_size is {self.vocab_size}")
        if t.shape[0] > self.padded_vocab:
            raise ValueError(f"{self.hf[0]}: {t.shape[0]} rows exceed the padded vocab {self.padded_vocab}")
        pad = self.padded_vocab - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return _chunk(t, tp_size, 0, self.megatron)[tp_rank]

    def merge(self, shards, vocab_size: int | None = None):
        full = torch.cat(list(shards), dim=0)
        return [full[:vocab_size] if vocab_size is not None else full]


@dataclass(frozen=True)
class QKV(ParamMapping):
    """q, k, v (separate HF tensors, or one fused ``qkv``) -> Megatron's per-group interleave.

    Megatron lays ``linear_qkv`` out as, for each KV group: its ``heads/groups`` query heads,
    then its key head, then its value head. Groups are split contiguously over TP ranks.
    """

    num_heads: int = 0
    num_groups: int = 0
    head_dim: int = 0

    def _split_hf(self, tensors):
        if len(tensors) == 3:
            return tensors
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_groups * self.head_dim
        return torch.split(tensors[0], [q_rows, kv_rows, kv_rows], dim=0)

    def full(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._split_hf(tensors)
        per = self.num_heads // self.num_groups
        tail = q.shape[1:]
        q = q.reshape(self.num_groups, per * self.head_dim, *tail)
        k = k.reshape(self.num_groups, self.head_dim, *tail)
        v = v.reshape(self.num_groups, self.head_dim, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    def shard(self, tensors, tp_rank, tp_size):
        if self.num_groups % tp_size:
            raise ValueError(f"{self.megatron}: {self.num_groups} KV groups not divisible by TP={tp_size}")
        return _chunk(self.full(tensors), tp_size, 0, self.megatron)[tp_rank]

    def merge(self, shards):
        full = torch.cat(list(shards), dim=0)
        per = self.num_heads // self.num_groups
        tail = full.shape[1:]
        grouped = full.reshape(self.num_groups, (per + 2) * self.head_dim, *tail)
        q, k, v = torch.split(grouped, [per * self.head_dim, self.head_dim, self.head_dim], dim=1)
        q, k, v = (x.reshape(-1, *tail) for x in (q, k, v))
        return [q, k, v] if len(self.hf) == 3 else [torch.cat([q, k, v], dim=0)]


@dataclass(frozen=True)
class GatedMLP(ParamMapping):
    """gate and up -> ``linear_fc1``; each rank holds ``[gate_shard; up_shard]``."""

    def shard(self, tensors, tp_rank, tp_size):
        gate, up = tensors
        return torch.cat([_chunk(gate, tp_size, 0, self.megatron)[tp_rank],
                          _chunk(up, tp_size, 0, self.megatron)[tp_rank]], dim=0)

    def merge(self, shards):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def _chunk(t: torch.Tensor, parts: int, dim: int, name: str) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % parts:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} not divisible by TP={parts}")
    return torch.chunk(t, parts, dim=dim)


# ---------------------------------------------------------------------------------------------
def _lm_layer(args: Qwen25VLArgs, i: int) -> list[ParamMapping]:
    mc, hf = f"language_model.decoder.layers.{i}.", f"model.layers.{i}."
    qkv = dict(num_heads=args.num_heads, num_groups=args.num_kv_heads, head_dim=args.head_dim)
    return [
        Replicated(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
        QKV(mc + "self_attention.linear_qkv.weight",
            tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), **qkv),
        QKV(mc + "self_attention.linear_qkv.bias",
            tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), **qkv),
        Split(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), dim=1),
        Replicated(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
        GatedMLP(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")),
        Split(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), dim=1),
    ]


def _vision_layer(args: Qwen25VLArgs, i: int) -> list[ParamMapping]:
    v = args.vision
    mc, hf = f"vision.layers.{i}.", f"visual.blocks.{i}."
    qkv = dict(num_heads=v.num_heads, num_groups=v.num_heads, head_dim=v.head_dim)
    return [
        Replicated(mc + "input_layernorm.weight", (hf + "norm1.weight",)),
        QKV(mc + "self_attention.linear_qkv.weight", (hf + "attn.qkv.weight",), **qkv),
        QKV(mc + "self_attention.linear_qkv.bias", (hf + "attn.qkv.bias",), **qkv),
        Split(mc + "self_attention.linear_proj.weight", (hf + "attn.proj.weight",), dim=1),
        Replicated(mc + "self_attention.linear_proj.bias", (hf + "attn.proj.bias",)),
        Replicated(mc + "pre_mlp_layernorm.weight", (hf + "norm2.weight",)),
        GatedMLP(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")),
        GatedMLP(mc + "mlp.linear_fc1.bias", (hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias")),
        Split(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), dim=1),
        Replicated(mc + "mlp.linear_fc2.bias", (hf + "mlp.down_proj.bias",)),
    ]


def param_mappings(args: Qwen25VLArgs, padded_vocab: int) -> dict[str, ParamMapping]:
    """Every Megatron parameter of the whole (unsplit) model, keyed by Megatron name."""
    maps: list[ParamMapping] = [
        VocabSplit("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                   padded_vocab=padded_vocab, vocab_size=args.vocab_size),
        Replicated("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)),
        VocabSplit("language_model.output_layer.weight",
                   ("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight",),
                   padded_vocab=padded_vocab, vocab_size=args.vocab_size),
        Replicated("vision.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",)),
        Replicated("vision.merger.ln_q.weight", ("visual.merger.ln_q.weight",)),
        Split("vision.merger.fc1.weight", ("visual.merger.mlp.0.weight",), dim=0),
        Split("vision.merger.fc1.bias", ("visual.merger.mlp.0.bias",), dim=0),
        Split("vision.merger.fc2.weight", ("visual.merger.mlp.2.weight",), dim=1),
        Replicated("vision.merger.fc2.bias", ("visual.merger.mlp.2.bias",)),
    ]
    for i in range(args.num_layers):
        maps += _lm_layer(args, i)
    for i in range(args.vision.depth):
        maps += _vision_layer(args, i)
    return {m.megatron: m for m in maps}


def hf_names(args: Qwen25VLArgs) -> list[str]:
    """Every tensor name of the published HF checkpoint, each once."""
    names: dict[str, None] = {}
    for m in param_mappings(args, args.vocab_size).values():
        names.update(dict.fromkeys(m.hf))
    return list(names)


# Transformer Engine fuses the pre-attention and pre-MLP norms into the following linear layer.
_TE_NAMES = (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
             ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))
_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")


def local_to_global_name(name: str, layer_offset: int) -> str:
    """A model's own parameter name -> the mapping's name (global LM layer, local-spec norms)."""
    for local, te in _TE_NAMES:
        if name.endswith(te):
            name = name[: -len(te)] + local
    m = _LAYER.match(name)
    if m:
        name = f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"
    return name


def iter_model_mappings(model: torch.nn.Module, args: Qwen25VLArgs, padded_vocab: int,
                        layer_offset: int) -> Iterator[tuple[str, torch.nn.Parameter, ParamMapping]]:
    """(local name, parameter, mapping) for every parameter of one rank's model."""
    table = param_mappings(args, padded_vocab)
    for name, param in model.named_parameters():
        key = local_to_global_name(name, layer_offset)
        if key not in table:
            raise KeyError(f"model parameter {name!r} ({key!r}) has no Hugging Face mapping")
        yield name, param, table[key]


@torch.no_grad()
def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], args: Qwen25VLArgs,
                       *, padded_vocab: int, tp_rank: int, tp_size: int, layer_offset: int) -> None:
    """Copy HF tensors (either key layout) into one rank's model; every parameter must be filled."""
    state = {canonical_hf_name(k): v for k, v in hf_state.items()}
    for name, param, mapping in iter_model_mappings(model, args, padded_vocab, layer_offset):
        missing = [n for n in mapping.hf if n not in state]
        if missing:
            raise KeyError(f"HF state dict lacks {missing} needed for {name!r}")
        value = mapping.shard([state[n] for n in mapping.hf], tp_rank, tp_size)
        if value.shape != param.shape:
            raise ValueError(f"{name!r}: HF {mapping.hf} gives shape {tuple(value.shape)}, "
                             f"model expects {tuple(param.shape)}")
        param.copy_(value)
