"""Vision-R1's hard formatting result reward (HFRRF): 1 only for a well-formed response whose
final answer is right, else 0.

Well-formed: exactly one ``<think>...</think>`` followed by exactly one ``<answer>...</answer>``,
with nothing but whitespace around and between them, and (``require_final_answer``, the default)
the answer introduced by ``Final Answer:`` as Vision-R1's cold-start data writes it and its
evaluation's pattern ``<answer> Final Answer:(.*?) </answer>`` reads it.

Right (:func:`is_equivalent`), because RL optimises exactly what this pays for:
- a multiple-choice letter is compared as a letter, with or without parentheses; naming a second
  option (``A or B``) is wrong;
- a word answer is compared as words (case, surrounding whitespace, a trailing full stop and
  ``\text{...}`` wrappers aside): math-verify would read ``erd`` as the product ``e*r*d`` and
  accept it for ``red``;
- mathematics goes to math-verify, with mathruler's grader as a second opinion, once the answer
  is a single candidate: a hedge (``5 or 6``, ``5, 6``, a set, ``\pm 4``, two boxes) is wrong
  unless the gold answer is itself such a list; ``x = 2`` counts for ``2``, ``6 = 5`` does not;
  words inside a mathematical answer must be the gold's words, in order (units aside).
Model text is parsed, never evaluated as code.

Every score has a hard time limit. Scoring runs in worker processes (math-verify's own timeouts
use SIGALRM, which only works in a main thread, and a huge integer power cannot be interrupted
from inside at all): a worker past its deadline is killed and replaced, and the response scores 0.
The limit is in the worker's CPU seconds, not wall seconds: a right answer is paid on a busy node
as on an idle one (a reward that depends on the machine's load is noise the policy learns from).
A wall-clock backstop (``wall_limit``) still frees a worker that stalls without using its CPU.
The verifiers are imported and warmed up in the pool's own process before any worker forks, and
a worker takes no response before it says it is ready: no deadline counts a cold start.
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
_FINAL_STRICT = re.compile(r"^\s*Final Answer:\s*")  # Vision-R1's spelling, as its evaluation matches it
_LETTER = re.compile(r"^\s*(?:option\s+)?\(?([A-Za-z])\)?(?=$|[\s.:)，,])", re.IGNORECASE)
_GOLD_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\.?\s*$")
MAX_ANSWER_CHARS = 2000  # no real final answer is longer; longer text is not worth a parser's time
# exponent towers and huge literals make sympy compute enormous integers in C, where no signal
# reaches it: such an answer is wrong without parsing (a right answer is never written so)
_PATHOLOGICAL = re.compile(r"(\^|\*\*)\s*[({]?\s*[\d.]+\s*[)}]?\s*(\^|\*\*)|\d{200}")
DEFAULT_TIMEOUT = 1.0

# ---- what an answer says, before any verifier sees it
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_WORD_ANSWER = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")  # letters only, after normalisation
_RUN = re.compile(r"[A-Za-z]{2,}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
# words that may stand beside a number without changing what it says: units and written-out maths
_NEUTRAL_WORDS = frozenset("""
    cm mm km in inch inches ft feet foot yd yard yards mi mile miles kg mg lb lbs oz ml litre litres liter liters
    meter meters metre metres centimeter centimeters centimetre centimetres millimeter millimeters kilometer
    kilometers gram grams kilogram kilograms sec second seconds min minute minutes hr hrs hour hours day days
    week weeks month months year years deg degree degrees rad radian radians unit units sq square cubic
    percent dollar dollars cent cents mph kmh
    sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt lim max gcd lcm mod det
    pi infty infinity inf
""".split())
_MATH_WORDS = frozenset({"pi", "infty", "infinity", "inf"})  # a word answer that is mathematics
_HEDGE_WORDS = re.compile(r"(?<![A-Za-z\\])(?:or|and|either)(?![A-Za-z])", re.IGNORECASE)
_PLUS_MINUS = re.compile(r"\\pm|\\mp|±|∓")
_SET = re.compile(r"\\\{|\\left\\\{|\\lbrace")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_OPTION = re.compile(r"(?:^|[\s,;/&(]|\bor\b|\band\b)\(?([A-H])\)?(?=$|[\s,;/.&):])")
_RELATION = re.compile(r"[<>≤≥≠]|\\(?:le|ge|leq|geq|neq|ne|lt|gt|leqslant|geqslant)(?![A-Za-z])")
_ASSIGNED = re.compile(r"^(?P<lhs>[^=<>]*?)\s*=\s*(?P<rhs>[^=]*)$")


@dataclass
class RewardSettings:
    """``rl.reward``: the scoring pool, the format rule, and a diagnostic control."""

    workers: int = 4
    timeout: float = DEFAULT_TIMEOUT  # seconds per response, hard
    require_final_answer: bool = True  # the answer follows "Final Answer:", as Vision-R1's evaluation reads it
    shuffle: bool = False  # pay each response another's reward from the same batch: a run without signal
    warn_timeout_share: float = 0.05  # warn on a step where more responses than this share timed out
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the budget's last tokens; 0: off
    overlong_penalty: float = 1.0  # its size at the budget


@dataclass(frozen=True)
class RewardInfo:
    reward: float
    format_ok: bool
    correct: bool
    timed_out: bool = False


def answer_of(response: str, require_final_answer: bool = True) -> Optional[str]:
    """The final answer of a well-formed response (without "Final Answer:"), or None.
    ``require_final_answer``: the answer must follow ``Final Answer:`` (Vision-R1's spelling)."""
    if any(response.count(tag) != 1 for tag in TAGS):
        return None
    m = _FORMAT.fullmatch(response)
    if m is None:
        return None
    body = m.group("answer")
    if require_final_answer:
        final = _FINAL_STRICT.match(body)
        return None if final is None else body[final.end():].strip()
    return _FINAL.sub("", body, count=1).strip()


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


def normalise_text(text: str) -> str:
    """An answer as text: ``\\text{}``-style wrappers and ``$`` removed, lower case, whitespace
    collapsed, no trailing full stop."""
    text = str(text)
    for _ in range(3):  # nested wrappers
        text = _WRAPPER.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text.replace("$", "")).strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def is_word_answer(text: str) -> bool:
    """Whether a normalised answer is words (``red``, ``light blue``, ``yes``), not mathematics: a
    single letter is a variable or an option, and ``pi`` is a number."""
    return bool(_WORD_ANSWER.fullmatch(text)) and bool(_RUN.search(text)) and text not in _MATH_WORDS


def words_of(text: str) -> list[str]:
    """The words of a mathematical answer, in order: runs of two or more letters outside LaTeX
    commands, units and written-out functions left out."""
    plain = _COMMAND.sub(" ", _WRAPPER.sub(r" \1 ", str(text)))
    return [w for w in (r.lower() for r in _RUN.findall(plain)) if w not in _NEUTRAL_WORDS]


def candidates(text: str) -> int:
    """How many answers ``text`` names: more than one for ``A or B``, ``5, 6`` and ``5; 6``
    (outside brackets; ``1,000`` is one number), a set, ``\\pm``, two boxes or LaTeX lines."""
    if _HEDGE_WORDS.search(_COMMAND.sub(" ", text)) or _PLUS_MINUS.search(text) or text.count("\\boxed") > 1 \
            or "\\\\" in text or "\\lor" in text or "\\cup" in text:
        return 2
    if _SET.search(text) and "," in text:
        return 2
    depth, parts = 0, 1
    for ch in _THOUSANDS.sub("", text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch in ",;" and depth == 0:
            parts += 1
    return parts


def _value_of(prediction: str) -> Optional[str]:
    """``x = 2`` -> ``2``: an answer given as an assignment to a name. None when the left side holds
    a number (``6 = 5`` says nothing of 5); the answer itself when there is no ``=``."""
    m = _ASSIGNED.match(prediction)
    if m is None:
        return prediction
    lhs = _WRAPPER.sub(r"\1", m.group("lhs"))
    lhs = re.sub(r"_\{[^{}]*\}|_\w", "", lhs)  # subscripts may hold digits: x_1 = 5
    return None if re.search(r"\d", lhs) or not m.group("rhs").strip() else m.group("rhs").strip()


def is_equivalent(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` states ``gold`` and nothing else (see the module's docstring). No
    time limit of its own."""
    prediction, gold = prediction.strip(), str(gold).strip()
    if not prediction or len(prediction) > MAX_ANSWER_CHARS or _PATHOLOGICAL.search(prediction):
        return False
    letter = _GOLD_LETTER.match(gold)
    if letter:
        chosen = choice_letter(prediction)
        rest = prediction[_LETTER.match(prediction).end():] if chosen else ""
        others = {m.upper() for m in _OPTION.findall(rest)} - {chosen}
        return chosen == letter.group(1).upper() and not others
    said, wanted = normalise_text(prediction), normalise_text(gold)
    if said == wanted:
        return True
    if is_word_answer(said) or is_word_answer(wanted):
        return False  # words compare as words: a verifier would multiply their letters
    if _RELATION.search(prediction) and not _RELATION.search(gold):
        return False  # "x > 5" is not "5"
    if "=" not in gold:
        value = _value_of(prediction)
        if value is None:
            return False
        prediction = value
    if candidates(prediction) > 1 and candidates(gold) == 1:
        return False  # a hedge names the answer among others
    if words_of(prediction) != words_of(gold):
        return False
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


def score(response: str, answer: str, require_final_answer: bool = True) -> RewardInfo:
    """The reward of one response, without a time limit (:class:`RewardPool` adds it).
    ``correct`` judges the answer wherever it is (:func:`extract_answer`), format or not; the
    reward needs both."""
    formatted = answer_of(response, require_final_answer)
    predicted = formatted if formatted is not None else extract_answer(response)
    correct = predicted is not None and is_equivalent(predicted, answer)
    ok = formatted is not None
    return RewardInfo(1.0 if ok and correct else 0.0, ok, correct)


_WARM_UP = [("<think> a </think><answer> Final Answer: \\frac{1}{2} </answer>", "0.5"),
            ("<think> a </think><answer> Final Answer: x = 2 </answer>", "2"),
            ("<think> a </think><answer> Final Answer: (B) </answer>", "B")]


def warm_up() -> None:
    """Import the verifiers and run each once (their parsers build grammars and caches on first
    use): done before forking, every worker starts warm."""
    for response, answer in _WARM_UP:
        score(response, answer)


# ---------------------------------------------------------------------------------------------
READY = "ready"


def _worker(conn, soft_timeout: float, require_final_answer: bool) -> None:
    """A scoring process: says it is ready, then answers ``(index, response, answer)`` with
    ``(index, RewardInfo)``. Its own alarm stops most slow parses early; the parent kills it when
    even that does not help."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle

    def expire(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGPROF, expire)
    conn.send(READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, answer = task
        signal.setitimer(signal.ITIMER_PROF, soft_timeout)  # this process's CPU time, not the wall's
        try:
            info = score(response, answer, require_final_answer)
        except TimeoutError:
            info = RewardInfo(0.0, answer_of(response, require_final_answer) is not None, False, timed_out=True)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        conn.send((index, info))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU seconds a process has used (Linux's /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


class RewardPool:
    """Worker processes that score responses, each response bounded by ``timeout`` CPU seconds of
    its worker (a response whose worker has used ``timeout + grace`` is killed, the worker
    replaced, the score 0 and counted in ``timeouts``; where a process's CPU time cannot be read,
    wall seconds stand in). ``wall_limit`` (default ``10 * timeout``) is the backstop in wall
    seconds, for a worker that stalls without using CPU. Workers fork from a process that has
    imported and run the verifiers, and each is ready before it gets a response: its start-up
    never counts against a deadline. ``require_final_answer``: see :func:`answer_of`."""

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT, grace: float = 0.2, *,
                 require_final_answer: bool = True, start_timeout: float = 300.0,
                 wall_limit: Optional[float] = None) -> None:
        if workers < 1 or timeout <= 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self.timeout, self.grace, self.require_final_answer = timeout, grace, require_final_answer
        self.wall_limit = 10 * timeout if wall_limit is None else wall_limit
        if self.wall_limit < timeout + grace:
            raise ValueError(f"wall_limit {self.wall_limit} is below timeout + grace ({timeout + grace})")
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("fork")  # no re-import of the caller's main module; inherits the warm-up
        warm_up()
        self._workers: list = []
        for _ in range(workers):
            self._workers.append(self._start())
        self._lock = threading.Lock()
        self.timeouts = 0  # responses that ran out of time, over the pool's life

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self.timeout, self.require_final_answer), daemon=True)
        proc.start()
        child.close()
        # the deadline of a response counts from when a ready worker takes it, never from a fork
        if not parent.poll(self.start_timeout) or parent.recv() != READY:
            proc.kill()
            self.close()
            raise RuntimeError(f"a reward worker did not start within {self.start_timeout:.0f} s")
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

    def _timed_out(self, response: str) -> RewardInfo:
        self.timeouts += 1
        return RewardInfo(0.0, answer_of(response, self.require_final_answer) is not None, False, timed_out=True)

    def _score(self, responses: list[str], answers: list[str]) -> list[RewardInfo]:
        results: list[Optional[RewardInfo]] = [None] * len(responses)
        todo = list(range(len(responses)))[::-1]
        busy: dict[int, tuple[int, float, Optional[float]]] = {}  # worker -> (task, start, its CPU then)
        while todo or busy:
            for k in range(len(self._workers)):
                if k not in busy and todo:
                    i = todo.pop()
                    busy[k] = (i, time.monotonic(), _cpu_seconds(self._workers[k][0].pid))
                    self._workers[k][1].send((i, responses[i], answers[i]))
            conns = {self._workers[k][1]: k for k in busy}
            ready = mp.connection.wait(list(conns), timeout=0.05)
            for conn in ready:
                k = conns[conn]
                try:
                    i, info = conn.recv()
                    if info.timed_out:  # the worker's own alarm
                        self.timeouts += 1
                except (EOFError, OSError):  # the worker died: score 0 and replace it
                    i = busy[k][0]
                    info = self._timed_out(responses[i])
                    self._replace(k)
                results[i] = info
                del busy[k]
            now = time.monotonic()
            for k, (i, start, cpu_start) in list(busy.items()):
                if self._past_deadline(k, now - start, cpu_start):
                    results[i] = self._timed_out(responses[i])
                    self._replace(k)
                    del busy[k]
        return results  # type: ignore[return-value]

    def _past_deadline(self, k: int, wall: float, cpu_start: Optional[float]) -> bool:
        limit = self.timeout + self.grace
        if wall <= limit:  # CPU time never runs ahead of the wall's on one thread
            return False
        if wall > self.wall_limit:
            return True
        cpu_now = _cpu_seconds(self._workers[k][0].pid)
        if cpu_start is None or cpu_now is None:
            return True
        return cpu_now - cpu_start > limit

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


def overlong_shaping(length: int, *, budget: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``budget - buffer`` tokens,
    then falling linearly to ``-factor`` at the budget (``((budget - buffer) - length) / buffer``,
    times ``factor``); ``-factor`` past it. ``buffer`` 0: no shaping."""
    if buffer <= 0 or length <= budget - buffer:
        return 0.0
    if length > budget:
        return -factor
    return factor * ((budget - buffer) - length) / buffer


def timeout_warning(step: int, infos: Sequence[RewardInfo], settings: RewardSettings) -> Optional[str]:
    """A warning line when more of a step's responses than ``warn_timeout_share`` ran out of
    scoring time (each was paid 0, whatever it said)."""
    timeouts = sum(i.timed_out for i in infos)
    if not infos or timeouts <= settings.warn_timeout_share * len(infos):
        return None
    return (f"grpo: warning: step {step}: {timeouts} of {len(infos)} responses ran out of the {settings.timeout:g} s "
            f"scoring time and were paid 0; raise rl.reward.timeout or rl.reward.workers")


def hard_format_result_reward(response: str, answer: str) -> float:
    """1.0 if ``response`` is ``<think>...</think><answer> Final Answer: X </answer>`` (whitespace
    around and between only) and X states ``answer``, else 0.0; at most about a second per call."""
    return _pool().score([response], [answer])[0].reward
