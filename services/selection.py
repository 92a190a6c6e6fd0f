"""Which answers are trusted: the stage I vote and the stage II pair rules.

Pure functions, no I/O; the tests call them directly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.answers import TASKS, answers_match

VARIANTS = ("weak", "icl", "hybrid")


@dataclass(frozen=True)
class Vote:
    """Two voters' answers to one question."""

    question_id: int
    first_answer: str  # the weak voter (zero-shot)
    second_answer: str  # the strong voter (in-context), or the second fine-tuned student
    # Each answer's lowest LECO step score (None: not scored, e.g. an empty response).
    first_min_step: float | None = None
    second_min_step: float | None = None


def agreed(vote: Vote, task: str) -> bool:
    """Keep a question when both answers are non-empty and equivalent.

    The reference votes by exact equality of normalised strings; we vote with the same
    equivalence we grade with, so `0.5` and `\\frac12` agree (a superset of the reference's kept set).
    """
    return bool(vote.first_answer) and bool(vote.second_answer) and answers_match(
        vote.first_answer, vote.second_answer, task
    )


def low_step_score(vote: Vote, min_step_score: float | None) -> bool:
    """Either answer has a step scored below the threshold (never, when the threshold is None)."""
    if min_step_score is None:
        return False
    return any(score is not None and score < min_step_score for score in (vote.first_min_step, vote.second_min_step))


def stage1_vote(votes: list[Vote], task: str, min_step_score: float | None = None) -> list[int]:
    """Question ids kept by the stage I vote, in the order given: agreed, and (with a threshold)
    no step of either answer scored below ``min_step_score``."""
    return [vote.question_id for vote in votes if agreed(vote, task) and not low_step_score(vote, min_step_score)]


def dropped_by_step_score(votes: list[Vote], task: str, min_step_score: float | None) -> list[int]:
    """Question ids the voters agreed on that the step-score threshold dropped."""
    return [vote.question_id for vote in votes if agreed(vote, task) and low_step_score(vote, min_step_score)]


def min_step_score(step_scores: list[Any] | None) -> float | None:
    """The lowest step score of a stored generation (``Generation.step_scores``), None if unscored."""
    scores = [step["score"] for step in step_scores or [] if isinstance(step, dict) and "score" in step]
    return min(scores) if scores else None


def variant_sources(variant: str) -> tuple[str, ...]:
    """Which voters' responses a training set takes: weak, icl (the second voter's), or both."""
    return {"weak": ("first",), "icl": ("second",), "hybrid": ("first", "second")}[variant]


def accuracy(answers: Mapping[int, str], gold: Mapping[int, str | None], task: str) -> float | None:
    """Share of the given answers that match gold; None when no gold is known for any of them."""
    graded = [(answer, g) for qid, answer in answers.items() if (g := gold.get(qid))]
    if not graded:
        return None
    return sum(answers_match(answer, g, task) for answer, g in graded) / len(graded)


# --- stage II: preference pairs ------------------------------------------------------------------

PAIR_CASES = ("weak_chosen", "weak_rejected")
SKIP_REASONS = ("below_floor", "empty_majority", "too_easy", "below_tau", "prompt_too_long")
MAX_PAIRS_PER_QUESTION = 3  # ALGORITHMS.md stage II step 6: MATH-style takes up to 3


@dataclass(frozen=True)
class Pair:
    """One preference pair for DPO/ORPO: two responses to the same question."""

    chosen: str
    rejected: str
    case: str  # "weak_chosen" | "weak_rejected"


@dataclass(frozen=True)
class PairDecision:
    """What the stage II rules made of one question, and why: for reports."""

    pairs: list[Pair]
    skipped: str | None  # None, or one of SKIP_REASONS
    confidence: float  # size of the majority class / n
    majority_answer: str  # the majority class's answer as first sampled; "" when that class is empty


def _answer_classes(answers: list[str], task: str) -> list[list[int]]:
    """Sample indices grouped by equivalent answer, classes in order of first appearance.

    Empty answers form one class of their own (`answers_match` never matches ""). A non-empty
    answer joins the first class whose first member it matches, so a non-transitive equivalence
    (math-verify) still yields a partition that does not depend on anything but the order given.
    """
    classes: list[list[int]] = []
    empty: list[int] | None = None
    for i, answer in enumerate(answers):
        if not answer.strip():
            if empty is None:
                empty = []
                classes.append(empty)
            empty.append(i)
            continue
        for members in classes:
            if members is not empty and answers_match(answers[members[0]], answer, task):
                members.append(i)
                break
        else:
            classes.append([i])
    return classes


def _pick_distinct(candidates: list[str], k: int, exclude: str, rng: random.Random) -> list[str]:
    """Up to k responses drawn at random without replacement, distinct by text, none equal to exclude."""
    distinct = [text for text in dict.fromkeys(candidates) if text != exclude]
    return rng.sample(distinct, min(k, len(distinct)))


def _check_pair_args(samples: list[Any], task: str, floor: float, tau: float, per_question: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}, expected one of {', '.join(TASKS)}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor: must be in [0, 1], got {floor}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau: must be in [0, 1], got {tau}")
    if tau < floor:
        raise ValueError(f"tau: must be >= floor ({floor}), got {tau}")
    if isinstance(per_question, bool) or not isinstance(per_question, int) or not (
        1 <= per_question <= MAX_PAIRS_PER_QUESTION
    ):
        raise ValueError(f"per_question: must be an integer in 1..{MAX_PAIRS_PER_QUESTION}, got {per_question!r}")
    if len(samples) < 2:
        raise ValueError(f"samples: need at least 2 (answer, response) samples, got {len(samples)}")


def decide_pairs(
    weak_answer: str,
    weak_response: str,
    samples: list[tuple[str, str]],
    *,
    task: str = "gsm8k",
    floor: float = 0.6,
    tau: float = 0.8,
    per_question: int = 1,
    rng: random.Random,
) -> PairDecision:
    """The stage II pair rules (ALGORITHMS.md, "Stage II", steps 2-6) for one question.

    `weak_answer`/`weak_response`: the weak model's original (D_weak) answer and response;
    `samples`: the student's n sampled (answer, response) at temperature 1.0.

    - confidence = size of the most common answer class / n, answers grouped by `answers_match`,
      empty answers in a class of their own. Ties between classes go to the class that appears
      first in `samples`.
    - skip when confidence < floor ("below_floor") or the majority answer is empty ("empty_majority").
    - weak answer equivalent to the majority: chosen = the weak response, rejected = random samples
      whose answer is not the majority (an empty answer counts as not the majority); none: "too_easy".
    - otherwise, when confidence >= tau: chosen = random majority samples, rejected = the weak
      response; below tau: "below_tau".

    Up to `per_question` pairs, their sampled sides distinct by response text (fewer when fewer
    distinct texts exist); a sample whose text equals the weak response is never paired with it.
    Deterministic given the state of `rng`.
    """
    _check_pair_args(samples, task, floor, tau, per_question)
    answers = [answer for answer, _ in samples]
    responses = [response for _, response in samples]
    classes = _answer_classes(answers, task)
    majority = max(classes, key=len)  # max() keeps the first of equals: the earliest class wins ties
    confidence = len(majority) / len(samples)
    majority_answer = answers[majority[0]] if answers[majority[0]].strip() else ""

    def decision(pairs: list[Pair], skipped: str | None = None) -> PairDecision:
        return PairDecision(pairs=pairs, skipped=skipped, confidence=confidence, majority_answer=majority_answer)

    if confidence < floor:
        return decision([], "below_floor")
    if not majority_answer:
        return decision([], "empty_majority")
    in_majority = set(majority)
    if weak_answer.strip() and answers_match(weak_answer, majority_answer, task):
        others = [responses[i] for i in range(len(samples)) if i not in in_majority]
        rejected = _pick_distinct(others, per_question, weak_response, rng)
        if not rejected:
            return decision([], "too_easy")
        return decision([Pair(weak_response, text, "weak_chosen") for text in rejected])
    if confidence < tau:
        return decision([], "below_tau")
    chosen = _pick_distinct([responses[i] for i in majority], per_question, weak_response, rng)
    if not chosen:
        # Only when every majority sample is the weak response verbatim although the answers given
        # differ (inconsistent input): there is nothing to prefer over it.
        return decision([], "too_easy")
    return decision([Pair(text, weak_response, "weak_rejected") for text in chosen])

