"""The stage I vote of one round, read from its generations: computed here once, for the vote job
(which writes the training sets) and for the round report (which grades it).

A round may hold a million questions, so neither reader loads the round's generations whole:
the vote job walks the pool a page of questions at a time (`voted_pages`), and the report's
`round_vote` reads answers only, never the responses' text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Generation, Question
from db.session import among
from services.selection import Vote, agreed, dropped_by_step_score, low_step_score, min_step_score, stage1_vote

PAGE = 2000  # questions per read: a few MiB of responses, whatever the pool's size


@dataclass(frozen=True)
class RoundVote:
    first: dict[int, Any]  # question id → the weak voter's answer (id, answer, step_scores)
    second: dict[int, Any]  # question id → the strong voter's answer
    votes: list[Vote]  # questions both voters answered, in pool order
    kept: list[int]  # question ids the vote keeps
    dropped_by_step_score: list[int]  # agreed, but a step scored below the threshold


def round_vote(session: Session, round_id: int, question_ids: list[int], task: str,
               min_step: float | None) -> RoundVote:
    """Each voter's first answer to each question, and the vote over them (services.selection).
    Answers only (no response text): what the report grades."""
    rows = session.execute(
        select(Generation.id, Generation.voter, Generation.question_id, Generation.answer, Generation.step_scores)
        .where(Generation.round_id == round_id, Generation.sample_index == 0)
    ).all()
    first = {r.question_id: r for r in rows if r.voter == "weak"}
    second = {r.question_id: r for r in rows if r.voter == "strong"}
    votes = [Vote(qid, first[qid].answer, second[qid].answer, min_step_score(first[qid].step_scores),
                  min_step_score(second[qid].step_scores))
             for qid in question_ids if qid in first and qid in second]
    return RoundVote(first, second, votes, stage1_vote(votes, task, min_step),
                     dropped_by_step_score(votes, task, min_step))


@dataclass(frozen=True)
class VotedQuestion:
    """One question both voters answered, with what the vote job writes from it."""

    question_id: int
    question: str  # the question's text
    first: Any  # the weak voter's generation (id, text, answer)
    second: Any  # the strong voter's generation
    kept: bool
    dropped_by_step_score: bool


def voted_pages(session: Session, round_id: int, question_ids: Sequence[int], task: str,
                min_step: float | None, page: int = PAGE) -> Iterator[list[VotedQuestion]]:
    """The vote, a page of questions at a time in pool order, so memory holds one page. Each page is
    three single-table reads, each an index range of the page (`among`: the questions' key, the
    generations' unique key, which leads with round, voter, question), joined here. One query
    joining the three was planned from the tables' statistics, which a table never analysed does
    not have (autovacuum off, or a table grown since): PostgreSQL then hashed every generation of
    the round, or looped over the page squared, for every page (a 70,000-question vote took 300 s)."""
    columns = (Generation.question_id, Generation.id, Generation.text, Generation.answer, Generation.step_scores)
    for start in range(0, len(question_ids), page):
        ids = question_ids[start : start + page]
        texts = dict(session.execute(select(Question.id, Question.text).where(among(Question.id, ids))).tuples().all())
        weak, strong = ({row.question_id: row for row in session.execute(select(*columns).where(
            Generation.round_id == round_id, Generation.voter == voter, Generation.sample_index == 0,
            among(Generation.question_id, ids)))} for voter in ("weak", "strong"))
        out = []
        for qid in ids:
            first, second = weak.get(qid), strong.get(qid)
            if first is None or second is None:  # a voter left it unanswered: no vote
                continue
            vote = Vote(qid, first.answer, second.answer, min_step_score(first.step_scores),
                        min_step_score(second.step_scores))
            agree, low = agreed(vote, task), low_step_score(vote, min_step)
            out.append(VotedQuestion(qid, texts[qid], _Answer(first.id, first.text, first.answer),
                                     _Answer(second.id, second.text, second.answer),
                                     kept=agree and not low, dropped_by_step_score=agree and low))
        yield out


@dataclass(frozen=True)
class _Answer:
    id: int
    text: str
    answer: str
