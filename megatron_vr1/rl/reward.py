"""Vision-R1's hard formatting result reward (HFRRF): 1 only for a well-formed response whose
final answer is right, else 0.

Well-formed: exactly one ``<think>...</think>`` followed by exactly one ``<answer>...</answer>``,
with nothing but whitespace around and between them. The answer (after an optional "Final
Answer:") is right when math-verify or mathruler's grader says so; a multiple-choice letter is
compared as a letter, with or without parentheses. Model text is parsed, never evaluated as
code.

Every score has a hard time limit. Scoring runs in worker processes (math-verify's own timeouts
use SIGALRM, which only works in a main thread, and a huge integer power cannot be interrupted
from inside at all): a worker past its deadline is killed and replaced, and the response scores 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_FINAL = re.compile(r"^\s*final\s+answer\s*[:：]?\s*", re.IGNORECASE)
_LETTER = re.compile(r"^\s*(?:option\s+)?\(?([A-Za-z])\)?(?=$|[\s.:)，,])", re.IGNORECASE)
_GOLD_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\.?\s*$")
MAX_ANSWER_CHARS = 2000  # no real final answer is longer; longer text is not worth a parser's time
# exponent towers and huge literals make sympy compute enormous integers in C, where no signal
# reaches it: such an answer is wrong without parsing (a right answer is never written so)
_PATHOLOGICAL = re.compile(r"(\^|\*\*)\s*[({]?\s*[\d.]+\s*[)}]?\s*(\^|\*\*)|\d{200}")
DEFAULT_TIMEOUT = 1.0


@dataclass(frozen=True)
class RewardInfo:
    reward: float
    format_ok: bool
    correct: bool
    timed_out: bool = False


def answer_of(response: str) -> Optional[str]:
    """The final answer of a well-formed response (without "Final Answer:"), or None."""
    if any(response.count(tag) != 1 for tag in TAGS):
        return None
    m = _FORMAT.fullmatch(response)
    if m is None:
        return None
    return _FINAL.sub("", m.group("answer"), count=1).strip()


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> Optional[str]:
    """The content of the last ``<answer>...</answer>`` (without "Final Answer:"); failing that,
    of the last ``\\boxed{...}``; failing that, None. Lenient: the format is not checked."""
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return _FINAL.sub("", tags[-1], count=1).strip()
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(response)):
        depth += {"{": 1, "}": -1}.get(response[j], 0)
        if depth == 0:
            return response[i + 1:j].strip()
    return None


def choice_letter(text: str) -> Optional[str]:
    m = _LETTER.match(text)
    return m.group(1).upper() if m else None


def is_equivalent(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` states ``gold``: a multiple-choice letter as a letter, anything else
    through math-verify, with mathruler's grader as a second opinion. No time limit of its own."""
    prediction, gold = prediction.strip(), str(gold).strip()
    if not prediction or len(prediction) > MAX_ANSWER_CHARS or _PATHOLOGICAL.search(prediction):
        return False
    letter = _GOLD_LETTER.match(gold)
    if letter:
        return choice_letter(prediction) == letter.group(1).upper()
    return _math_verify(prediction, gold) or _mathruler(prediction, gold)


def _math_verify(prediction: str, gold: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": ours is outside
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        target = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
        if not target:
            target = parse(gold, extraction_config=config, parsing_timeout=None)
        for text in (f"${prediction}$", prediction):
            guess = parse(text, extraction_config=config, parsing_timeout=None)
            if guess and verify(target, guess, timeout_seconds=None):
                return True
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError, AttributeError, IndexError):
        return False
    return False


def _mathruler(prediction: str, gold: str) -> bool:
    from mathruler.grader import grade_answer

    try:
        return bool(grade_answer(prediction, gold))
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError, AttributeError, IndexError,
            SyntaxError):
        return False


def score(response: str, answer: str) -> RewardInfo:
    """The reward of one response, without a time limit (:class:`RewardPool` adds it).
    ``correct`` judges the answer wherever it is (:func:`extract_answer`), format or not; the
    reward needs both."""
    formatted = answer_of(response)
    predicted = formatted if formatted is not None else extract_answer(response)
    correct = predicted is not None and is_equivalent(predicted, answer)
    ok = formatted is not None
    return RewardInfo(1.0 if ok and correct else 0.0, ok, correct)


# ---------------------------------------------------------------------------------------------
def _worker(conn, soft_timeout: float) -> None:
    """A scoring process: answers ``(index, response, answer)`` with ``(index, RewardInfo)``. Its
    own alarm stops most slow parses early; the parent kills it when even that does not help."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle

    def expire(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, expire)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, answer = task
        signal.setitimer(signal.ITIMER_REAL, soft_timeout)
        try:
            info = score(response, answer)
        except TimeoutError:
            info = RewardInfo(0.0, answer_of(response) is not None, False, timed_out=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send((index, info))


class RewardPool:
    """Worker processes that score responses, each call bounded by ``timeout`` seconds (a response
    whose worker misses the deadline by ``grace`` is killed, the worker replaced, the score 0)."""

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT, grace: float = 0.2) -> None:
        if workers < 1 or timeout <= 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self.timeout, self.grace = timeout, grace
        self._ctx = mp.get_context("fork")  # no re-import of the caller's main module
        self._workers = [self._start() for _ in range(workers)]
        self._lock = threading.Lock()
        self.timeouts = 0  # responses killed at the hard deadline, over the pool's life

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self.timeout), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def _replace(self, k: int) -> None:
        proc, conn = self._workers[k]
        proc.kill()
        proc.join()
        conn.close()
        self._workers[k] = self._start()

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> list[RewardInfo]:
        """Scores of ``responses`` against ``answers``, in order."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        with self._lock:
            return self._score(list(responses), [str(a) for a in answers])

    def _score(self, responses: list[str], answers: list[str]) -> list[RewardInfo]:
        results: list[Optional[RewardInfo]] = [None] * len(responses)
        todo = list(range(len(responses)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (task, deadline)
        while todo or busy:
            for k in range(len(self._workers)):
                if k not in busy and todo:
                    i = todo.pop()
                    self._workers[k][1].send((i, responses[i], answers[i]))
                    busy[k] = (i, time.monotonic() + self.timeout + self.grace)
            conns = {self._workers[k][1]: k for k in busy}
            ready = mp.connection.wait(list(conns), timeout=0.05)
            for conn in ready:
                k = conns[conn]
                try:
                    i, info = conn.recv()
                except (EOFError, OSError):  # the worker died: score 0 and replace it
                    i, info = busy[k][0], RewardInfo(0.0, answer_of(responses[busy[k][0]]) is not None, False, True)
                    self._replace(k)
                results[i] = info
                del busy[k]
            now = time.monotonic()
            for k, (i, deadline) in list(busy.items()):
                if now > deadline:
                    results[i] = RewardInfo(0.0, answer_of(responses[i]) is not None, False, timed_out=True)
                    self.timeouts += 1
                    self._replace(k)
                    del busy[k]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default_pool: Optional[RewardPool] = None
_default_pid: Optional[int] = None


def _pool() -> RewardPool:
    global _default_pool, _default_pid
    if _default_pool is None or _default_pid != os.getpid():
        _default_pool, _default_pid = RewardPool(workers=1), os.getpid()
    return _default_pool


def hard_format_result_reward(response: str, answer: str) -> float:
    """1.0 if ``response`` is ``<think>...</think><answer>...</answer>`` (whitespace around and
    between only) and its answer equals ``answer``, else 0.0; at most about a second per call."""
    return _pool().score([response], [answer])[0].reward
