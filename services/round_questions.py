"""A round's pool questions, in order: rows of `round_questions` (migration 0010).

Written once when the round starts, read by the planner (generation chunks), the vote, the pairs
step and the report. They used to be a list in `rounds.resolved`, which every read of the round's
row parsed (8 MB of JSON at a million questions); the resolved JSON keeps only their count.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import RoundQuestion
from db.session import insert_ignore_batches


def store_round_questions(session: Session, round_id: int, question_ids: Sequence[int]) -> int:
    """Write the round's pool question ids in order, in bulk; returns how many rows were new.
    Idempotent: a second call with the same ids writes nothing (the key is the round and position).
    Nothing is committed here: the rows go in with the round's own transaction."""
    return insert_ignore_batches(session, RoundQuestion, (
        {"round_id": round_id, "position": position, "question_id": qid} for position, qid in enumerate(question_ids)))


def round_question_ids(session: Session, round_id: int, start: int = 0, stop: int | None = None) -> list[int]:
    """The one way to read a round's pool question ids: in pool order, positions `start` to `stop`
    (exclusive; None: to the end), so a caller can read a page at a time."""
    query = select(RoundQuestion.question_id).where(RoundQuestion.round_id == round_id, RoundQuestion.position >= start)
    if stop is not None:
        query = query.where(RoundQuestion.position < stop)
    return list(session.scalars(query.order_by(RoundQuestion.position)))
