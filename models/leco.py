"""LECO (learning from correctness): step confidence scores and the rethink loop, as pure code.

``score_steps`` turns a generation's token pieces and probabilities into scored steps;
``leco_solve`` drives the rethink loop over an injected generator (the model lives behind it), so
the loop is tested with a scripted fake; ``final_vote`` is the weighted vote over the attempts.
docs/ALGORITHMS.md, section "LECO", states the rules; the reference is starrYYxuan/LeCo.

Which step a token belongs to (steps are split by characters, so any tokenizer works): the step
whose line holds the token's first character that is not a newline. So ".\\n\\nStep" belongs to
the step that the "." ends, a token made only of newlines belongs to no step, and a token whose
first such character lies on a blank line belongs to no step either. Spaces inside a step line
count (Llama-2 splits " 12" into " ", "1", "2"; the reference counted every token between newline
tokens). A step none of whose tokens start in it (a piece "a\\nb" gives "b" no token of its own)
is scored on the tokens that overlap its characters, so every step has a score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Protocol

from models.answers import TASKS, answers_match, extract_answer

TRANSITION_TOKENS = 5  # K (ref): the transition score reads the first K tokens after "Step N:"
ORIGINAL_WEIGHT = 1.5  # ref majorElement: the original answer outweighs any single rethink
RETHINK_WEIGHT = 1.0
STOP_REASONS = ("repeated", "max_rethinks", "no_candidates")

# The ref assumed "Step N:" is 3 tokens; we strip it by characters, spaces after the colon included.
_STEP_PREFIX = re.compile(r"\s*step\s*\d+\s*:\s*", re.IGNORECASE)
# Steps that restate the task or the answer are never suspected (ref find_error_step).
_NOT_A_CANDIDATE = re.compile(r"step by step|the answer is", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    """One line of a solution and its confidence; start/end are character offsets of the line."""

    text: str
    start: int
    end: int
    avg: float  # mean token probability
    trans: float  # mean probability of the first K tokens after the "Step N:" prefix
    diver: float  # ln(KL(p̂ ‖ uniform)^(1/3) + 1): how unevenly the probability is spread
    score: float  # avg + trans - diver
    n_tokens: int  # tokens the scores were computed from


def score_steps(
    token_texts: Sequence[str], token_probs: Sequence[float], *, k: int = TRANSITION_TOKENS
) -> list[Step]:
    """The non-blank lines of ``"".join(token_texts)`` as scored steps, in order."""
    if len(token_texts) != len(token_probs):
        raise ValueError(f"token_probs: need one per piece, got {len(token_probs)} for {len(token_texts)}")
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    text = "".join(token_texts)
    ends = list(accumulate(len(piece) for piece in token_texts))
    starts = [end - len(piece) for end, piece in zip(ends, token_texts)]

    lines: list[tuple[int, int]] = []  # (start, end) of each non-blank line
    line_at = [-1] * len(text)  # character -> index into lines, -1 on newlines and blank lines
    offset = 0
    for line in text.split("\n"):
        if line.strip():
            line_at[offset : offset + len(line)] = [len(lines)] * len(line)
            lines.append((offset, offset + len(line)))
        offset += len(line) + 1

    # A token's anchor: its first character that is not a newline. An empty piece (a token that
    # ends inside a multi-byte character) anchors on the character the next piece completes.
    anchors = []
    for start, end in zip(starts, ends):
        span = range(start, min(max(end, start + 1), len(text)))
        anchors.append(next((j for j in span if text[j] != "\n"), None))
    owned: list[list[int]] = [[] for _ in lines]
    for i, anchor in enumerate(anchors):
        if anchor is not None and line_at[anchor] >= 0:
            owned[line_at[anchor]].append(i)

    steps = []
    for (start, end), tokens in zip(lines, owned):
        if not tokens:
            tokens = [i for i in range(len(starts)) if starts[i] < end and ends[i] > start]
        probs = [token_probs[i] for i in tokens]
        prefix = _STEP_PREFIX.match(text, start, end)
        prefix_end = prefix.end() if prefix else start
        # Drop the tokens lying wholly inside "Step N:"; one straddling its end stays.
        after = [token_probs[i] for i in tokens if ends[i] > prefix_end or anchors[i] == prefix_end]
        avg = _mean(probs)
        trans = _mean(after[:k]) if after else avg
        diver = _divergence(probs)
        steps.append(Step(text[start:end], start, end, avg, trans, diver, avg + trans - diver, len(tokens)))
    return steps


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _divergence(probs: Sequence[float]) -> float:
    """ln(KL^(1/3) + 1), KL(p̂ ‖ U) = sum p̂ ln(n p̂) with p̂ = p / sum(p) and U uniform over n."""
    n, total = len(probs), sum(probs)
    if n < 2 or total <= 0:
        return 0.0  # one token is its own uniform distribution
    kl = sum(q * math.log(q * n) for q in (p / total for p in probs) if q > 0)
    return math.log(max(kl, 0.0) ** (1 / 3) + 1)  # rounding can make KL -1e-17: no NaN


def suspect_step(steps: Sequence[Step]) -> int | None:
    """Index of the suspected first error: the earlier of the two lowest-scoring candidates."""
    candidates = [i for i, step in enumerate(steps) if not _NOT_A_CANDIDATE.search(step.text)]
    lowest = sorted(candidates, key=lambda i: steps[i].score)[:2]  # stable: equal scores, earlier first
    return min(lowest) if lowest else None


def doubted_token(token_texts: Sequence[str], token_probs: Sequence[float], start: int, end: int) -> int | None:
    """Index of the least probable token of the line at characters [start, end) of
    ``"".join(token_texts)``, past its "Step N:" prefix (tokens assigned to lines as in
    ``score_steps``); None when the line has no such token. A greedy rethink that reproduces the
    dropped step up to this token is turned away from it there (see ``RethinkRequest``)."""
    text = "".join(token_texts)
    prefix = _STEP_PREFIX.match(text, start, end)
    content_start = prefix.end() if prefix else start
    best, offset = None, 0
    for i, piece in enumerate(token_texts):
        piece_start, offset = offset, offset + len(piece)
        anchor = next((j for j in range(piece_start, offset) if text[j] != "\n"), None)
        if anchor is None or not start <= anchor < end or offset <= content_start:
            continue
        if best is None or token_probs[i] < token_probs[best]:
            best = i
    return best


# --- the vote ----------------------------------------------------------------------------------


def _vote(answers: Sequence[str], task: str) -> tuple[list[int], list[tuple[list[int], float]]]:
    """The winning group of answer indices, and every group with its weight.

    An answer joins the first group whose first member it matches (``answers_match``), so a
    non-transitive equivalence (math-verify) still gives a partition. An empty answer matches
    nothing: each stands alone, so two non-answers never outvote a real one. The winner has
    strictly the most weight; among equal weights, the group holding the most recent answer
    wins (ref majorElement).
    """
    if not answers:
        raise ValueError("answers: need at least one answer to vote on")
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        group = next((g for g in groups if answers_match(answers[g[0]], answer, task)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    weighted = [(g, sum(ORIGINAL_WEIGHT if i == 0 else RETHINK_WEIGHT for i in g)) for g in groups]
    winner, _ = max(weighted, key=lambda group_weight: (group_weight[1], group_weight[0][-1]))
    return winner, weighted


def majority_index(answers: Sequence[str], task: str) -> int:
    """Self-consistency: the first answer of the largest group of equivalent non-empty answers
    (ties: the group seen first); 0 when no answer is non-empty."""
    if not answers:
        raise ValueError("answers: need at least one answer to vote on")
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if not answer.strip():
            continue
        group = next((g for g in groups if answers_match(answers[g[0]], answer, task)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    return max(groups, key=len)[0] if groups else 0  # max keeps the first of equals


def final_vote(answers: Sequence[str], task: str) -> str:
    """The weighted vote over [original, rethink 1, ...]: the original weighs 1.5, a rethink 1.0."""
    winner, _ = _vote(answers, task)
    return answers[winner[-1]]  # the group's most recent spelling


# --- the rethink loop --------------------------------------------------------------------------


@dataclass(frozen=True)
class RethinkRequest:
    """Generate for ``questions[question_index]``, continuing ``kept_text`` as the model's own
    answer text: the solution up to the suspect step, verbatim ("" for the first generation).

    A greedy generator that continues ``kept_text`` exactly as it first generated it writes the
    dropped step again (the ref changed the prompt instead: kept steps, then an instruction, and
    re-encoded it all). The backends' step generators (``models.backends``) turn the rethink away
    from the dropped step at its least confident token (``doubted_token``) and decode greedily
    otherwise.
    """

    question_index: int
    kept_text: str


@dataclass(frozen=True)
class Attempt:
    """What the generator made of one request; ``"".join(token_texts) == text``."""

    text: str  # the new continuation only
    token_texts: list[str]
    token_probs: list[float]
    input_tokens: int  # tokens actually encoded for this call (a cached prefix is not)
    output_tokens: int


class StepGenerator(Protocol):
    def __call__(self, requests: list[RethinkRequest]) -> list[Attempt]: ...


@dataclass(frozen=True)
class AttemptRecord:
    """One generation of the loop: index 0 is the original, then the rethinks."""

    answer: str
    text: str  # the whole solution: kept text + the new continuation
    steps: tuple[Step, ...]  # every step of text, offsets into text; kept steps keep their scores
    kept_steps: int  # steps continued from the previous solution (0 for the original)
    suspect: int | None  # index into steps cut for the next attempt; None when the loop stopped here
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LecoResult:
    answer: str  # the vote's winner
    text: str  # the most recent solution with the winning answer
    attempts: tuple[AttemptRecord, ...]
    votes: tuple[tuple[str, float], ...]  # (answer, total weight) per group of equivalent answers
    stop_reason: str  # one of STOP_REASONS
    input_tokens: int  # summed over this question's calls
    output_tokens: int


def leco_solve(
    questions: Sequence[str],
    generate: StepGenerator,
    *,
    task: str,
    max_rethinks: int = 3,
    k: int = TRANSITION_TOKENS,
) -> list[LecoResult]:
    """LECO on every question, one batched ``generate`` call per round, results in question order.

    The generator gets only the questions still rethinking; it knows the question texts itself
    (``question_index`` indexes ``questions``).
    """
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}, expected one of {', '.join(TASKS)}")
    if max_rethinks < 0:
        raise ValueError(f"max_rethinks: must be at least 0, got {max_rethinks}")
    records: list[list[AttemptRecord]] = [[] for _ in questions]
    kept: dict[int, tuple[Step, ...]] = {}  # the steps each pending request continues
    stopped: dict[int, str] = {}
    pending = [RethinkRequest(i, "") for i in range(len(questions))]
    while pending:
        attempts = generate(pending)
        if len(attempts) != len(pending):
            raise ValueError(f"generate: returned {len(attempts)} attempts for {len(pending)} requests")
        next_round = []
        for request, attempt in zip(pending, attempts):
            i = request.question_index
            text, steps = _whole_solution(request, attempt, kept.get(i, ()), k)
            answer = extract_answer(text, task)
            reason = _stop_reason(answer, records[i], steps, task, max_rethinks)
            suspect = None if reason else suspect_step(steps)
            records[i].append(AttemptRecord(
                answer=answer, text=text, steps=steps, kept_steps=len(kept.get(i, ())), suspect=suspect,
                input_tokens=attempt.input_tokens, output_tokens=attempt.output_tokens,
            ))
            if reason:
                stopped[i] = reason
                continue
            assert suspect is not None  # no stop reason: suspect_step found one
            kept[i] = steps[:suspect]  # the suspect is dropped with everything after it
            next_round.append(RethinkRequest(i, text[: steps[suspect].start]))
        pending = next_round
    return [_result(records[i], stopped[i], task) for i in range(len(questions))]


def _whole_solution(request: RethinkRequest, attempt: Attempt, kept_steps: tuple[Step, ...],
                    k: int) -> tuple[str, tuple[Step, ...]]:
    """Kept text + the new continuation, and its steps: the kept ones with the scores they had,
    the new ones scored now, with offsets into the whole solution."""
    if attempt.token_texts and "".join(attempt.token_texts) != attempt.text:
        raise ValueError("generate: an attempt's token_texts must join to its text")
    shift = len(request.kept_text)
    new = score_steps(attempt.token_texts, attempt.token_probs, k=k)
    new = [replace(s, start=s.start + shift, end=s.end + shift) for s in new]
    return request.kept_text + attempt.text, (*kept_steps, *new)


def _same(a: str, b: str, task: str) -> bool:
    """For the stop rule: equivalent answers, or no answer twice (answers_match says no to "")."""
    return (not a.strip() and not b.strip()) or answers_match(a, b, task)


def _stop_reason(answer: str, previous: list[AttemptRecord], steps: tuple[Step, ...], task: str,
                 max_rethinks: int) -> str | None:
    """Why the loop stops after this attempt, or None to rethink again."""
    if previous and _same(answer, previous[-1].answer, task):
        return "repeated"
    if len(previous) >= max_rethinks:  # previous = [original, rethink 1, ...]
        return "max_rethinks"
    return "no_candidates" if suspect_step(steps) is None else None


def _result(records: list[AttemptRecord], stop_reason: str, task: str) -> LecoResult:
    answers = [r.answer for r in records]
    winner, weighted = _vote(answers, task)
    return LecoResult(
        answer=answers[winner[-1]],
        text=records[winner[-1]].text,
        attempts=tuple(records),
        votes=tuple((answers[group[-1]], weight) for group, weight in weighted),
        stop_reason=stop_reason,
        input_tokens=sum(r.input_tokens for r in records),
        output_tokens=sum(r.output_tokens for r in records),
    )
