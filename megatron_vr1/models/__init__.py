"""Model definitions (one folder per model family)."""
