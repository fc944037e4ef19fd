"""evaluation.html: samples and evaluation records -> one self-contained page.

The page is `template.html` with the report's data embedded as JSON; its script renders one page of samples
at a time (filters and search run over the data, not the document), so thousands of samples stay responsive.
Images are embedded as small JPEG thumbnails (data URIs) rather than copied next to the page: the report is
then one file that opens from disk in any browser, can be mailed or copied off a cluster as it is, and is
replaced whole (written to a temporary file and renamed), which a folder of copied images could not be.
A sample with many images (video frames) shows at most `MAX_IMAGES_SHOWN` of them, spread over the sequence,
smaller, so that a video set does not weigh more than a photo set.

Closed label sets: when the metric is exact match (accuracy) and the normalised references of the samples
take at most `MAX_CLASSES` values, and at most half as many values as there are samples (answers repeat,
as classes do: hateful memes' yes/no, NLVR2's true/false, UCF-101's action names, a conversation set of a
few labels), the page shows per-class accuracy and a confusion matrix for each evaluation; an answer outside
the set is counted in its own column.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data import Sample
from ..metrics import normalize_answer

TEMPLATE = Path(__file__).with_name("template.html")
DATA_PLACEHOLDER = "__REPORT_DATA__"
MAX_CLASSES = 128  # UCF-101's 101 actions fit
MAX_IMAGES_SHOWN = 4
THUMBNAIL_SIDE = 256  # pixels, longest side, for samples of one or two images
SMALL_THUMBNAIL_SIDE = 128  # for samples of more
THUMBNAIL_QUALITY = 72
MOST_FREQUENT_OUTSIDE = 10


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's results: `key` names it in the page ("before", "after"), `records` are the per-sample
    records of common/evaluation.py (index, id, prediction, references, score) in dataset order."""

    key: str
    label: str
    score: float | None
    records: list[dict]


def sample_view(sample: Sample) -> dict:
    """What the page shows of a sample besides its answers: the images, the question (the last user turn), the
    earlier turns and the system message."""
    last = sample.turns[-1]
    return {
        "id": sample.id,
        "images": thumbnails(sample.images),
        "image_count": len(sample.images),
        "system": sample.system,
        "history": [{"user": turn.user, "assistant": turn.assistant} for turn in sample.turns[:-1]],
        "question": last.user,
    }


def thumbnails(images: list[Image.Image]) -> list[str]:
    shown = images if len(images) <= MAX_IMAGES_SHOWN else [
        images[round(i * (len(images) - 1) / (MAX_IMAGES_SHOWN - 1))] for i in range(MAX_IMAGES_SHOWN)]
    side = THUMBNAIL_SIDE if len(shown) <= 2 else SMALL_THUMBNAIL_SIDE
    return [thumbnail(image, side) for image in shown]


def thumbnail(image: Image.Image, side: int) -> str:
    """A JPEG data URI of the image, its longest side at most `side` pixels."""
    small = image.convert("RGB")
    small.thumbnail((side, side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def label_set(references: list[str | None], metric_name: str) -> list[str] | None:
    """The classes of a closed label set (sorted normalised references), or None for open answers (see the
    module's docstring for the rule)."""
    given = [reference for reference in references if reference is not None]
    if metric_name != "accuracy" or not given:
        return None
    labels = sorted({normalize_answer(reference) for reference in given})
    return labels if len(labels) <= MAX_CLASSES and 2 * len(labels) <= len(given) else None


def confusion(labels: list[str], pairs: list[tuple[str, str]]) -> list[list[int]]:
    """rows: reference classes; columns: predicted classes, then one for answers outside the label set.
    `pairs`: (normalised reference, normalised prediction)."""
    position = {label: column for column, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for reference, prediction in pairs:
        matrix[position[reference]][position.get(prediction, len(labels))] += 1
    return matrix


def first_reference(references: list[str]) -> str | None:
    """The reference the metric compares with (the first), or None for a sample without one."""
    return references[0] if references and any(references) else None


def page_data(title: str, identity: dict, metric_name: str, views: list[dict], evaluations: list[Evaluation],
              curve: dict | None = None) -> dict:
    """The report's data: `views` (sample_view, in dataset order) joined with each evaluation's records by
    index; `curve`: {"points": [{"step", "score"}], "samples": K, "final_step": N} of the evaluations during
    training."""
    by_index = [{record["index"]: record for record in evaluation.records} for evaluation in evaluations]
    samples = []
    for index, view in enumerate(views):
        records = [(evaluation.key, found[index]) for evaluation, found in zip(evaluations, by_index, strict=True)
                   if index in found]
        references = records[0][1]["references"] if records else []
        samples.append({
            **view,
            "references": [reference for reference in references if reference],
            "answers": {key: {"text": record["prediction"],
                              "score": record["score"] if first_reference(references) is not None else None}
                        for key, record in records},
        })
    data = {
        "title": title,
        "identity": identity,
        "metric": metric_name,
        "evaluations": [{"key": e.key, "label": e.label, "score": e.score, "count": len(e.records)}
                        for e in evaluations],
        "curve": curve,
        "samples": samples,
        "labels": None,
    }
    labels = label_set([first_reference(sample["references"]) for sample in samples], metric_name)
    if labels is not None:
        data["labels"] = closed_set_results(labels, samples, evaluations)
    return data


def closed_set_results(labels: list[str], samples: list[dict], evaluations: list[Evaluation]) -> dict:
    """Per evaluation: the confusion matrix, per-class accuracy and the most frequent answers outside the set;
    per sample: its reference class and each answer's class (None outside the set)."""
    known = set(labels)
    results = {"classes": labels, "confusion": {}, "outside": {}}
    for sample in samples:
        reference = first_reference(sample["references"])
        sample["reference_class"] = normalize_answer(reference) if reference is not None else None
        for answer in sample["answers"].values():
            normalised = normalize_answer(answer["text"])
            answer["class"] = normalised if normalised in known else None
    scored = [sample for sample in samples if sample["reference_class"] is not None]
    for evaluation in evaluations:
        pairs = [(sample["reference_class"], normalize_answer(sample["answers"][evaluation.key]["text"]))
                 for sample in scored if evaluation.key in sample["answers"]]
        results["confusion"][evaluation.key] = confusion(labels, pairs)
        outside = Counter(prediction for _, prediction in pairs if prediction not in known)
        results["outside"][evaluation.key] = outside.most_common(MOST_FREQUENT_OUTSIDE)
    return results


def render(data: dict) -> str:
    """The page: the template with `data` as JSON (every `<` escaped, so no text in it can end the script)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return TEMPLATE.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, payload)


def write_page(path: Path, data: dict) -> Path:
    """Write the page whole: a temporary file renamed over the previous report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(render(data), encoding="utf-8")
    temporary.replace(path)
    return path
