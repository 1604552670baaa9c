"""The pinned GSM8K answer parser, on a hand-written table of hard cases (expected values by hand)."""

from __future__ import annotations

import pytest

from qwha.eval.gsm8k import gold_answer, normalize_number, numbers_equal, numbers_in, parse_answer

CASES = [
    # plain, trailing period, several numbers -> the last one
    ("She has 5 apples.", "5"),
    ("3 + 4 = 7. So she has 7 apples left.", "7"),
    ("First 2, then 3, finally 10", "10"),
    # thousands commas, well formed only
    ("The total is 1,234 dollars", "1234"),
    ("It costs 1,234,567.", "1234567"),
    ("Counting 1,2,3", "3"),
    ("Odd grouping 1,2345", "2345"),
    # decimals, trailing zeros, bare decimal
    ("Each pen costs 3.50 dollars.", "3.5"),
    ("He paid $18.00.", "18"),
    ("The probability is .25", "0.25"),
    ("Total: 1,234.56", "1234.56"),
    # currency, percent, units
    ("He earns $1,200 per week.", "1200"),
    ("The discount is 25%", "25"),
    ("It weighs 12kg in total, i.e. 12 kg", "12"),
    ("Price: €10.5", "10.5"),
    # signs: a minus is a sign only when it does not follow a letter, digit or dot
    ("The temperature dropped to -5 degrees", "-5"),
    ("The change is =-12", "-12"),
    ("Between 3-5 hours", "5"),
    ("She is x-7 years", "7"),
    ("-0", "0"),
    # digits glued to a letter are not numbers; ordinal suffixes after digits are fine
    ("Answer 4 to Q3", "4"),
    ("On the 10th day", "10"),
    # "The final answer is" rule: first number after the first occurrence
    ("The final answer is: 1,234.", "1234"),
    ("Work: 5*6=30. The final answer is: $42", "42"),
    ("the final answer is 7, because 3 + 4 = 7 and 9 is wrong", "7"),
    ("The final answer is:\n18", "18"),
    ("THE FINAL ANSWER IS -3.", "-3"),
    ("The final answer is: 12\n\nQuestion: Tom has 3 cats. The final answer is: 99", "12"),
    ("The final answer is: unknown. I computed 8 earlier.", "8"),
    ("I got 8. The final answer is: not clear", "8"),
    # other answer phrasings are not special: last number
    ("The answer is 6. Check: 2 * 3 = 6. Done in 2 steps", "2"),
    # no number at all
    ("I don't know.", None),
    ("", None),
    ("The final answer is: none", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_answer_table(text: str, expected: str | None) -> None:
    assert parse_answer(text) == expected


def test_numbers_in_keeps_written_form() -> None:
    assert numbers_in("a -1,000.5 b 2-3 c $4") == ["-1,000.5", "2", "3", "4"]


@pytest.mark.parametrize(
    ("s", "expected"),
    [("$1,234.50", "1234.5"), ("-7.", "-7"), ("18.000", "18"), ("0.10", "0.1"), ("abc", None), ("", None)],
)
def test_normalize_number(s: str, expected: str | None) -> None:
    assert normalize_number(s) == expected


def test_gold_answer_reads_after_hashes() -> None:
    assert gold_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018") == "1018"
    assert gold_answer("x\n#### -4") == "-4"
    with pytest.raises(ValueError, match="####"):
        gold_answer("no marker 5")


def test_numbers_equal_is_numeric() -> None:
    assert numbers_equal("18", "18")
    assert numbers_equal(normalize_number("18.0"), "18")
    assert numbers_equal("0.1", normalize_number("0.10"))
    assert not numbers_equal("18", "180")
    assert not numbers_equal("-5", "5")
    assert not numbers_equal(None, "5")
