"""Crash-safe files shared by the resumable entry points: append-only JSONL journals whose torn
last line (a kill mid-write) is cut off on reading, and files replaced whole."""

from __future__ import annotations

import json
import os
from pathlib import Path


def complete_jsonl(path: Path) -> list[dict]:
    """The rows of ``path``'s complete lines, in order; from the first torn or unreadable line on,
    the file is cut off (a journal is appended to, so only its end can be torn)."""
    if not path.exists():
        return []
    rows, keep = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(raw))
            except ValueError:
                break
            keep += len(raw)
    if keep != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return rows


def write_whole(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
