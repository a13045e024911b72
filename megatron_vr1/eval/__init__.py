"""Evaluation on MathVista, MathVerse and MM-Math: answer extraction, scoring, the runner."""

from .scoring import benchmark_of, categories_of, extract_answer, is_correct

__all__ = ["extract_answer", "is_correct", "benchmark_of", "categories_of"]
