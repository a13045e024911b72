import copy

import pytest

from megatron_vr1.config import load_model_conf, model_from_conf
from megatron_vr1.models.qwen2_5_vl import ConfigError, Qwen25VLArgs
from tiny import tiny_hf_config

SIZES = ["tiny", "toy", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"]


@pytest.mark.parametrize("name", SIZES)
def test_model_confs_parse_and_fit_their_layout(name):
    args, layout = model_from_conf(load_model_conf(name))
    assert args.vision.depth in (4, 32)
    assert layout.world_size >= 1


def test_published_shapes():
    a72, lay72 = model_from_conf(load_model_conf("qwen2_5_vl_72b"))
    assert (a72.hidden_size, a72.num_layers, a72.num_heads, a72.num_kv_heads) == (8192, 80, 64, 8)
    assert a72.vision.intermediate_size == 3456 and (lay72.tensor_parallel, lay72.pipeline_parallel) == (8, 4)
    a7, _ = model_from_conf(load_model_conf("qwen2_5_vl_7b"))
    assert (a7.hidden_size, a7.intermediate_size, a7.head_dim, a7.vocab_size) == (3584, 18944, 128, 152064)
    assert a7.mrope_section == (16, 24, 24) and a7.vision.intermediate_size == 3420
    a3, _ = model_from_conf(load_model_conf("qwen2_5_vl_3b"))
    assert a3.tie_word_embeddings and a3.vocab_size == 151936


def test_the_toy_model_fits_the_toy_tokenizer(toy_tokenizer_dir):
    """The toy config's special-token ids are where the toy tokenizer puts them."""
    from megatron_vr1.data import load_tokenizer

    args, _ = model_from_conf(load_model_conf("toy"))
    tok = load_tokenizer(toy_tokenizer_dir)
    assert len(tok) == args.vocab_size
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    assert ids == [args.image_token_id, args.video_token_id, args.vision_start_token_id, args.vision_end_token_id]
    text = "<think> 12 x 3 = 36 </think><answer> Final Answer: 36 </answer> 多模态"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # every byte is a token


def test_flat_and_nested_layouts_agree():
    """The published flat layout and what transformers 5 writes give the same arguments."""
    from transformers import Qwen2_5_VLConfig

    flat = tiny_hf_config(tied=True)
    nested = Qwen2_5_VLConfig(**copy.deepcopy(flat)).to_dict()
    assert "text_config" in nested
    assert Qwen25VLArgs.from_hf_config(flat) == Qwen25VLArgs.from_hf_config(nested)
    # and our own export reads back identically
    args = Qwen25VLArgs.from_hf_config(flat)
    assert Qwen25VLArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
        (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act"),
        (lambda c: c.update(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}), "mrope_section"),
        (lambda c: c.update(num_experts=8), "num_experts"),
        (lambda c: c["vision_config"].update(use_deepstack=True), "use_deepstack"),
        (lambda c: c.update(attention_bias=False), "attention_bias"),
        (lambda c: c.update(layer_types=["sliding_attention"] * 3), "layer_types"),
        (lambda c: c.update(model_type="qwen2_vl"), "model_type"),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
    ],
)
def test_architecture_changing_config_is_rejected(edit, message):
    cfg = tiny_hf_config()
    edit(cfg)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Qwen25VLArgs.from_hf_config(cfg)


def test_unknown_inert_key_can_be_allowed():
    cfg = tiny_hf_config()
    cfg["my_note"] = "hello"
    with pytest.raises(ConfigError, match="my_note"):
        Qwen25VLArgs.from_hf_config(cfg)
    assert Qwen25VLArgs.from_hf_config(cfg, strict=False).hidden_size == 64


@pytest.mark.parametrize(
    "tp, message",
    [(3, "num_attention_heads=4"), (4, "num_key_value_heads=2")],
)
def test_tensor_parallel_must_divide_heads_and_groups(tp, message):
    args = Qwen25VLArgs.from_hf_config(tiny_hf_config())
    with pytest.raises(ConfigError, match=message):
        args.check_parallel(tp)


def test_tensor_parallel_must_divide_vision_mlp():
    cfg = tiny_hf_config()
    cfg["vision_config"]["intermediate_size"] = 49
    args = Qwen25VLArgs.from_hf_config(cfg)
    with pytest.raises(ConfigError, match="vision intermediate_size=49"):
        args.check_parallel(2)


def test_uneven_pipeline_needs_a_valid_first_stage():
    args, _ = model_from_conf(load_model_conf("qwen2_5_vl_72b"))
    args.check_parallel(8, 4, 17)
    with pytest.raises(ConfigError, match="do not split evenly"):
        args.check_parallel(8, 4, 15)
    with pytest.raises(ConfigError, match="does not divide num_hidden_layers=80"):
        args.check_parallel(1, 3)


def test_bad_parallel_option_is_named():
    cfg = load_model_conf("tiny")
    cfg.parallel.tensor_paralel = 2
    with pytest.raises(ValueError, match="tensor_paralel"):
        model_from_conf(cfg)


def test_vocab_padding():
    args, _ = model_from_conf(load_model_conf("qwen2_5_vl_72b"))
    assert args.padded_vocab_size(8, 128) == 152576  # Megatron's habit: 152064 = 148.5 x 1024
    assert args.padded_vocab_size(8) == 152064  # ours: no padding where TP divides the vocab
    assert model_from_conf(load_model_conf("qwen2_5_vl_72b"))[1].make_vocab_size_divisible_by == 1


@pytest.mark.parametrize("config, argv, expected", [
    ("sft", ["train.learning_rate=1e-5"], r"^train.learning_rate is not an option of conf/sft.yaml \(check its "
                                          r"spelling\); train has .*\blr\b"),
    ("grpo", ["+plan.gpu_memory=80"], r"^plan.gpu_memory is not an option of conf/grpo.yaml .*plan has .*gpu_memory_gb"),
    ("grpo", ["+train.learning_rate=1e-5"], r"^train.learning_rate is not an option"),
    ("grpo", ["+seed2=3"], r"^seed2 is not an option of conf/grpo.yaml"),
    ("grpo", ["model=nosuch"], r"^no config model/nosuch.yaml: model= takes .*qwen2_5_vl_7b.*toy"),
    ("grpo", ["rl.stages=[{"], r"^no viable alternative at input"),
    ("eval", ["samples=2", "temprature=1"], r"^temprature is not an option of conf/eval.yaml"),
], ids=["typo", "added-typo", "added-beside-fixed-options", "added-top-level", "missing-config", "unparsable",
        "eval-typo"])
def test_a_command_line_hydra_cannot_honour_is_one_line(config, argv, expected):
    import re

    from megatron_vr1.entry import check_overrides

    problem = check_overrides(config, argv)
    assert problem is not None and re.search(expected, problem) and "\n" not in problem, problem


@pytest.mark.parametrize("config, argv", [
    ("grpo", ["+rl.engine_options.tensor_parallel=1", "rl.engine=megatron"]),  # an open section takes new keys
    ("grpo", ["recipe=grpo_7b", "train.lr=1e-5"]),
    ("sft", ["--help"]),  # Hydra's own flags are Hydra's
    ("demo", ["out=x", "hydra.run.dir=."]),
])
def test_a_command_line_hydra_can_honour_passes(config, argv):
    from megatron_vr1.entry import check_overrides

    assert check_overrides(config, argv) is None


def test_the_trainers_default_to_the_layer_spec_that_has_run():
    """backend=local unless asked: the Transformer Engine spec has not run on a GPU here yet."""
    from hydra import compose, initialize_config_dir

    from megatron_vr1.config import CONF_DIR

    for name in ("sft", "grpo"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            assert compose(name).backend == "local", name
