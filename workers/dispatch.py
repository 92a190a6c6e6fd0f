"""Send jobs to their queues: through the broker, or to an in-process worker in embedded mode."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select

from db.schema import Job
from db.session import session_scope
from services.errors import W2SError
from services.settings import Settings

# Embedded mode: jobs wait here and `drain` runs them one at a time in this process, through the
# same code a worker's task runs (workers.execute), so both modes share one path.
_local_queue: deque[int] = deque()


class JobDispatcher:
    """The `services.dispatch.Dispatcher` for given settings: the broker, or this process's queue
    when there is no broker (embedded mode)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def enqueue(self, job_ids: Iterable[int], *, countdown: float | None = None) -> None:
        job_ids = list(job_ids)
        if not job_ids:
            return
        settings = self.settings
        if settings.embedded:
            _local_queue.extend(job_ids)
            return
        from workers.app import app  # by task name: sending needs neither the handlers nor torch

        with session_scope(settings.database_url) as session:
            jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)).all()
            routes = [(job.id, job.kind, job.queue) for job in jobs]
        try:
            for job_id, kind, queue in routes:
                app.send_task(f"w2s.{kind}", args=[job_id], queue=queue, countdown=countdown, task_id=task_id(job_id))
        except (KombuOperationalError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SendFailed(f"could not send job(s) {', '.join(str(r[0]) for r in routes)}: the broker at "
                             f"{settings.redacted_broker_url()} (W2S_BROKER_URL) is unreachable: {reason}") from None

    def drain(self, on_job_done: Callable[[int], None] | None = None) -> int:
        """Run queued jobs in-process until none is left, through the same code a worker's task
        runs (workers.execute). Returns how many ran."""
        from workers.execute import execute  # the handlers (and torch) only when a job runs here

        ran = 0
        while _local_queue:
            job_id = _local_queue.popleft()
            with session_scope(self.settings.database_url) as session:
                job = session.get(Job, job_id)
                kind = job.kind if job else None
            if kind is None:
                continue
            execute(kind, job_id, self.settings, self)
            ran += 1
            if on_job_done:
                on_job_done(job_id)
        return ran

    def revoke(self, job_ids: Iterable[int]) -> None:
        """Tell every worker to drop the messages of these jobs (queued, or waiting for a retry).

        Belt and braces: a message of a cancelled job that does get delivered finds the job
        cancelled in the database and runs nothing. Running jobs are stopped by their heartbeat.
        """
        ids = [task_id(job_id) for job_id in job_ids]
        if not ids or self.settings.embedded:
            return
        from workers.app import app

        app.control.revoke(ids)


class SendFailed(W2SError):
    """The broker refused or could not be reached: the jobs stay queued in the database, and the
    control worker's reconciliation (workers.reconcile) sends them once the broker is back."""


def task_id(job_id: int) -> str:
    """Every message for one job carries the same id, so `revoke` reaches every copy of it and the
    reconciliation (workers.reconcile) tells from a message which job it runs."""
    from services.monitor import TASK_ID_PREFIX

    return f"{TASK_ID_PREFIX}{job_id}"


def discard_local(job_ids: Iterable[int]) -> None:
    """Embedded mode: forget queued jobs (a cancelled round's)."""
    drop = set(job_ids)
    kept = [job_id for job_id in _local_queue if job_id not in drop]
    _local_queue.clear()
    _local_queue.extend(kept)


def pending_local() -> int:
    return len(_local_queue)
