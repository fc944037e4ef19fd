"""common/report/page.py: what evaluation.html holds (samples joined with their answers, thumbnails, closed
label sets, confusion matrices) and, in headless Chromium, what it shows: filters, search, a confusion cell,
pages, without console errors."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from common.data import Sample, Turn
from common.metrics import normalize_answer
from common.report.page import (
    MAX_IMAGES_SHOWN,
    SMALL_THUMBNAIL_SIDE,
    THUMBNAIL_SIDE,
    Evaluation,
    confusion,
    label_set,
    page_data,
    sample_view,
    thumbnails,
    write_page,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def embedded_data(path: Path) -> dict:
    """The data a report page embeds, as the page's script reads it."""
    found = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    return json.loads(found.group(1))


def decoded(data_uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert data_uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix):])))


# ---- closed label sets -----------------------------------------------------------------------------


def test_a_closed_label_set_is_exact_match_on_answers_that_repeat():
    assert label_set(["Yes", "no.", "yes", "No"], "accuracy") == ["no", "yes"]  # normalised, sorted
    assert label_set(["a", "b", "c", "a", "b", "c"], "accuracy") == ["a", "b", "c"]  # two samples per class
    assert label_set(["a", "b", "c", "a", "b"], "accuracy") is None  # fewer: open answers
    assert label_set(["yes", "no", "yes", "no"], "anls") is None  # ANLS scores free text
    assert label_set([None, None], "accuracy") is None  # no reference at all (predict.py without answers)
    assert label_set([f"class {i % 129}" for i in range(1000)], "accuracy") is None  # more than MAX_CLASSES
    assert len(label_set([f"class {i % 101}" for i in range(1000)], "accuracy")) == 101  # UCF-101


def test_the_confusion_matrix_counts_answers_outside_the_set_apart():
    pairs = [("no", "no"), ("no", "yes"), ("yes", "yes"), ("yes", "maybe"), ("yes", ""), ("no", "no")]
    assert confusion(["no", "yes"], pairs) == [[2, 1, 0], [0, 1, 2]]


# ---- samples ------------------------------------------------------------------------------------------


def test_thumbnails_are_small_jpegs_and_frames_are_spread_over_the_sequence():
    (big,) = thumbnails([Image.new("RGB", (1000, 500), COLOURS["red"])])
    assert decoded(big).size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)
    frames = [Image.new("RGB", (64, 48), (10 * i, 0, 0)) for i in range(8)]
    shown = thumbnails(frames)
    assert len(shown) == MAX_IMAGES_SHOWN
    assert [decoded(uri).getpixel((5, 5))[0] // 10 for uri in shown] == pytest.approx([0, 2, 5, 7], abs=1)
    small = thumbnails([Image.new("RGBA", (600, 600)), Image.new("L", (20, 20)), Image.new("RGB", (600, 300))])
    assert [decoded(uri).size for uri in small] == [(SMALL_THUMBNAIL_SIDE,) * 2, (20, 20),
                                                    (SMALL_THUMBNAIL_SIDE, SMALL_THUMBNAIL_SIDE // 2)]


def test_a_view_folds_earlier_turns_and_shows_the_last_question():
    sample = Sample("chat", [Turn("What is it?", "A square.", [Image.new("RGB", (8, 8))]),
                             Turn("Which colour?", "red")], system="Be brief.")
    view = sample_view(sample)
    assert view["question"] == "Which colour?" and view["system"] == "Be brief."
    assert view["history"] == [{"user": "What is it?", "assistant": "A square."}]
    assert view["image_count"] == len(view["images"]) == 1


def colour_samples(count: int) -> list[Sample]:
    names = list(COLOURS)
    return [Sample(f"val-{i}", [Turn("Which colour is this?", names[i % 3],
                                     [Image.new("RGB", (40, 30), COLOURS[names[i % 3]])])]) for i in range(count)]


def records(samples: list[Sample], answers: list[str]) -> list[dict]:
    return [{"index": i, "id": sample.id, "prediction": answer, "references": sample.references,
             "score": float(normalize_answer(answer) == normalize_answer(sample.references[0]))}
            for i, (sample, answer) in enumerate(zip(samples, answers, strict=True))]


def before_answers(count: int) -> list[str]:
    """Right on every fourth sample; else an answer outside the label set ("purple") or another colour."""
    names = list(COLOURS)
    return [names[i % 3] if i % 4 == 0 else "purple" if i % 2 else names[(i + 1) % 3] for i in range(count)]


def after_answers(count: int) -> list[str]:
    """Right but on every fifth sample (a wrong colour there), as generated: capitalised, a period."""
    names = list(COLOURS)
    return [f"{names[(i + (i % 5 == 0)) % 3].capitalize()}." for i in range(count)]


def build_page(path: Path, count: int) -> tuple[Path, list[Sample]]:
    samples = colour_samples(count)
    before, after = records(samples, before_answers(count)), records(samples, after_answers(count))
    evaluations = [Evaluation(key, f"{key} training", sum(r["score"] for r in rows) / count, rows)
                   for key, rows in (("before", before), ("after", after))]
    curve = {"points": [{"step": 5, "score": 0.5}, {"step": 10, "score": 0.75}], "samples": 40, "final_step": 12}
    identity = {"task": "colours", "model": "tiny", "strategy": "LoRA", "data": "/data/colours"}
    data = page_data("colours · LoRA", identity, "accuracy", [sample_view(s) for s in samples], evaluations, curve)
    return write_page(path, data), samples


def test_the_page_holds_every_sample_with_its_answers_and_the_confusion_of_each_evaluation(tmp_path):
    path, samples = build_page(tmp_path / "evaluation.html", 12)
    data = embedded_data(path)
    assert [s["id"] for s in data["samples"]] == [s.id for s in samples]
    assert [s["references"] for s in data["samples"]] == [s.references for s in samples]
    assert [s["answers"]["before"]["text"] for s in data["samples"]] == before_answers(12)
    assert [s["answers"]["after"]["text"] for s in data["samples"]] == after_answers(12)
    assert all(decoded(s["images"][0]).size == (40, 30) for s in data["samples"])
    labels = data["labels"]
    assert labels["classes"] == ["blue", "green", "red"]
    for key, answers in (("before", before_answers(12)), ("after", after_answers(12))):
        pairs = [(normalize_answer(s.references[0]), normalize_answer(a)) for s, a in zip(samples, answers, strict=True)]
        assert labels["confusion"][key] == confusion(labels["classes"], pairs)
    assert labels["outside"]["before"] == [["purple", 6]] and labels["outside"]["after"] == []
    assert [e["score"] for e in data["evaluations"]] == [3 / 12, 9 / 12]


def test_no_text_of_the_data_can_end_the_pages_script(tmp_path):
    sample = Sample("x", [Turn("</script><script>window.injected = 1</script>", "<b>no</b>")])
    rows = records([sample], ["</SCRIPT> <!--"])
    path = write_page(tmp_path / "page.html", page_data("t", {}, "anls", [sample_view(sample)],
                                                         [Evaluation("answer", "answer", 0.0, rows)]))
    assert path.read_text().count("</script>") == 2  # the data's and the code's own
    assert embedded_data(path)["samples"][0]["question"] == sample.turns[0].user
    assert not list(tmp_path.glob("*.tmp"))


# ---- in the browser -------------------------------------------------------------------------------------


def shown_ids(page) -> list[str]:
    return page.locator("article.sample").evaluate_all("cards => cards.map(card => card.dataset.id)")


def test_the_page_filters_searches_and_pages_in_a_browser(browser, tmp_path):
    count = 130
    path, samples = build_page(tmp_path / "evaluation.html", count)
    data = embedded_data(path)
    after = {s["id"]: s["answers"]["after"]["score"] for s in data["samples"]}
    before = {s["id"]: s["answers"]["before"]["score"] for s in data["samples"]}
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(path.as_uri())
        assert page.locator("#count").inner_text() == f"{count} of {count} samples"
        assert shown_ids(page) == [s.id for s in samples[:50]]  # the first page only
        page.click("#next")
        assert shown_ids(page)[0] == samples[50].id

        page.select_option("#filter", "wrong")
        wrong = [i for i, score in after.items() if score < 1]
        assert shown_ids(page) == wrong[:50] and page.locator("#count").inner_text().startswith(f"{len(wrong)} of")
        page.select_option("#filter", "broken")
        assert shown_ids(page) == [i for i in after if after[i] < before[i]]
        assert page.locator("article.sample .tag.broken").count() == len(shown_ids(page)) > 0

        page.select_option("#filter", "all")
        page.fill("#search", "VAL-12")  # ids, questions, references and answers, any case
        page.wait_for_function("document.querySelector('#count').textContent.startsWith('11 of')")
        assert shown_ids(page) == ["val-12", *(f"val-{i}" for i in range(120, 130))]
        page.fill("#search", "purple")
        purple = [s["id"] for s in data["samples"] if s["answers"]["before"]["text"] == "purple"]
        page.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{len(purple)} of')")
        assert shown_ids(page) == purple[:50]
        page.fill("#search", "")
        page.wait_for_function(f"document.querySelector('#count').textContent.startsWith('{count} of')")

        # the cell "red -> outside" of the matrix before training: the red samples answered "purple"
        cell = page.locator('table.matrix[data-evaluation="before"] td[title="red → outside the label set: '
                            f'{sum(1 for s in data["samples"] if s["reference_class"] == "red" and s["answers"]["before"]["class"] is None)}"]')
        cell.click()
        expected = [s["id"] for s in data["samples"]
                    if s["reference_class"] == "red" and s["answers"]["before"]["text"] == "purple"]
        assert shown_ids(page) == expected and expected
        assert all(page.locator(f'article[data-id="{i}"] [data-evaluation="before"]').inner_text().endswith("purple")
                   for i in expected)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        assert not errors, errors
    finally:
        page.close()
