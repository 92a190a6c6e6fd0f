"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Explicit names (stable across refactors, readable in Flower) and a time limit per kind
(workers.delivery: W2S_TIME_LIMIT_<KIND>_S). The soft limit lets the handler fail cleanly (the job
is retried or marked failed); the hard limit, a little later, kills a stuck process. A training
job's launch is killed with its process group when the soft limit interrupts it.
"""

from __future__ import annotations

from workers.app import app
from workers.delivery import load_delivery
from workers.dispatch import enqueue
from workers.runner import run_job
from workers.steps import HANDLERS

HARD_LIMIT_GRACE_S = 300
# A training run can outlast any sensible broker visibility timeout: its message is acknowledged
# when the run starts, and from then on the job's lease in the database tracks it (a train worker
# that dies is noticed by its lapsed heartbeat and the job re-planned). Shorter jobs keep their
# message unacknowledged until they end, so the broker also redelivers them.
ACK_ON_START = {"train"}


def _make_task(kind: str):
    def task(job_id: int) -> str:
        return run_job(job_id, HANDLERS[kind], enqueue=enqueue)

    limit = load_delivery().time_limit(kind)
    task.__name__ = f"{kind}_task"
    return app.task(name=f"w2s.{kind}", soft_time_limit=limit, time_limit=limit + HARD_LIMIT_GRACE_S,
                    acks_late=kind not in ACK_ON_START)(task)


TASKS = {kind: _make_task(kind) for kind in HANDLERS}
