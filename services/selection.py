"""Which answers are trusted: the stage I vote. Pure functions, no I/O; the tests call them directly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from models.answers import answers_match

VARIANTS = ("weak", "icl", "hybrid")


@dataclass(frozen=True)
class Vote:
    """Two voters' answers to one question."""

    question_id: int
    first_answer: str  # the weak voter (zero-shot)
    second_answer: str  # the strong voter (in-context), or the second fine-tuned student


def agreed(vote: Vote, task: str) -> bool:
    """Keep a question when both answers are non-empty and equivalent.

    The reference votes by exact equality of normalised strings; we vote with the same
    equivalence we grade with, so `0.5` and `\\frac12` agree (a superset of the reference's kept set).
    """
    return bool(vote.first_answer) and bool(vote.second_answer) and answers_match(
        vote.first_answer, vote.second_answer, task
    )


def stage1_vote(votes: list[Vote], task: str) -> list[int]:
    """Question ids kept by the stage I vote, in the order given."""
    return [vote.question_id for vote in votes if agreed(vote, task)]


def variant_sources(variant: str) -> tuple[str, ...]:
    """Which voters' responses a training set takes: weak, icl (the second voter's), or both."""
    return {"weak": ("first",), "icl": ("second",), "hybrid": ("first", "second")}[variant]


def accuracy(answers: Mapping[int, str], gold: Mapping[int, str | None], task: str) -> float | None:
    """Share of the given answers that match gold; None when no gold is known for any of them."""
    graded = [(answer, gold[qid]) for qid, answer in answers.items() if gold.get(qid)]
    if not graded:
        return None
    return sum(answers_match(answer, g, task) for answer, g in graded) / len(graded)
