"""Send jobs to their queues: through the broker, or to an in-process worker in embedded mode."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from sqlalchemy import select

from db.schema import Job
from db.session import session_scope
from services.config import load_settings

# Embedded mode: jobs wait here and `drain` runs them one at a time in this process, through the
# same Celery task code a worker runs (task.apply), so both modes share one path.
_local_queue: deque[int] = deque()


def enqueue(job_ids: Iterable[int], *, countdown: float | None = None) -> None:
    job_ids = list(job_ids)
    if not job_ids:
        return
    settings = load_settings()
    if settings.embedded:
        _local_queue.extend(job_ids)
        return
    from workers.tasks import TASKS

    with session_scope(settings.database_url) as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)).all()
        routes = [(job.id, job.kind, job.queue) for job in jobs]
    for job_id, kind, queue in routes:
        TASKS[kind].apply_async(args=[job_id], queue=queue, countdown=countdown)


def drain(on_job_done: Callable[[int], None] | None = None) -> int:
    """Run queued jobs in-process until none is left. Returns how many ran."""
    from workers.tasks import TASKS

    settings = load_settings()
    ran = 0
    while _local_queue:
        job_id = _local_queue.popleft()
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            kind = job.kind if job else None
        if kind is None:
            continue
        TASKS[kind].apply(args=[job_id], throw=True)
        ran += 1
        if on_job_done:
            on_job_done(job_id)
    return ran


def pending_local() -> int:
    return len(_local_queue)
