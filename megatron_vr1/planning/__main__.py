"""``python -m megatron_vr1.planning ...``: the memory planner, as ``tools/plan.py`` (an installed
wheel has no tools/ folder)."""

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

from .cli import console_main  # noqa: E402

if __name__ == "__main__":
    console_main()
