"""The recipe's metrics: normalised exact-match accuracy and DocVQA's ANLS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def normalize_answer(text: str) -> str:
    """The recipe's normalisation: strip whitespace, then periods, then lowercase."""
    return text.strip().strip(".").lower()


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Share of predictions equal to one of their references after `normalize_answer`."""
    hits = sum(
        normalize_answer(prediction) in {normalize_answer(r) for r in refs}
        for prediction, refs in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def anls(predictions: list[str], references: list[list[str]], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity: per question the best 1 - distance / max length over all
    reference answers (0 when the normalised distance is not below `threshold`), averaged."""
    total = 0.0
    for prediction, refs in zip(predictions, references, strict=True):
        prediction = prediction.strip().lower()
        best = 0.0
        for reference in refs:
            reference = reference.strip().lower()
            longest = max(len(prediction), len(reference))
            distance = levenshtein(prediction, reference) / longest if longest else 0.0
            best = max(best, 1.0 - distance if distance < threshold else 0.0)
        total += best
    return total / len(predictions)


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[list[str], list[list[str]]], float]


ACCURACY = Metric("accuracy", accuracy)
ANLS = Metric("anls", anls)
