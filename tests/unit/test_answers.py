"""Answer extraction and equivalence, on hand-written responses."""

from __future__ import annotations

import threading
import time

import pytest

from models import answers
from models.answers import answers_match, extract_answer, gold_answer_from_solution, grade


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### 1,625,000", "1625000"),
        ("So she earned $10.\n#### $1,200.00", "1200"),
        ("#### 72.", "72"),
        ("#### 3.0", "3"),
        ("#### -2.50", "-2.5"),
        ("#### -$615,000", "-615000"),
        ("#### .5", "0.5"),
        ("#### 100", "100"),
        ("#### -0", "0"),
        ("#### 12 dollars", "12"),
        ("#### 45 minutes.", "45"),
        ("#### 25%", "25"),
        ("#### 3/4", "3/4"),
        ("#### 2+7=9", "9"),
        ("#### 5\n#### 6", "6"),
        ("#### 5\nQuestion: how many?\nAnswer: 7\n#### 7", "5"),
        ("2 + 2 = 4\nQuestion: what next? #### 9", ""),
        ("#### 7x + 11", "7x+11"),
        ("#### 27 1/2", "27 1/2"),
        ("#### ", ""),
        ("She has 9 left. The answer is 9.", "9"),
        ("The answer is $1,250.", "1250"),
        ("The answer is -3.", "-3"),
        ("The answer is 3.\nNo wait. The answer is 4 apples.", "4"),
        ("The answer is 5.\n#### 6", "6"),
        ("The answer is unknown.", ""),
        ("so the total is \\boxed{18}.", "18"),
        ("\\boxed{1,000}", "1000"),
        ("It goes on and on without an answer", ""),
        ("", ""),
    ],
)
def test_gsm8k_extraction(response: str, expected: str) -> None:
    assert extract_answer(response, "gsm8k") == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("3.0", "3", True),
        ("3", "3.00", True),
        ("1,000", "1000", True),
        ("-2.5", "-2.50", True),
        ("0.5", "1/2", True),
        ("0.75", "3/4", True),
        ("3", "4", False),
        ("-3", "3", False),
        ("7x+11", "7x+11", True),
        ("27 1/2", "271/2", False),
        ("5:40", "5:40", True),
        ("", "", False),
        ("", "3", False),
        ("3", "", False),
        ("  ", "  ", False),
    ],
)
def test_gsm8k_match(a: str, b: str, same: bool) -> None:
    assert answers_match(a, b, "gsm8k") is same
    assert answers_match(b, a, "gsm8k") is same


def test_gsm8k_grade_is_numeric() -> None:
    response = "The total is $7.00 + $0.70 = $7.70.\n#### 7.70"
    assert grade(extract_answer(response, "gsm8k"), "7.7", "gsm8k")
    assert not grade(extract_answer(response, "gsm8k"), "77", "gsm8k")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("So there are $8\\times7\\times6=\\boxed{336}$ ways. The answer is: 336", "336"),
        ("Thus $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("Thus $x = \\boxed{\\sqrt{\\frac{3}{4}}}$.", "\\sqrt{\\frac{3}{4}}"),
        ("Thus $x = \\fbox{5}$.", "5"),
        ("First \\boxed{1}, then \\boxed{2}.", "2"),
        ("Cut off inside the box: \\boxed{\\frac{1}{2}", ""),
        ("The answer is $\\boxed{1}.$", "1"),
        ("The answer is $\\boxed{1}.$ The answer is: 1", "1"),
        ("The new price is $\\$75$. The answer is: $\\$75$", "75"),
        ("The answer is: $4x - 2y + 2z = 0$", "4x-2y+2z=0"),
        ("The answer is: \\frac{\\pi}{2}.", "\\frac{\\pi}{2}"),
        ("The answer is: 2 \\pi r", "2\\pi r"),
        ("Remark: The answer is $ 0$ because $a=0$ is the only solution.", "0"),
        ("The answer is: 3\nQuestion: What is 1+1?\nAnswer: The answer is: 2", "3"),
        ("No answer here.", ""),
    ],
)
def test_math_extraction(response: str, expected: str) -> None:
    assert extract_answer(response, "math") == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("\\frac12", "0.5", True),
        ("\\frac{1}{2}", "\\dfrac12", True),
        ("\\frac{1}{2}", "1/2", True),
        ("x=5", "5", True),
        ("\\binom{5}{2}", "10", True),
        ("2\\sqrt{3}", "\\sqrt{12}", True),
        ("1,2", "2,1", True),
        ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}", True),
        ("1,2", "12", False),
        ("2", "3", False),
        # math-verify alone accepts an equation whose right side is the gold; agreement must not.
        ("5x+4y+5z-6=0", "0", False),
        ("", "", False),
        ("", "0", False),
    ],
)
def test_math_match(a: str, b: str, same: bool) -> None:
    assert answers_match(a, b, "math") is same
    assert answers_match(b, a, "math") is same


def test_math_answers_that_would_hang_sympy_are_compared_as_text() -> None:
    start = time.monotonic()
    assert not answers_match("9^{9^{9}}", "1", "math")
    assert not answers_match("1000000!", "2", "math")
    assert not answers_match("\\binom{1000000}{500000}", "3", "math")
    assert answers_match("9^{9^{9}}", "9^{9^{9}}", "math")
    assert time.monotonic() - start < 5


def test_math_match_works_off_the_main_thread() -> None:
    # math-verify's default timeouts use SIGALRM, which raises outside the main thread.
    answers._parse_math.cache_clear()
    answers._math_equivalent.cache_clear()
    results: list[bool] = []

    def vote() -> None:
        results.append(answers_match("\\frac{3}{4}", "0.75", "math"))
        results.append(answers_match("\\frac{3}{4}", "0.7", "math"))

    worker = threading.Thread(target=vote)
    worker.start()
    worker.join(timeout=60)
    assert results == [True, False]


@pytest.mark.parametrize(
    ("solution", "task", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "gsm8k", "72"),
        ("Total: <<1000*2=2000>>2000.\n#### 2,000", "gsm8k", "2000"),
        ("No final line", "gsm8k", ""),
        ("So $x = \\boxed{\\frac{1}{2}}$.", "math", "\\frac{1}{2}"),
        ("First $\\boxed{1}$, then $\\boxed{(3, \\pi)}$.", "math", "(3,\\pi)"),
        ("No box", "math", ""),
    ],
)
def test_gold_answer_from_solution(solution: str, task: str, expected: str) -> None:
    assert gold_answer_from_solution(solution, task) == expected


@pytest.mark.parametrize(
    "call",
    [
        lambda: extract_answer("#### 1", "svamp"),
        lambda: answers_match("1", "1", "svamp"),
        lambda: grade("1", "1", "svamp"),
        lambda: gold_answer_from_solution("#### 1", "svamp"),
    ],
)
def test_unknown_task_raises(call) -> None:
    with pytest.raises(ValueError, match="svamp"):
        call()
