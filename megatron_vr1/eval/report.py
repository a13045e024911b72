"""Accuracy overall and by the benchmarks' own categories, and the published rows beside ours."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

# DESIGN.md, "The method, as published": accuracy (%) on MathVista (testmini), MathVerse
# (testmini) and MM-Math
PUBLISHED = {
    "Qwen2.5-VL-7B": {"mathvista": 68.1, "mathverse": 46.7, "mm-math": 34.1},
    "Vision-R1-7B": {"mathvista": 73.5, "mathverse": 52.4, "mm-math": 40.2},
    "Vision-R1-72B": {"mathvista": 78.2, "mathverse": 63.2, "mm-math": 59.3},
}
# per benchmark, the category fields its own report breaks accuracy down by
CATEGORY_FIELDS = {
    "mathvista": ("task", "skills", "question_type", "grade"),
    "mathverse": ("problem_version", "subject", "question_type"),
    "mm-math": ("difficulty", "difficult", "grade", "year", "knowledge", "category"),  # MM-Math says "difficult"
}


def _accuracy(rows: list[dict], key: str) -> dict:
    n = len(rows)
    return {"n": n, "accuracy": 100.0 * sum(bool(r[key]) for r in rows) / n if n else 0.0}


def summarise(rows: list[dict], settings: dict) -> dict:
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_bench[r["benchmark"]].append(r)
    out = {"settings": settings, "benchmarks": {}}
    for bench, items in sorted(by_bench.items()):
        by_record: dict[int, list[bool]] = defaultdict(list)
        for r in items:
            by_record[r["index"]].append(bool(r["correct_first_attempt"]))
        entry = {"overall": _accuracy(items, "correct_first_attempt"),
                 "overall_with_retries": _accuracy(items, "correct"),
                 "records": len(by_record),
                 # the share of records with a right answer among their samples (= accuracy at one sample)
                 "pass_at_k": 100.0 * sum(any(v) for v in by_record.values()) / max(len(by_record), 1),
                 "no_answer": sum(r["extraction"] is None for r in items),
                 "extracted_by_llm": sum(r.get("extraction_source") == "llm" for r in items), "categories": {}}
        for field in CATEGORY_FIELDS.get(bench, ()):
            groups: dict[str, list[dict]] = defaultdict(list)
            for r in items:
                values = r.get(field)
                for v in values if isinstance(values, list) else [values]:
                    if v is not None:
                        groups[str(v)].append(r)
            if groups:
                entry["categories"][field] = {k: _accuracy(v, "correct_first_attempt") for k, v in sorted(groups.items())}
        out["benchmarks"][bench] = entry
    return out


def write_summary(summary: dict, out_dir: Path) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "summary.md").write_text(summary_markdown(summary))


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"# Evaluation of `{s['checkpoint']}`", "",
             f"Data `{s['data']}`; engine {s['engine']}, temperature {s['temperature']}, top-p {s['top_p']}, "
             f"max new tokens {s['max_new_tokens']}, retries {s['retries']} (when `</answer>` is missing), "
             f"seed {s['seed']}, {s.get('samples', 1)} sample(s) per record.", ""]
    benches = summary["benchmarks"]
    k = s.get("samples", 1)
    lines += [f"| benchmark | records | samples | accuracy | with retries | pass@{k} | no answer |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for bench, e in benches.items():
        lines.append(f"| {bench} | {e['records']} | {e['overall']['n']} | {e['overall']['accuracy']:.1f} | "
                     f"{e['overall_with_retries']['accuracy']:.1f} | {e['pass_at_k']:.1f} | {e['no_answer']} |")
    published = [b for b in benches if any(b in row for row in PUBLISHED.values())]
    if published:
        lines += ["", "Published (Vision-R1 paper) beside ours, accuracy %:", "",
                  "| model | " + " | ".join(published) + " |", "| --- |" + " --- |" * len(published)]
        lines.append("| ours | " + " | ".join(f"{benches[b]['overall']['accuracy']:.1f}" for b in published) + " |")
        for model, row in PUBLISHED.items():
            lines.append(f"| {model} | " + " | ".join(f"{row[b]:.1f}" if b in row else "-" for b in published) + " |")
    for bench, e in benches.items():
        for field, groups in e["categories"].items():
            lines += ["", f"{bench} by {field}:", "", "| " + field + " | samples | accuracy |", "| --- | --- | --- |"]
            lines += [f"| {k} | {v['n']} | {v['accuracy']:.1f} |" for k, v in groups.items()]
    return "\n".join(lines) + "\n"
