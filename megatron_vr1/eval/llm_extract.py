"""Optional answer extraction by a language model behind an OpenAI-compatible endpoint, as the
benchmarks' own scripts do (MathVista and MathVerse ask a GPT model to pull the answer out of a
free-form response). Off by default: Vision-R1's responses carry ``<answer>`` tags, which the rules
of :func:`..scoring.extract_answer` read. In ``fallback`` mode only responses the rules cannot read
go to the model; in ``always`` mode every response does.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError

INSTRUCTION = (
    "You read a model's response to a math question and report the final answer it gives.\n"
    "Reply with the answer alone: a number, an expression, a word, or for a multiple-choice question the "
    "option's letter. Copy it as the response states it; do not solve the question yourself. If the response "
    "gives no final answer, reply None.")
EXAMPLES = [
    ("How many circles are in the image?", "I count the circles one by one: there are 4 of them.", "4"),
    ("Which angle is largest?\nChoices:\nA. 30\nB. 60\nC. 90", "The right angle is the largest, option C.", "C"),
    ("What is the area of the triangle?", "The base is 6 and the height 3, so the area is \\frac{6 \\cdot 3}{2} = 9.",
     "9"),
    ("What is the value of x?", "We need more information to find x, so I", "None"),
]


@dataclass
class ExtractorSettings:
    base_url: Optional[str] = None   # e.g. http://localhost:8000/v1; null: no LLM extraction
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (a local server takes any)
    mode: str = "fallback"           # fallback: only responses the rules cannot read; always: every one
    temperature: float = 0.0
    max_tokens: int = 64
    timeout: float = 60.0            # seconds per request
    max_retries: int = 4             # with back-off, honouring Retry-After (the openai client's)
    concurrency: int = 8             # requests in flight

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


def question_of(record: dict) -> str:
    """The question as the model saw it: MathVista's ``query``, else the question with its choices."""
    if record.get("query"):
        return str(record["query"])
    text = str(record.get("question") or record.get("problem") or "")
    choices = record.get("choices") or []
    return text + "".join(f"\n{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


def settings_from(options: Optional[dict]) -> ExtractorSettings:
    known = set(ExtractorSettings.__dataclass_fields__)
    unknown = set(options or {}) - known
    if unknown:
        raise UsageError(f"llm_extractor has unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    return ExtractorSettings(**(options or {}))


def prompt(question: str, response: str) -> list[dict]:
    shots = "\n\n".join(f"Question: {q}\nResponse: {r}\nAnswer: {a}" for q, r, a in EXAMPLES)
    return [{"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": f"{shots}\n\nQuestion: {question}\nResponse: {response}\nAnswer:"}]


class LLMExtractor:
    def __init__(self, settings: ExtractorSettings) -> None:
        from openai import OpenAI

        if settings.mode not in ("fallback", "always"):
            raise UsageError(f"llm_extractor.mode must be fallback or always, got {settings.mode!r}")
        if not settings.model:
            raise UsageError("llm_extractor.model is not set: name the model the endpoint serves")
        self.settings = settings
        self.client = OpenAI(base_url=settings.base_url, api_key=os.environ.get(settings.api_key_env) or "none",
                             timeout=settings.timeout, max_retries=settings.max_retries)

    def wanted(self, rule_extraction: Optional[str]) -> bool:
        return self.settings.mode == "always" or rule_extraction is None

    def _one(self, question: str, response: str) -> Optional[str]:
        reply = self.client.chat.completions.create(model=self.settings.model, messages=prompt(question, response),
                                                    temperature=self.settings.temperature,
                                                    max_tokens=self.settings.max_tokens)
        text = (reply.choices[0].message.content or "").strip()
        text = text.removeprefix("Answer:").strip().splitlines()[0].strip() if text else ""
        return None if not text or text.lower() in ("none", "null", "n/a") else text

    def extract(self, items: list[tuple[str, str]]) -> list[Optional[str]]:
        """The answers in ``(question, response)`` pairs, asked concurrently."""
        from openai import OpenAIError

        if not items:
            return []
        try:
            with ThreadPoolExecutor(max_workers=max(1, int(self.settings.concurrency))) as pool:
                return list(pool.map(lambda qr: self._one(*qr), items))
        except OpenAIError as e:
            raise UsageError(f"llm_extractor at {self.settings.base_url} (model {self.settings.model}) failed after "
                             f"{self.settings.max_retries} retries: {type(e).__name__}: {e}") from e
