"""What a Celery task runs for a job, and what an embedded drain runs for each job: one path for
both modes. Below workers.tasks and workers.dispatch, so neither imports the other."""

from __future__ import annotations

from services.contracts import JobKind
from services.dispatch import Dispatcher
from services.settings import Settings
from workers.runner import run_job
from workers.steps import HANDLERS


def execute(kind: str, job_id: int, settings: Settings, dispatcher: Dispatcher) -> str:
    return run_job(job_id, HANDLERS[JobKind(kind)], settings=settings, enqueue=dispatcher.enqueue)
