"""Offline demo data: small multimodal math problems drawn with PIL, with exact answers.

Four kinds: counting shapes, reading a bar chart, arithmetic written in the image, and a right
triangle or rectangle with labelled lengths; and the colour task, asked for by name. Written in the
project's formats: SFT samples with ``<think>``/``<answer>`` traces (ShareGPT JSON), RL records
(Geometry3K-style JSONL) and eval records (MathVista-style JSONL). Deterministic from the seed.

``sft_answers="shuffled"`` makes a cold start that teaches the format but not the task: each SFT
trace's final answer is another SFT problem's of the same kind, and its reasoning a fixed phrase
that says nothing about the image. Whatever the model then gets right, it learnt from the RL
reward.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .formats import format_choices

COLOURS = {"red": (220, 50, 47), "blue": (38, 139, 210), "green": (133, 153, 0), "orange": (203, 75, 22),
           "purple": (108, 113, 196)}
KINDS = ("count", "bar", "arithmetic", "geometry")  # the demo's mix; "colour" is there too, asked for by name


@dataclass
class Problem:
    kind: str
    image: Image.Image
    question: str
    answer: str
    reasoning: str
    choices: list[str] | None = None

    @property
    def blind_reasoning(self) -> str:
        """Reasoning that reveals nothing about this problem's image (the shuffled cold start's)."""
        return BLIND_REASONING.get(self.kind, "I read the image and work out the answer.")


def _canvas(w: int = 336, h: int = 252) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (w, h), (250, 250, 245))
    return img, ImageDraw.Draw(img)


def _count(rng: random.Random) -> Problem:
    img, d = _canvas()
    target = rng.choice(["circle", "square", "triangle"])
    counts = {s: rng.randint(0, 5) for s in ("circle", "square", "triangle")}
    counts[target] = max(1, counts[target])
    cells = rng.sample([(x, y) for x in range(8) for y in range(6)], sum(counts.values()))
    k = 0
    for shape, n in counts.items():
        for _ in range(n):
            cx, cy = cells[k][0] * 40 + 24, cells[k][1] * 40 + 24
            k += 1
            fill = rng.choice(list(COLOURS.values()))
            if shape == "circle":
                d.ellipse([cx - 14, cy - 14, cx + 14, cy + 14], fill=fill)
            elif shape == "square":
                d.rectangle([cx - 13, cy - 13, cx + 13, cy + 13], fill=fill)
            else:
                d.polygon([(cx, cy - 15), (cx - 15, cy + 13), (cx + 15, cy + 13)], fill=fill)
    n = counts[target]
    reasoning = (f"I scan the image row by row and count each {target}. "
                 f"There are {counts['circle']} circles, {counts['square']} squares and "
                 f"{counts['triangle']} triangles, so the number of {target}s is {n}.")
    return Problem("count", img, f"How many {target}s are in the image?", str(n), reasoning)


def _bar(rng: random.Random) -> Problem:
    img, d = _canvas()
    labels = ["A", "B", "C", "D", "E"][: rng.randint(3, 5)]
    values = [rng.randint(1, 9) for _ in labels]
    x0, y0, unit = 40, 222, 20
    d.line([x0, y0, x0, y0 - 10 * unit], fill=(0, 0, 0), width=2)
    d.line([x0, y0, 320, y0], fill=(0, 0, 0), width=2)
    for v in range(0, 11, 2):
        d.line([x0 - 5, y0 - v * unit, x0, y0 - v * unit], fill=(0, 0, 0))
        d.text((x0 - 25, y0 - v * unit - 6), str(v), fill=(0, 0, 0))
    for i, (lab, v) in enumerate(zip(labels, values)):
        left = x0 + 15 + i * 55
        d.rectangle([left, y0 - v * unit, left + 35, y0], fill=list(COLOURS.values())[i])
        d.text((left + 13, y0 + 6), lab, fill=(0, 0, 0))
    ask = rng.randrange(len(labels))
    if rng.random() < 0.5:
        question = f"What is the value of bar {labels[ask]} in the chart?"
        answer, reasoning = values[ask], f"Bar {labels[ask]} reaches the gridline at {values[ask]} on the y-axis."
    else:
        question = "What is the sum of all bar values in the chart?"
        answer = sum(values)
        reasoning = "Reading each bar against the y-axis: " + ", ".join(
            f"{lab}={v}" for lab, v in zip(labels, values)) + f". Their sum is {sum(values)}."
    return Problem("bar", img, question, str(answer), reasoning)


def _arithmetic(rng: random.Random) -> Problem:
    img, d = _canvas(336, 112)
    a, b = rng.randint(10, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "x"])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    d.text((40, 35), f"{a} {op} {b} = ?", fill=(0, 0, 0), font=ImageFont.load_default(size=36))
    name = {"+": "sum", "-": "difference", "x": "product"}[op]
    reasoning = f"The image shows {a} {op} {b}. The {name} of {a} and {b} is {value}."
    return Problem("arithmetic", img, "Compute the value of the expression written in the image.", str(value), reasoning)


def _geometry(rng: random.Random) -> Problem:
    img, d = _canvas()
    if rng.random() < 0.5:
        a, b, c = rng.choice([(3, 4, 5), (6, 8, 10), (5, 12, 13), (8, 15, 17), (9, 12, 15)])
        scale = 160 / max(a, b)
        p0, p1, p2 = (60, 220), (60, 220 - a * scale), (60 + b * scale, 220)
        d.polygon([p0, p1, p2], outline=(0, 0, 0))
        d.rectangle([60, 210, 70, 220], outline=(0, 0, 0))
        d.text((35, (p0[1] + p1[1]) / 2), str(a), fill=(0, 0, 0))
        d.text(((p0[0] + p2[0]) / 2, 228), str(b), fill=(0, 0, 0))
        d.text(((p1[0] + p2[0]) / 2 + 8, (p1[1] + p2[1]) / 2 - 12), "x", fill=(0, 0, 0))
        choices = sorted({c, c + 1, a + b, int(math.sqrt(a * b)) + 1} - {0})[:4]
        while len(choices) < 4:
            choices.append(choices[-1] + 2)
        reasoning = (f"The triangle has a right angle between the legs {a} and {b}, so by Pythagoras "
                     f"x = sqrt({a}^2 + {b}^2) = sqrt({a * a + b * b}) = {c}.")
        letter = "ABCD"[choices.index(c)]
        return Problem("geometry", img, "Find x, the length of the hypotenuse.", letter,
                       reasoning + f" That is option {letter}.", choices=[str(x) for x in choices])
    w, h = rng.randint(2, 12), rng.randint(2, 9)
    d.rectangle([60, 50, 60 + w * 18, 50 + h * 18], outline=(0, 0, 0), width=2)
    d.text((60 + w * 9, 32), str(w), fill=(0, 0, 0))
    d.text((40, 50 + h * 9), str(h), fill=(0, 0, 0))
    return Problem("geometry", img, "What is the area of the rectangle?", str(w * h),
                   f"The rectangle's sides are {w} and {h}, so its area is {w} x {h} = {w * h}.")


def _colour(rng: random.Random) -> Problem:
    """One large shape in one of three colours, on a small canvas: a task a tiny model can learn."""
    img, d = _canvas(112, 84)
    name = rng.choice(COLOUR_TASK)
    fill = COLOURS[name]
    if rng.random() < 0.5:
        d.ellipse([16, 6, 96, 78], fill=fill)
    else:
        d.rectangle([20, 10, 92, 74], fill=fill)
    return Problem("colour", img, "What colour is the shape?", name, f"The shape is filled with {name}.")


COLOUR_TASK = ("red", "green", "blue")
BLIND_REASONING = {"colour": "I look at the colour of the shape."}
SFT_ANSWERS = ("right", "shuffled")
# eval records carry MathVista's category fields, so that its report breaks accuracy down by them
MATHVISTA_CATEGORIES = {
    "count": ("visual question answering", ["arithmetic reasoning"]),
    "bar": ("figure question answering", ["statistical reasoning", "arithmetic reasoning"]),
    "arithmetic": ("math word problem", ["arithmetic reasoning"]),
    "geometry": ("geometry problem solving", ["geometry reasoning", "arithmetic reasoning"]),
    "colour": ("visual question answering", ["visual recognition"]),
}
_MAKERS = {"count": _count, "bar": _bar, "arithmetic": _arithmetic, "geometry": _geometry, "colour": _colour}
ALL_KINDS = tuple(_MAKERS)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text the demo data is made of (questions, reasoning, answers, the chat template's words),
    from which the toy tokenizer learns its merges."""
    from .template import DEFAULT_SYSTEM_PROMPT

    rng = random.Random(seed)
    texts = [DEFAULT_SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", "Choices:\nA. B. C. D.",
             "0 1 2 3 4 5 6 7 8 9 10 100 -", "Final Answer:", "<think> </think><answer> </answer>"]
    for i in range(n):
        p = _MAKERS[ALL_KINDS[i % len(ALL_KINDS)]](rng)
        texts += [question_text(p), answer_text(p)]
    return texts


def answer_text(p: Problem, answer: str | None = None, reasoning: str | None = None) -> str:
    return f"<think> {reasoning or p.reasoning} </think><answer> Final Answer: {answer or p.answer} </answer>"


def question_text(p: Problem) -> str:
    return format_choices(p.question, p.choices)


def generate(out_dir: str | Path, *, n_sft: int = 64, n_rl: int = 64, n_eval: int = 32, seed: int = 0,
             kinds: tuple[str, ...] = KINDS, sft_answers: str = "right") -> dict:
    """Write ``images/``, ``sft.json``, ``rl.jsonl`` and ``eval.jsonl`` under ``out_dir``, cycling
    through the problem ``kinds``. ``sft_answers``: ``right`` (traces that solve their problem) or
    ``shuffled`` (the format without the task, see the module's docstring)."""
    unknown = set(kinds) - set(_MAKERS)
    if unknown or not kinds:
        raise ValueError(f"unknown demo problem kinds {sorted(unknown)}; known: {sorted(_MAKERS)}")
    if sft_answers not in SFT_ANSWERS:
        raise ValueError(f"sft_answers must be one of {SFT_ANSWERS}, got {sft_answers!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}

    def make(split: str, i: int) -> tuple[Problem, str]:
        p = _MAKERS[kinds[i % len(kinds)]](rng)
        rel = f"images/{split}_{i:05d}.png"
        p.image.save(out / rel)
        return p, rel

    problems = [make("sft", i) for i in range(n_sft)]
    answers = [p.answer for p, _ in problems]
    if sft_answers == "shuffled":  # within each kind, so every answer stays one the kind can have
        for kind in kinds:
            idx = [i for i, (p, _) in enumerate(problems) if p.kind == kind]
            for i, j in zip(idx, random.Random(seed + 1).sample(idx, len(idx))):
                answers[i] = problems[j][0].answer
    sft = []
    for i, ((p, rel), answer) in enumerate(zip(problems, answers)):
        text = answer_text(p) if sft_answers == "right" else answer_text(p, answer, p.blind_reasoning)
        sft.append({"id": f"sft-{i}", "messages": [{"role": "user", "content": "<image>" + question_text(p)},
                                                   {"role": "assistant", "content": text}],
                    "images": [rel]})
    (out / "sft.json").write_text(json.dumps(sft, indent=1))
    with open(out / "rl.jsonl", "w") as f:
        for i in range(n_rl):
            p, rel = make("rl", i)
            f.write(json.dumps({"id": f"rl-{i}", "problem": "<image>" + question_text(p), "images": [rel],
                                "answer": p.answer, "kind": p.kind}) + "\n")
    with open(out / "eval.jsonl", "w") as f:
        for i in range(n_eval):
            p, rel = make("eval", i)
            task, skills = MATHVISTA_CATEGORIES[p.kind]
            # MathVista's gold answer to a multiple-choice question is the choice's text, not its letter
            gold = p.choices["ABCDEFGH".index(p.answer)] if p.choices else p.answer
            numeric = not p.choices and gold.lstrip("-").isdigit()
            f.write(json.dumps({"id": f"eval-{i}", "question": p.question, "image": rel, "answer": gold,
                                "choices": p.choices, "question_type": "multi_choice" if p.choices else "free_form",
                                "answer_type": "integer" if numeric else "text",
                                "kind": p.kind, "metadata": {"task": task, "skills": skills}}) + "\n")
    counts.update(sft=n_sft, rl=n_rl, eval=n_eval)
    return counts
