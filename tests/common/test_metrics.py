"""common/metrics.py: the recipe's normalised accuracy, DocVQA's ANLS (the recipe's and the challenge's), the
edit distance under it, and the eval reports' layouts."""

import pytest

from common.metrics import (
    ACCURACY,
    ACCURACY_BY_ID,
    ANLS,
    accuracy,
    anls,
    anls_case_insensitive,
    levenshtein,
    normalize_answer,
    strip_prediction,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Yes. ", "yes"),
        ("No", "no"),
        ("BabyCrawling\n", "babycrawling"),
        ("...True...", "true"),
        ("3.5", "3.5"),  # inner periods stay
        ("  ", ""),
        ("Mr. Smith", "mr. smith"),
    ],
)
def test_normalize_answer_is_the_recipes(text, expected):
    # the recipe: text.strip().strip('.') then lowercase
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abcd", 4),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("abc", "abc", 0),
        ("abc", "acb", 2),
        ("intention", "execution", 5),
        ("a", "b", 1),
    ],
)
def test_levenshtein_known_values(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_accuracy_normalises_both_sides():
    predictions = [" Yes.", "no", "Archery", "maybe", "1999."]
    references = ["yes", "No.", "archery", "yes", "1999"]
    assert accuracy(predictions, references) == pytest.approx(4 / 5)


def test_accuracy_is_exact_match_not_containment():
    assert accuracy(["yes it is"], ["yes"]) == 0.0
    assert accuracy(["yes"], ["yes it is"]) == 0.0


def test_accuracy_empty_prediction_matches_only_an_empty_reference():
    assert accuracy([""], ["yes"]) == 0.0
    assert accuracy([" . "], [""]) == 1.0  # both normalise to ""


def test_accuracy_extremes():
    assert accuracy(["a", "b"], ["a", "b"]) == 1.0
    assert accuracy(["a", "b"], ["b", "a"]) == 0.0


def test_strip_prediction_keeps_case_and_inner_periods():
    assert strip_prediction(" 1999. ") == "1999"
    assert strip_prediction("Mr. Smith.") == "Mr. Smith"
    assert strip_prediction("...") == ""


def test_anls_exact_match_is_one():
    assert anls(["Invoice"], [["Invoice"]]) == 1.0


def test_anls_one_typo_in_ten_characters():
    assert anls(["abcdefghij"], [["abcdefghiX"]]) == pytest.approx(0.9)


def test_anls_is_zero_from_half_the_length_on():
    assert anls(["abcd"], [["abXY"]]) == 0.0  # distance 2/4 = 0.5: not below the threshold
    assert anls(["abcd"], [["abcY"]]) == pytest.approx(0.75)  # 1/4 < 0.5 counts
    assert anls(["abcdefghij"], [["zzzzzzzzzz"]]) == 0.0


def test_anls_takes_the_best_reference():
    assert anls(["abcdefghij"], [["zzzzzzzzzz", "abcdefghiX", "abcdefXXXX"]]) == pytest.approx(0.9)


def test_recipe_anls_keeps_case_and_compares_as_given():
    """The recipe strips the prediction (`strip_prediction`) before scoring; references stay as given."""
    assert anls(["total amount"], [["TOTAL AMOUNT"]]) == 0.0
    assert anls(["Total"], [["total"]]) == pytest.approx(0.8)
    assert anls([strip_prediction("1999.")], [["1999"]]) == 1.0
    assert anls(["1999"], [["1999."]]) == pytest.approx(0.8)  # a reference's period is not stripped


def test_challenge_anls_ignores_case_and_surrounding_space():
    assert anls_case_insensitive(["TOTAL Amount"], [["  total amount "]]) == 1.0
    assert anls_case_insensitive(["Total"], [["totaL"]]) == 1.0
    assert anls_case_insensitive(["abcd"], [["ABXY"]]) == 0.0


def test_anls_empty_strings():
    assert anls([""], [["answer"]]) == 0.0  # an empty prediction earns nothing
    assert anls([""], [[""]]) == 0.0  # not even against an empty reference (the recipe skips it)
    assert anls(["answer"], [[""]]) == 0.0
    assert anls(["answer"], [[]]) == 0.0  # no accepted answer
    assert anls_case_insensitive(["  "], [["x"]]) == 0.0


def test_anls_averages_over_questions():
    predictions = ["abcdefghij", "Yes", "wrong"]
    references = [["abcdefghiX"], ["Yes"], ["right"]]
    assert anls(predictions, references) == pytest.approx((0.9 + 1.0 + 0.0) / 3)


def test_anls_threshold_is_configurable():
    assert anls(["abcd"], [["abXY"]], threshold=0.6) == pytest.approx(0.5)


def test_reports_have_the_recipes_keys_and_value_types():
    ids, predictions = ["a", "b"], [" Yes.", "No "]
    memes = ACCURACY.report(ids, predictions, [["yes"], ["Yes."]])
    assert memes == {"answers_unique": ["yes", "yes"], "generated_texts_unique": ["yes", "no"], "accuracy": 0.5}
    ucf = ACCURACY_BY_ID.report(ids, predictions, [["Yes"], ["no"]])
    assert ucf == {
        "answers_unique": [{"id": "a", "answer": "yes"}, {"id": "b", "answer": "no"}],
        "generated_texts_unique": [{"id": "a", "generated_text": "yes"}, {"id": "b", "generated_text": "no"}],
        "accuracy": 1.0,
    }
    docvqa = ANLS.report(ids, [" 1999.", "total"], [["1999", "1999."], ["Total"]])
    assert docvqa["answers_unique"] == [["1999", "1999."], ["Total"]]
    assert docvqa["generated_texts_unique"] == ["1999", "total"]
    assert docvqa["anls"] == pytest.approx((1.0 + 0.8) / 2)
    assert docvqa["anls_case_insensitive"] == 1.0
    assert list(docvqa) == ["answers_unique", "generated_texts_unique", "anls", "anls_case_insensitive"]
    assert (ACCURACY.name, ACCURACY_BY_ID.name, ANLS.name) == ("accuracy", "accuracy", "anls")
