"""common/metrics.py: the recipe's normalised accuracy, DocVQA's ANLS and the edit distance under it."""

import pytest

from common.metrics import ACCURACY, ANLS, accuracy, anls, levenshtein, normalize_answer


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


def test_accuracy_normalises_and_accepts_any_reference():
    predictions = [" Yes.", "no", "Archery", "maybe"]
    references = [["yes"], ["No."], ["Basketball", "archery"], ["yes", "no"]]
    assert accuracy(predictions, references) == pytest.approx(3 / 4)


def test_accuracy_is_exact_match_not_containment():
    assert accuracy(["yes it is"], [["yes"]]) == 0.0
    assert accuracy(["yes"], [["yes it is"]]) == 0.0


def test_accuracy_extremes():
    assert accuracy(["a", "b"], [["a"], ["b"]]) == 1.0
    assert accuracy(["a", "b"], [["b"], ["a"]]) == 0.0


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


def test_anls_is_case_and_surrounding_space_insensitive():
    assert anls(["  TOTAL Amount "], [["total amount"]]) == 1.0


def test_anls_empty_strings():
    assert anls([""], [["answer"]]) == 0.0  # an empty prediction earns nothing
    assert anls(["answer"], [[""]]) == 0.0
    assert anls([""], [[""]]) == 1.0  # no division by zero


def test_anls_averages_over_questions():
    predictions = ["abcdefghij", "yes", "wrong"]
    references = [["abcdefghiX"], ["Yes"], ["right"]]
    assert anls(predictions, references) == pytest.approx((0.9 + 1.0 + 0.0) / 3)


def test_anls_threshold_is_configurable():
    assert anls(["abcd"], [["abXY"]], threshold=0.6) == pytest.approx(0.5)


def test_metric_objects():
    assert (ACCURACY.name, ACCURACY.compute) == ("accuracy", accuracy)
    assert (ANLS.name, ANLS.compute) == ("anls", anls)
