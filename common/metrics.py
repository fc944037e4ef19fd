"""The recipe's metrics and the layout of its eval_before.json / eval_after.json, per task.

Every report has the recipe's keys: `answers_unique` (references), `generated_texts_unique` (predictions)
and the score under the metric's name, in the value types the recipe's scripts write:
- accuracy (hateful memes, NLVR2): flat lists of normalised strings;
- accuracy by id (UCF-101, and custom conversations with --metric accuracy): lists of `{"id", "answer"}` and
  `{"id", "generated_text"}`, normalised;
- ANLS (DocVQA): the reference answer lists as given and the predictions stripped of whitespace and
  periods; plus `anls_case_insensitive`, the DocVQA challenge's figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ANLS_THRESHOLD = 0.5


def strip_prediction(text: str) -> str:
    """What the recipe's DocVQA evaluation keeps of a generation: case kept, whitespace and periods stripped."""
    return text.strip().strip(".")


def normalize_answer(text: str) -> str:
    """The recipe's normalisation for exact match: strip whitespace, then periods, then lowercase."""
    return strip_prediction(text).lower()


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference, both normalised (`normalize_answer`)."""
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def _similarity(reference: str, prediction: str, threshold: float) -> float:
    longest = max(len(reference), len(prediction))
    distance = levenshtein(reference, prediction) / longest if longest else 0.0
    return 1.0 - distance if distance < threshold else 0.0


def anls(predictions: list[str], references: list[list[str]], threshold: float = ANLS_THRESHOLD) -> float:
    """The recipe's ANLS: per question the best 1 - normalised edit distance over the accepted answers (0 from
    `threshold` on), averaged; predictions compared as given (the caller strips them), case kept, and an
    empty prediction scores 0."""
    total = 0.0
    for prediction, refs in zip(predictions, references, strict=True):
        if prediction:
            total += max((_similarity(reference, prediction, threshold) for reference in refs), default=0.0)
    return total / len(predictions)


def anls_case_insensitive(predictions: list[str], references: list[list[str]]) -> float:
    """The DocVQA challenge's ANLS: both sides lower-cased and stripped of surrounding whitespace."""
    return anls(
        [p.strip().lower() for p in predictions], [[r.strip().lower() for r in refs] for refs in references]
    )


# ---- reports: the recipe's eval JSON per task ---------------------------------------------------------


def accuracy_report(ids: list[str], predictions: list[str], references: list[list[str]]) -> dict:
    answers = [normalize_answer(refs[0]) for refs in references]
    generated = [normalize_answer(p) for p in predictions]
    return {"answers_unique": answers, "generated_texts_unique": generated, "accuracy": accuracy(generated, answers)}


def accuracy_by_id_report(ids: list[str], predictions: list[str], references: list[list[str]]) -> dict:
    answers = [{"id": i, "answer": normalize_answer(refs[0])} for i, refs in zip(ids, references, strict=True)]
    generated = [{"id": i, "generated_text": normalize_answer(p)} for i, p in zip(ids, predictions, strict=True)]
    score = accuracy([g["generated_text"] for g in generated], [a["answer"] for a in answers])
    return {"answers_unique": answers, "generated_texts_unique": generated, "accuracy": score}


def anls_report(ids: list[str], predictions: list[str], references: list[list[str]]) -> dict:
    generated = [strip_prediction(p) for p in predictions]
    answers = [list(refs) for refs in references]
    return {
        "answers_unique": answers,
        "generated_texts_unique": generated,
        "anls": anls(generated, answers),
        "anls_case_insensitive": anls_case_insensitive(generated, answers),
    }


@dataclass(frozen=True)
class Metric:
    """`name` is the report's headline key; `report(ids, predictions, references)` the whole report."""

    name: str
    report: Callable[[list[str], list[str], list[list[str]]], dict]


ACCURACY = Metric("accuracy", accuracy_report)
ACCURACY_BY_ID = Metric("accuracy", accuracy_by_id_report)
ANLS = Metric("anls", anls_report)

# --metric: what a custom conversation's generated last answer is compared with the reference by
METRICS = {"accuracy": ACCURACY_BY_ID, "anls": ANLS}
