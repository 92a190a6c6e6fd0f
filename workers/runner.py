"""Running one job: claim it, run its handler, record the outcome, advance the round.

The attempt number is a fencing token: a job's results are committed only in a transaction that
also checks the job is still running under the same attempt, so a worker that lost its claim
(its lease expired and another worker took over) writes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from db.schema import Job, Round, utcnow
from db.session import session_scope
from services.config import Settings, load_settings
from services.rounds import TERMINAL_ROUND_STATES, advance

log = logging.getLogger("w2s.worker")

# A running job whose worker has not heart-beaten for this long may be claimed again.
LEASE = timedelta(minutes=30)
RETRY_BACKOFF_S = 30.0


class Superseded(RuntimeError):
    """This attempt no longer owns the job: its results must not be kept."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobContext:
    """What a handler gets: the job's identity and fenced ways to write."""

    settings: Settings
    job_id: int
    round_id: int
    attempt: int
    payload: dict[str, Any]

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.settings.database_url) as session:
            yield session

    def _fence(self, session: Session, **values: Any) -> None:
        result = session.execute(
            update(Job)
            .where(Job.id == self.job_id, Job.attempts == self.attempt, Job.state == "running")
            .values(heartbeat_at=utcnow(), **values)
        )
        if result.rowcount != 1:
            raise Superseded(f"job {self.job_id} attempt {self.attempt} no longer owns the job")

    def progress(self, session: Session, fraction: float) -> None:
        """Record progress (and heartbeat) inside the caller's transaction, fenced."""
        self._fence(session, progress=max(0.0, min(1.0, fraction)))

    def finish(self, session: Session, result: dict[str, Any]) -> None:
        """Mark the job done inside the transaction that writes its results, fenced."""
        self._fence(session, state="done", progress=1.0, result=result, finished_at=utcnow(), error=None)

    def set_log_path(self, path: str) -> None:
        with self.session() as session:
            self._fence(session, log_path=path)


def claim(session: Session, job_id: int) -> Job | None:
    """Take a queued job (or one whose lease expired) with a conditional update; None if not ours."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < Job.max_attempts,
            or_(Job.state == "queued", (Job.state == "running") & (Job.heartbeat_at < now - LEASE)),
        )
        .values(state="running", attempts=Job.attempts + 1, owner=worker_id(), heartbeat_at=now, started_at=now,
                progress=0.0)
    )
    if result.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def run_job(job_id: int, handler: Callable[[JobContext], None], *, enqueue: Callable[..., None]) -> str:
    """Claim, run, record, advance. Returns what happened, for logs and tests."""
    settings = load_settings()
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return "missing"
        round_ = session.get(Round, job.round_id)
        if round_.state in TERMINAL_ROUND_STATES:
            if job.state in ("queued", "running"):
                job.state, job.finished_at = "cancelled", utcnow()
            return "round-over"
        job = claim(session, job_id)
        if job is None:
            return "not-claimed"  # done, running elsewhere, or out of attempts
        ctx = JobContext(settings, job.id, job.round_id, job.attempts, dict(job.payload or {}))
        retry_left = job.attempts < job.max_attempts

    from services.logs import bind_job  # every log line of this job carries its ids

    bind_job(round_id=ctx.round_id, job_id=job_id, attempt=ctx.attempt)
    log.info("job %s attempt %s started", job_id, ctx.attempt, extra={"round_id": ctx.round_id, "job_id": job_id})
    try:
        handler(ctx)
        outcome = "done"
    except Superseded as exc:
        log.warning("%s", exc)
        return "superseded"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        log.exception("job %s attempt %s failed", job_id, ctx.attempt)
        outcome = _record_failure(settings, ctx, exc, retry_left)

    with session_scope(settings.database_url) as session:
        new_ids = advance(session, ctx.round_id)
    enqueue(new_ids)
    if outcome == "retry":  # back off: transient causes (a busy GPU, a network blip) get time to clear
        enqueue([job_id], countdown=RETRY_BACKOFF_S * 2 ** (ctx.attempt - 1))
    return outcome


def _record_failure(settings: Settings, ctx: JobContext, exc: Exception, retry_left: bool) -> str:
    message = f"{type(exc).__name__}: {exc}"
    detail = "".join(traceback.format_exception(exc))[-4000:]
    with session_scope(settings.database_url) as session:
        values = {"error": message if len(message) < 2000 else message[:2000] + "…", "finished_at": utcnow()}
        values["state"] = "queued" if retry_left else "failed"
        result = session.execute(
            update(Job).where(Job.id == ctx.job_id, Job.attempts == ctx.attempt, Job.state == "running").values(**values)
        )
        if result.rowcount != 1:
            return "superseded"
    log.debug("job %s traceback:\n%s", ctx.job_id, detail)
    return "retry" if retry_left else "failed"
