"""Answer extraction and scoring for MathVista, MathVerse and MM-Math, on their released records.

- MathVista (``pid``, ``question_type`` ``multi_choice`` / ``free_form``, ``answer_type``,
  ``choices``, ``precision``) follows its official ``calculate_score`` rules: a multiple-choice
  prediction that is a letter, or starts with "(B)", maps to that choice's text, any other text to
  the nearest choice by edit distance; integers compare as ``str(int(float(x)))``, floats as
  ``str(round(float(x), precision))``; then string equality with the gold answer.
- MathVerse (``problem_version``, ``question_type`` ``multi-choice`` / ``free-form``): multiple
  choice by letter (or by a choice's text, the choices read from the question); free form through
  the reward's verifier.
- MM-Math and anything else: through the reward's verifier (math-verify, then mathruler).
"""

from __future__ import annotations

import re
from typing import Optional

from ..rl.reward import choice_letter, extract_answer, is_equivalent

__all__ = ["extract_answer", "is_correct", "benchmark_of", "categories_of"]

_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")
# "A: 30°", "A. 30°", "(A) 30°", "A) 30°" at the start of a line of a MathVerse question
_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])\s*[).:：]\s*(.+?)\s*$", re.MULTILINE)


def benchmark_of(record: dict) -> str:
    """``mathvista``, ``mathverse`` or ``mm-math``: from a ``benchmark`` field, else the record's shape."""
    name = re.sub(r"[-_\s]", "", str(record.get("benchmark", "")).lower())
    if name:
        return {"mmmath": "mm-math"}.get(name, name)
    if "problem_version" in record:
        return "mathverse"
    if record.get("question_type") in ("multi_choice", "free_form"):  # MathVista's spelling
        return "mathvista"
    return "mm-math"


def is_correct(prediction: Optional[str], record: dict) -> bool:
    """Whether an extracted answer (:func:`extract_answer`) is right for a benchmark record."""
    if prediction is None or not str(prediction).strip():
        return False
    prediction = str(prediction).strip()
    bench = benchmark_of(record)
    if bench == "mathvista":
        return _mathvista_correct(prediction, record)
    if bench == "mathverse":
        return _mathverse_correct(prediction, record)
    return is_equivalent(prediction, str(record["answer"]))


def categories_of(record: dict) -> dict[str, object]:
    """The benchmark's own category fields of a record (kept in the per-sample output)."""
    bench = benchmark_of(record)
    if bench == "mathvista":
        meta = record.get("metadata") or {}
        return {"question_type": record.get("question_type"), "answer_type": record.get("answer_type"),
                "task": meta.get("task"), "skills": list(meta.get("skills") or []),
                "category": meta.get("category"), "grade": meta.get("grade"), "context": meta.get("context")}
    if bench == "mathverse":
        meta = record.get("metadata") or {}
        return {"problem_version": record.get("problem_version"), "question_type": record.get("question_type"),
                "subject": meta.get("subject"), "subfield": meta.get("subfield")}
    return {key: record[key] for key in ("difficulty", "difficult", "grade", "year", "knowledge", "category")
            if key in record}


# ---- MathVista

def normalize_mathvista(extraction: str, record: dict) -> Optional[str]:
    """MathVista's normalisation of an extracted answer (``None`` when it cannot be read)."""
    if record.get("question_type") == "multi_choice":
        choices = [str(c) for c in record.get("choices") or []]
        if not choices:
            return None
        text = extraction.strip()
        letter = _PAREN_LETTER.findall(text)
        if letter:
            text = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if text in letters:
            return choices[letters.index(text)]
        return min(choices, key=lambda choice: edit_distance(text, choice))
    answer_type = record.get("answer_type")
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(record.get("precision") or 0)))
    except (ValueError, OverflowError, TypeError):
        return None
    return extraction


def _mathvista_correct(prediction: str, record: dict) -> bool:
    return normalize_mathvista(prediction, record) == str(record["answer"])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ---- MathVerse

def mathverse_choices(record: dict) -> dict[str, str]:
    """Letter -> choice text, read from the question (MathVerse puts the choices there)."""
    text = str(record.get("question") or record.get("query_wo") or "")
    if "choice" in text.lower():
        text = text[text.lower().rindex("choice"):]
    return {letter: choice for letter, choice in _CHOICE_LINE.findall(text)}


def _mathverse_correct(prediction: str, record: dict) -> bool:
    gold = str(record["answer"]).strip()
    if str(record.get("question_type", "")).replace("_", "-") != "multi-choice":
        return is_equivalent(prediction, gold)
    gold_letter = choice_letter(gold)
    letter = choice_letter(prediction)
    if letter is not None:  # "B", "(B)", "B: 45°", "Option B"
        return letter == gold_letter
    # the choice's text instead of its letter
    choices = mathverse_choices(record)
    text = choices.get(gold_letter or "")
    return bool(text) and (_plain(prediction) == _plain(text) or is_equivalent(prediction, text))


def _plain(text: str) -> str:
    return re.sub(r"\s+", "", text).rstrip(".").lower()
