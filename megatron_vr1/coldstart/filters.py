"""Reading a reasoner's reply and the rule-based filters, each with the reason it drops for."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

_FINAL = re.compile(r"Final Answer\s*[:：]\s*(.+)", re.IGNORECASE)


@dataclass
class FilterSettings:
    min_think_words: int = 20
    max_think_words: int = 6000
    repetition_ngram: int = 12     # words in an n-gram
    repetition_max: int = 3        # an n-gram seen more often than this is repetition
    # (regex, replacement) applied to the thinking, in order: references to the text description
    # the reasoner read become references to the image the SFT model will see
    description_rewrites: list = field(default_factory=list)
    description_leftover: str = r"\bdescri(?:ption|bed|bes)\b"  # still there after the rewrites: dropped


@dataclass
class Parsed:
    think: Optional[str]
    answer: Optional[str]
    reason: Optional[str]  # why it cannot be used, else None


def _boxed(text: str) -> list[str]:
    out, start = [], text.find("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed{") - 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[i + 1:j].strip())
                break
        start = text.find("\\boxed{", start + 1)
    return out


def final_answers(text: str) -> list[str]:
    """The distinct final answers a text states ("Final Answer: X" lines and ``\\boxed{X}``)."""
    found = []
    for m in _FINAL.finditer(text):
        value = m.group(1).strip()
        boxed = _boxed(value)
        found.append(boxed[0] if boxed else value)
    found += _boxed(_FINAL.sub("", text))
    seen = []
    for a in found:
        a = a.strip().strip("$").rstrip(".").strip()
        if a and a not in seen:
            seen.append(a)
    return seen


def parse_reply(content: str, reasoning: Optional[str]) -> Parsed:
    """The thinking and the final answer of a DeepSeek-R1 style reply: the thinking in the
    ``reasoning_content`` field or inline in ``<think>...</think>`` (a lone ``</think>`` closes a
    think part the chat template opened), the answer as "Final Answer: X" or ``\\boxed{X}``."""
    if reasoning and reasoning.strip():
        think, rest = reasoning.strip(), content
    elif "</think>" in content:
        before, _, rest = content.partition("</think>")
        think = before.split("<think>", 1)[-1].strip()
        if "<think>" in rest or "</think>" in rest:
            return Parsed(None, None, "broken_think")
    elif "<think>" in content:
        return Parsed(None, None, "unclosed_think")
    else:
        return Parsed(None, None, "no_think")
    if not think:
        return Parsed(None, None, "no_think")
    answers = final_answers(rest)
    if not answers:
        return Parsed(think, None, "no_answer")
    if len(answers) > 1:
        return Parsed(think, None, "multiple_answers")
    return Parsed(think, answers[0], None)


def is_repetitive(text: str, n: int, max_count: int) -> bool:
    words = text.split()
    if len(words) < n:
        return False
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(counts.values()) > max_count


def rewrite_description(think: str, settings: FilterSettings) -> str:
    for pattern, replacement in settings.description_rewrites:
        think = re.sub(pattern, replacement, think, flags=re.IGNORECASE)
    return think


def check_thinking(think: str, settings: FilterSettings) -> tuple[Optional[str], str]:
    """``(reason to drop or None, the thinking after the rewrites)``."""
    if is_repetitive(think, settings.repetition_ngram, settings.repetition_max):
        return "repetition", think
    words = len(think.split())
    if words < settings.min_think_words:
        return "too_short", think
    if words > settings.max_think_words:
        return "too_long", think
    think = rewrite_description(think, settings)
    if re.search(settings.description_leftover, think, flags=re.IGNORECASE):
        return "mentions_description", think
    return None, think
