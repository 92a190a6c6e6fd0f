"""Operator actions on jobs. `retry_job` gives a failed job a fresh attempt.

A job fails for good after its last attempt, and its round fails with it (the jobs still queued
are cancelled as their messages arrive). Retrying the job reopens that round, and the pipeline it
stopped, and re-plans it: the caller sends every queued job of the round again. Attempt numbers
keep counting up (they fence a job's writes), so the retry raises the job's attempt budget
rather than resetting its count.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.schema import Job, Pipeline, Round
from services.contracts import JobState, RoundState
from services.errors import InputError, StateError
from services.lookup import get_by_id
from services.monitor import get_job
from services.settings import DeliverySettings


def retry_job(session: Session, job_id: int, delivery: DeliverySettings, extra_attempts: int = 1) -> list[int]:
    """Reset failed job `job_id` for `extra_attempts` more attempts. Returns the round's queued job
    ids to send (the retried one included). Refuses a job that is not failed."""
    from services.rounds import resume_round

    if extra_attempts < 1:
        raise InputError(f"--attempts: {extra_attempts} must be at least 1")
    job = get_job(session, job_id)
    if job.state != JobState.FAILED:
        hint = {"done": "it finished", "running": "it is running", "queued": "it is already waiting for a worker",
                "cancelled": "it was cancelled with its round"}.get(job.state, "")
        raise StateError(f"job {job_id} ({job.key}, round {job.round_id}) is {job.state}"
                         + (f": {hint}" if hint else "") + "; only a failed job can be retried")
    round_ = get_by_id(session, Round, job.round_id, "round", lock=True)
    if round_.state == RoundState.CANCELLED:
        raise StateError(f"job {job_id}: its round {round_.id} was cancelled; start a new round instead")
    # Conditional: a second `retry` racing this one finds the job queued and changes nothing.
    changed = session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.FAILED).values(
        state=JobState.QUEUED, max_attempts=Job.attempts + extra_attempts, progress=0.0, owner=None,
        heartbeat_at=None, started_at=None, finished_at=None)).rowcount  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult
    if changed != 1:
        raise StateError(f"job {job_id} changed while retrying it; look again with `w2sctl jobs show {job_id}`")
    if round_.state == RoundState.FAILED:
        _reopen(session, round_)
    session.flush()
    return resume_round(session, round_.id, delivery)


def _reopen(session: Session, round_: Round) -> None:
    """The round failed because of this job: it runs again, with the jobs its failure cancelled."""
    round_.state, round_.error, round_.finished_at = RoundState.RUNNING, None, None
    session.execute(update(Job).where(Job.round_id == round_.id, Job.state == JobState.CANCELLED).values(
        state=JobState.QUEUED, finished_at=None, owner=None))
    if round_.pipeline_id is not None:
        pipeline = get_by_id(session, Pipeline, round_.pipeline_id, "pipeline")
        newer = session.scalar(select(Round.id).where(Round.pipeline_id == pipeline.id, Round.id > round_.id).limit(1))
        if pipeline.state in ("stopped", "failed") and newer is None:  # it stopped at this round
            pipeline.state, pipeline.reason, pipeline.finished_at = "running", None, None
