"""Words for counts in what the project prints."""


def counted(n: int, word: str, plural: str | None = None) -> str:
    """``1 step``, ``2 steps``, ``0 ranks``."""
    return f"{n} {word if n == 1 else plural or word + 's'}"
