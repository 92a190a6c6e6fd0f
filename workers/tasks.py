"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Explicit names (stable across refactors, readable in Flower) and a time limit per kind
(services.settings: W2S_TIME_LIMIT_<KIND>_S). The soft limit lets the handler fail cleanly (the job
is retried or marked failed); the hard limit, a little later, kills a stuck process. A training
job's launch is killed with its process group when the soft limit interrupts it.
"""

from __future__ import annotations

import logging

from services.contracts.graph import KINDS
from workers.app import app, settings
from workers.dispatch import JobDispatcher
from workers.execute import execute
from workers.runner import DatabaseUnavailable
from workers.steps import HANDLERS

log = logging.getLogger("w2s.worker")

HARD_LIMIT_GRACE_S = 300
# A training run can outlast any sensible broker visibility timeout: its message is acknowledged
# when the run starts, and from then on the job's lease in the database tracks it (a train worker
# that dies is noticed by its lapsed heartbeat and the job re-planned). Shorter jobs keep their
# message unacknowledged until they end, so the broker also redelivers them. A worker takes no
# further message while its processes are busy (worker_disable_prefetch, workers.app), so a train
# worker killed mid-run strands no other job's message in its reservation.
ACK_ON_START = {str(kind) for kind, spec in KINDS.items() if spec.ack_on_start}  # from the step graph


# A message whose job could not even be read (the database is down) is sent back with back-off,
# doubling from W2S_RETRY_BACKOFF_S up to this, for as long as the outage lasts.
DATABASE_RETRY_MAX_S = 300.0


def _make_task(kind: str):
    def task(self, job_id: int) -> str:
        try:
            return execute(kind, job_id, settings, JobDispatcher(settings))
        except DatabaseUnavailable as exc:
            delay = min(DATABASE_RETRY_MAX_S, settings.delivery.retry_backoff_s * 2 ** self.request.retries)
            log.warning("%s; message sent back, retry in %.1f s", exc, delay)
            raise self.retry(countdown=delay) from None

    limit = settings.delivery.time_limit(kind)
    task.__name__ = f"{kind}_task"
    return app.task(name=f"w2s.{kind}", bind=True, max_retries=None, soft_time_limit=limit, time_limit=limit + HARD_LIMIT_GRACE_S,
                    acks_late=kind not in ACK_ON_START)(task)


TASKS = {kind: _make_task(kind) for kind in HANDLERS}
