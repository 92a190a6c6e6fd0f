"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Explicit names (stable across refactors, readable in Flower) and a time limit per kind.
"""

from __future__ import annotations

from workers.app import app
from workers.dispatch import enqueue
from workers.runner import run_job
from workers.steps import HANDLERS

# Soft limits let the handler fail cleanly (the job is retried or marked failed); hard limits
# kill a stuck process. Training runs enforce their own timeout on the DeepSpeed launcher.
TIME_LIMITS_S = {"generate": 6 * 3600, "vote": 3600, "pairs": 3600, "train": 11 * 3600, "evaluate": 6 * 3600, "promote": 3600}


def _make_task(kind: str):
    def task(job_id: int) -> str:
        return run_job(job_id, HANDLERS[kind], enqueue=enqueue)

    task.__name__ = f"{kind}_task"
    return app.task(name=f"w2s.{kind}", soft_time_limit=TIME_LIMITS_S[kind], time_limit=TIME_LIMITS_S[kind] + 300,
                    acks_late=True)(task)


TASKS = {kind: _make_task(kind) for kind in HANDLERS}
