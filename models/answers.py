"""Final answers: extract them from responses, normalise them, decide when two are the same.

GSM8K: the last ``#### X`` before any invented "Question" (ref), else the number after the
last "The answer is", else the last ``\\boxed{X}``; compared as numbers. MATH: the last
"The answer is: X" (the ref's training targets end with it), else the last ``\\boxed{X}``;
compared with math-verify.
``""`` means "no answer": it matches nothing, not even another ``""``.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any

TASKS = ("gsm8k", "math")

# Thousands separators only in groups of three, so "1,2" (a list) never reads as 12.
_NUMBER = r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
# A whole GSM8K answer that is a number (or a fraction) with at most a unit after it: "12 dollars".
_GSM8K_NUMBER_RE = re.compile(rf"(?P<number>{_NUMBER}(?:/\d+)?)\s*[A-Za-z%.\s]*")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")

# sympy computes powers, factorials and binomials exactly, so "9^{9^{9}}" or "1000000!" runs for
# minutes; off the main thread no timeout can stop it, so such answers are compared as text only.
_NESTED_POWER_RE = re.compile(r"\^\s*\{[^}]*\^")
_GROWTH_RE = re.compile(r"\^|!|\\binom|\\choose")
_MAX_VERIFY_CHARS = 200
# math-verify's timeouts use SIGALRM, which only the main thread may set (threaded Celery pools).
_MAIN_THREAD_TIMEOUT_S = 5


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces), or None."""
    starts = [text.rfind(opener) + len(opener) for opener in _BOX_OPENERS if opener in text]
    if not starts:
        return None
    start = max(starts)
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unbalanced: the generation stopped inside the box


def _rest_of_line_after_last(text: str, marker: str) -> str | None:
    at = text.rfind(marker)
    if at < 0:
        return None
    return text[at + len(marker) :].split("\n", 1)[0]


# --- GSM8K -------------------------------------------------------------------------------------


def _canonical_number(number: str) -> str:
    """'1,200' -> '1200', '3.0' -> '3', '-2.50' -> '-2.5', '.5' -> '0.5'; a fraction stays."""
    number = number.replace(",", "")
    if "/" in number:
        return number
    text = format(Decimal(number).normalize(), "f")  # "f": 100 must not become "1E+2"
    return "0" if text == "-0" else text


def normalize_gsm8k(answer: str) -> str:
    """A GSM8K answer as a canonical number where it is one, otherwise as text without spaces."""
    answer = answer.split("=")[-1]  # "#### 2+7=9": the result, as the ref does
    answer = answer.replace("$", "").strip().rstrip(".").strip()
    match = _GSM8K_NUMBER_RE.fullmatch(answer)
    if match:
        return _canonical_number(match["number"])
    # Not a number ("7x + 11"): text, spaces dropped as the ref does; but "27 1/2" must not turn
    # into the number 271/2, so a space between digits stays.
    answer = re.sub(r"\s+", " ", answer)
    return re.sub(r"(?<!\d) | (?!\d)", "", answer)


def _extract_gsm8k(text: str) -> str:
    text = text.split("Question", 1)[0]  # the model went on to invent the next question
    hashes = re.findall(r"####(.*)", text)
    if hashes:
        return normalize_gsm8k(hashes[-1])
    said = _rest_of_line_after_last(text, "The answer is")
    if said is not None:
        number = _NUMBER_RE.search(said.replace("$", ""))
        return _canonical_number(number.group()) if number else ""
    boxed = last_boxed(text)
    return normalize_gsm8k(boxed) if boxed is not None else ""


def _as_number(answer: str) -> Fraction | None:
    try:
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def _gsm8k_match(a: str, b: str) -> bool:
    a, b = normalize_gsm8k(a), normalize_gsm8k(b)
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


# --- MATH --------------------------------------------------------------------------------------


def _squeeze_spaces(latex: str) -> str:
    """Drop white space, except after a command name: "\\pi r" must not become "\\pir"."""
    return re.sub(
        r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+",
        lambda m: m.group(1) + " " if m.group(1) else "",
        latex,
    )


def normalize_math(answer: str) -> str:
    """Light clean-up only (box, spaces, ``$``, trailing period); math-verify does the rest."""
    boxed = last_boxed(answer)
    if boxed is not None:  # "The answer is $\\boxed{1}$."
        answer = boxed
    answer = answer.replace("\\$", "")  # "\\$75": a currency sign
    answer = answer.strip().rstrip(".").strip().strip("$").strip().rstrip(".")
    return _squeeze_spaces(answer)


def _extract_math(text: str) -> str:
    text = text.split("Question", 1)[0]
    said = _rest_of_line_after_last(text, "The answer is:")
    if said is None:
        said = last_boxed(text)
    if said is None:
        said = _rest_of_line_after_last(text, "The answer is")
    if said is None:
        return ""
    said = said.replace("\\$", "")  # an escaped dollar is a currency sign, not math mode
    formula = re.match(r"\s*\$([^$]+)\$", said)  # "The answer is $0$ because ...": just the formula
    return normalize_math(formula[1] if formula else said)


def _may_explode(answer: str) -> bool:
    if len(answer) > _MAX_VERIFY_CHARS or _NESTED_POWER_RE.search(answer):
        return True
    return bool(_GROWTH_RE.search(answer) and re.search(r"\d{5}", answer))


def _timeout_s() -> int | None:
    return _MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_math(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of one answer, memoised: the same answers recur across a pool."""
    from math_verify import parse  # lazily: it loads sympy, which takes a second
    from math_verify.errors import TimeoutException  # a BaseException, so named here

    try:
        return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout_s()))
    except (Exception, TimeoutException):
        return ()


def _verify(gold: str, target: str) -> bool:
    """math-verify's ``verify(gold, target)``, False on anything it cannot or may not handle."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if _may_explode(gold) or _may_explode(target):
        return False
    x, y = _parse_math(gold), _parse_math(target)
    if not x or not y:
        return False
    try:
        return bool(verify(list(x), list(y), timeout_seconds=_timeout_s()))
    except (Exception, TimeoutException):
        return False


@lru_cache(maxsize=65536)
def _math_equivalent(a: str, b: str) -> bool:
    # Both directions: verify is lenient towards its target ("x+y=0" passes for the gold "0").
    return _verify(a, b) and _verify(b, a)


def _math_match(a: str, b: str) -> bool:
    a, b = normalize_math(a), normalize_math(b)
    return a == b or _math_equivalent(*sorted((a, b)))


# --- public ------------------------------------------------------------------------------------


def extract_answer(text: str, task: str) -> str:
    """The final answer of a model response, normalised; ``""`` when it gives none."""
    _check_task(task)
    return _extract_gsm8k(text) if task == "gsm8k" else _extract_math(text)


def answers_match(a: str, b: str, task: str) -> bool:
    """Whether two extracted answers are the same (the stage I vote); ``""`` matches nothing."""
    _check_task(task)
    if not a.strip() or not b.strip():
        return False
    return _gsm8k_match(a, b) if task == "gsm8k" else _math_match(a, b)


def grade(response_answer: str, gold: str, task: str) -> bool:
    """Whether an extracted answer is correct against the gold answer."""
    return answers_match(response_answer, gold, task)


def gold_answer_from_solution(solution: str, task: str) -> str:
    """The gold answer of a reference solution: GSM8K's ``#### X``, MATH's last ``\\boxed{X}``."""
    _check_task(task)
    if task == "gsm8k":
        hashes = re.findall(r"####(.*)", solution)
        return normalize_gsm8k(hashes[-1]) if hashes else ""
    boxed = last_boxed(solution)
    return normalize_math(boxed) if boxed is not None else ""
