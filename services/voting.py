"""The stage I vote of one round, read from its generations: computed here once, for the vote job
(which writes the training sets) and for the round report (which grades it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Generation
from services.selection import Vote, dropped_by_step_score, min_step_score, stage1_vote


@dataclass(frozen=True)
class RoundVote:
    first: dict[int, Any]  # question id → the weak voter's answer (id, text, answer, step_scores)
    second: dict[int, Any]  # question id → the strong voter's answer
    votes: list[Vote]  # questions both voters answered, in pool order
    kept: list[int]  # question ids the vote keeps
    dropped_by_step_score: list[int]  # agreed, but a step scored below the threshold


def round_vote(session: Session, round_id: int, question_ids: list[int], task: str,
               min_step: float | None) -> RoundVote:
    """Each voter's first answer to each question, and the vote over them (services.selection)."""
    rows = session.execute(
        select(Generation.id, Generation.voter, Generation.question_id, Generation.text, Generation.answer,
               Generation.step_scores)
        .where(Generation.round_id == round_id, Generation.sample_index == 0)
    ).all()
    first = {r.question_id: r for r in rows if r.voter == "weak"}
    second = {r.question_id: r for r in rows if r.voter == "strong"}
    votes = [Vote(qid, first[qid].answer, second[qid].answer, min_step_score(first[qid].step_scores),
                  min_step_score(second[qid].step_scores))
             for qid in question_ids if qid in first and qid in second]
    return RoundVote(first, second, votes, stage1_vote(votes, task, min_step),
                     dropped_by_step_score(votes, task, min_step))
