"""The embedded demo's assets without a build: the synthetic problems, their gold answer, and the
refusals (tests/train/test_demo_build.py builds the tiny models)."""

from __future__ import annotations

import random

import pytest

from models import demo
from models.answers import gold_answer_from_solution

# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("phrasing", ["target", "related"])
def test_problems_are_deterministic_and_their_solutions_add_up(phrasing):
    first = [demo.make_problem(random.Random(7), phrasing) for _ in range(3)]
    assert first == [demo.make_problem(random.Random(7), phrasing) for _ in range(3)]
    rng = random.Random(1)
    for _ in range(300):
        question, solution, answer = demo.make_problem(rng, phrasing)
        lines = solution.split("\n")
        assert lines[-1] == f"#### {answer}"
        assert 1 <= len(lines) - 1 <= 3  # one to three operations
        value = None
        for line in lines[:-1]:  # "a op b = c." with the running value carried along
            left, right = line.rstrip(".").split(" = ")
            a, op, b = left.split(" ")
            assert value is None or int(a) == value
            assert 1 <= int(b) <= 9  # single-digit operands
            results = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}
            assert int(right) == results[op]
            value = int(right)
        assert value == answer >= 0
        assert question.endswith("have now?")


def test_solutions_end_with_the_answer_the_project_grades():
    """The demo's gold is read by the project's own grading (``#### X``, as GSM8K)."""
    problem = demo.make_problem(random.Random(3), "target")
    assert gold_answer_from_solution(problem.solution, "gsm8k") == str(problem.answer)


def test_a_directory_that_is_not_a_demo_build_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo build"):
        demo.build_demo(tmp_path, scale="tiny")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        demo.build_demo(tmp_path / "x", scale="huge")
