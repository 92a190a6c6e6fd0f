"""Running one job: claim it, run its handler under a heartbeat, record the outcome, advance the round.

The attempt number is a fencing token: a job's results are committed only in a transaction that
also checks the job is still running under the same attempt, so a worker that lost its claim
(its lease expired and another worker took over, or the round was cancelled) writes nothing.
While the handler runs, a heartbeat thread renews the lease; when a heartbeat finds the attempt
superseded it sets the job's stop signal, and the handler stops at its next safe point
(models.stopping: between generation batches, after a token, between LECO rethinks, in the
training launch's wait, which then kills the launcher's process group).
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from db.schema import Job, Round, utcnow
from db.session import session_scope
from models.stopping import Stopped, StopSignal, stopping
from services.contracts import TERMINAL_ROUND_STATES
from services.rounds import advance
from services.settings import Settings
from services.tracking import record_round_end

log = logging.getLogger("w2s.worker")


class Superseded(RuntimeError):
    """This attempt no longer owns the job: its results must not be kept."""


class DatabaseUnavailable(RuntimeError):
    """The job could not even be read or claimed: its message must go back to the broker (the
    task retries it with back-off), not be acknowledged as if the job had run."""


def worker_id(worker_name: str | None = None) -> str:
    """`<node>:<pid>`: the Celery node name (`w2sctl worker` sets W2S_WORKER_NAME), else the host name."""
    return f"{worker_name or socket.gethostname()}:{os.getpid()}"


@dataclass
class JobContext:
    """What a handler gets: the job's identity and fenced ways to write."""

    settings: Settings
    job_id: int
    round_id: int
    attempt: int
    payload: dict[str, Any]
    kind: str = ""
    stop: StopSignal = field(default_factory=StopSignal)  # set once this attempt lost the job
    finished: bool = False  # `finish` marked the job done (in the handler's transaction)

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
        if result.rowcount != 1:  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult
            raise Superseded(f"job {self.job_id} attempt {self.attempt} no longer owns the job")

    def progress(self, session: Session, fraction: float) -> None:
        """Record progress (and heartbeat) inside the caller's transaction, fenced. This locks the
        job's row until that transaction ends, and the heartbeat waits for it: only for a
        transaction that commits right after (a generation chunk's); a long one uses `page_done`."""
        self._fence(session, progress=max(0.0, min(1.0, fraction)))

    def page_done(self, session: Session, fraction: float) -> None:
        """Progress of a long transaction (the vote's, the pairs'), fenced, without locking the job's
        row in it: a fenced write in it would hold that row until the final commit, and the
        heartbeat's UPDATE would wait behind it for the whole job (minutes at 70,000 questions,
        longer than the lease: the job stopped itself). PostgreSQL: the progress commits in a short
        transaction of its own (seen by `round status` at once; a stale attempt raises Superseded
        there). SQLite has one writer for the whole database, so a second connection would wait for
        this transaction: a read checks the fence instead. Either way the results still commit only
        with `finish`'s fenced done mark."""
        if session.get_bind().dialect.name == "sqlite":
            owned = session.scalar(select(Job.id).where(Job.id == self.job_id, Job.attempts == self.attempt,
                                                        Job.state == "running"))
            if owned is None:
                raise Superseded(f"job {self.job_id} attempt {self.attempt} no longer owns the job")
            return
        with self.session() as own:
            self._fence(own, progress=max(0.0, min(1.0, fraction)))

    def finish(self, session: Session, result: dict[str, Any]) -> None:
        """Mark the job done inside the transaction that writes its results, fenced."""
        self._fence(session, state="done", progress=1.0, result=result, finished_at=utcnow(), error=None)
        self.finished = True

    def set_log_path(self, path: str) -> None:
        with self.session() as session:
            self._fence(session, log_path=path)

    def beat(self) -> None:
        """Renew the lease, fenced: raises Superseded if this attempt no longer owns the job."""
        with self.session() as session:
            self._fence(session)


class Heartbeat:
    """Renews a job's lease every `interval` seconds from a thread; sets the job's stop signal
    (`ctx.stop`) when a beat finds the attempt superseded. A beat that cannot reach the database
    is only logged, until no beat got through for a whole `lease`: by then the job may be
    re-planned elsewhere, so this attempt stops itself too (a host cut off from the database does
    not go on writing to the shared checkpoint store)."""

    def __init__(self, ctx: JobContext, interval: float, lease: float) -> None:
        self.ctx, self.interval, self.lease = ctx, interval, lease
        self._stop = threading.Event()
        # Run in a copy of this context: the heartbeat's log lines carry the job's ids (services.logs).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"heartbeat-job{ctx.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)

    def _run(self) -> None:
        # Each beat runs in a thread of its own, so that a beat stuck on a dead connection (a host
        # cut off: no error for minutes) does not stop the count of time since the last good one.
        last_beat = time.monotonic()
        while not self._stop.wait(self.interval):
            outcome: dict = {}
            beat = threading.Thread(target=contextvars.copy_context().run, args=(self._beat_once, outcome),
                                    daemon=True)
            beat.start()
            beat.join(timeout=self.interval)
            while beat.is_alive() and time.monotonic() - last_beat <= self.lease and not self._stop.is_set():
                beat.join(timeout=self.interval)
            if "superseded" in outcome:
                log.warning("%s: stopping it", outcome["superseded"])
                self.ctx.stop.set(str(outcome["superseded"]))
                return
            if "ok" in outcome:
                last_beat = time.monotonic()
            elif time.monotonic() - last_beat > self.lease and not self._stop.is_set():
                log.warning("job %s: no heartbeat got through for %.0f s (its lease): stopping it",
                            self.ctx.job_id, self.lease)
                self.ctx.stop.set(f"no heartbeat got through for {self.lease:.0f} s (the job's lease)")
                return

    def _beat_once(self, outcome: dict) -> None:
        try:
            self.ctx.beat()
            outcome["ok"] = True
        except Superseded as exc:
            outcome["superseded"] = exc
        except Exception as exc:  # noqa: BLE001 - the database or the network is down for now
            log.warning("job %s heartbeat failed: %s", self.ctx.job_id, exc)

def claim(session: Session, job_id: int, lease: timedelta, owner: str | None = None) -> Job | None:
    """Take a queued job (or one whose lease expired) with a conditional update; None if not ours."""
    now = utcnow()
    # RETURNING the claimed row: one round trip, not an update and a read.
    return session.scalars(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < Job.max_attempts,
            or_(Job.state == "queued", (Job.state == "running") & (Job.heartbeat_at < now - lease)),
        )
        .values(state="running", attempts=Job.attempts + 1, owner=owner or worker_id(), heartbeat_at=now, started_at=now,
                progress=0.0)
        .returning(Job),
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).one_or_none()


def run_job(job_id: int, handler: Callable[[JobContext], None], *, settings: Settings,
            enqueue: Callable[..., None]) -> str:
    """Claim, run under a heartbeat, record, advance. Returns what happened, for logs and tests."""
    delivery = settings.delivery
    try:
        with session_scope(settings.database_url) as session:
            # The job's kind and its round's state in one read (the round row's JSON is not needed).
            found = session.execute(select(Job.kind, Round.state).join(Round, Round.id == Job.round_id)
                                    .where(Job.id == job_id)).first()
            if found is None:
                log.warning("job %s does not exist; message dropped", job_id)
                return "missing"
            kind, round_state = found
            if round_state in TERMINAL_ROUND_STATES:
                session.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                                .values(state="cancelled", finished_at=utcnow()))
                return "round-over"
            job = claim(session, job_id, timedelta(seconds=delivery.lease(kind)), worker_id(settings.worker_name))
            if job is None:
                return "not-claimed"  # done, running elsewhere, or out of attempts
            ctx = JobContext(settings, job.id, job.round_id, job.attempts, dict(job.payload or {}), kind=kind)
            retry_left = job.attempts < job.max_attempts
    except DBAPIError as exc:
        if not exc.connection_invalidated and not isinstance(exc, (OperationalError, InterfaceError)):
            raise
        # Nothing happened yet (or a claim whose commit went unconfirmed: its lease will lapse).
        raise DatabaseUnavailable(f"job {job_id}: the database is unreachable before the claim: "
                                  f"{str(exc.orig or exc).strip().splitlines()[0]}") from exc

    from services.logs import bind_job  # every log line of this job carries its ids

    bind_job(round_id=ctx.round_id, job_id=job_id, attempt=ctx.attempt)
    log.info("job %s attempt %s started", job_id, ctx.attempt, extra={"round_id": ctx.round_id, "job_id": job_id})
    try:
        try:
            with Heartbeat(ctx, delivery.heartbeat(kind), delivery.lease(kind)), stopping(ctx.stop):
                handler(ctx)
            outcome = "done"
        finally:
            if not ctx.finished:  # a job marked done was not cancelled: nothing to acknowledge
                _release_if_cancelled(ctx)
    except (Superseded, Stopped) as exc:
        log.warning("job %s attempt %s stopped: %s", job_id, ctx.attempt, exc or "it no longer owns the job")
        return "superseded"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        log.exception("job %s attempt %s failed", job_id, ctx.attempt)
        outcome = _record_failure(settings, ctx, exc, retry_left)

    with session_scope(settings.database_url) as session:
        new_ids = advance(session, ctx.round_id, delivery, after_job=job_id)
        # Read under advance's lock on the round: a round that ends later is seen by whoever ends it.
        ended = session.scalar(select(Round.state).where(Round.id == ctx.round_id)) in TERMINAL_ROUND_STATES
    if ended:  # a round that just ended: its figures to experiment tracking
        record_round_end(settings, ctx.round_id)
    enqueue(new_ids)
    if outcome == "retry":  # back off: transient causes (a busy GPU, a network blip) get time to clear
        enqueue([job_id], countdown=delivery.retry_backoff_s * 2 ** (ctx.attempt - 1))
    return outcome


def _release_if_cancelled(ctx: JobContext) -> None:
    """Tell `round cancel` this attempt has stopped: a cancelled job's heartbeat_at becomes NULL."""
    try:
        with ctx.session() as session:
            session.execute(update(Job).where(Job.id == ctx.job_id, Job.attempts == ctx.attempt,
                                              Job.state == "cancelled").values(heartbeat_at=None))
    except Exception as exc:  # noqa: BLE001 - cancel then waits for the lease instead
        log.warning("job %s: could not look for a cancel to acknowledge: %s", ctx.job_id, exc)


def _record_failure(settings: Settings, ctx: JobContext, exc: Exception, retry_left: bool) -> str:
    message = f"{type(exc).__name__}: {exc}"
    detail = "".join(traceback.format_exception(exc))[-4000:]
    with session_scope(settings.database_url) as session:
        values = {"error": message if len(message) < 2000 else message[:2000] + "…", "finished_at": utcnow()}
        values["state"] = "queued" if retry_left else "failed"
        result = session.execute(
            update(Job).where(Job.id == ctx.job_id, Job.attempts == ctx.attempt, Job.state == "running").values(**values)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult
            return "superseded"
    log.debug("job %s traceback:\n%s", ctx.job_id, detail)
    return "retry" if retry_left else "failed"
