import math

import pytest

from train.answers import extract_boxed, is_correct, to_number


@pytest.mark.parametrize(
    "text, value",
    [
        ("80", 80),
        ("5 \\sqrt { 3 }", 5 * math.sqrt(3)),
        ("\\frac { 7 } { 2 }", 3.5),
        ("2 \\pi", 2 * math.pi),
        ("\\frac { 5 \\sqrt { 2 } } { 2 }", 5 * math.sqrt(2) / 2),
        ("14.5", 14.5),
        ("Answer: \\boxed{12}", 12),
        ("x = 13", 13),
        ("45^\\circ", 45),
        ("\\sqrt[3]{27}", 3),
        ("-4", -4),
    ],
)
def test_values(text, value):
    assert to_number(text) == pytest.approx(value)


def test_matching():
    assert is_correct("The answer is \\boxed{5\\sqrt{3}}", "5 \\sqrt { 3 }")
    assert is_correct("8.6603<|im_end|>", "5 \\sqrt { 3 }")
    assert not is_correct("8.66", "5 \\sqrt { 3 }")
    assert not is_correct("81", "80")
    assert not is_correct("", "80")
    assert is_correct("AB", "A B")  # not a number: compared as normalised text
    assert not is_correct("__import__('os')", "0")


def test_boxed_braces_balance():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("none") is None
