"""The Celery app: broker, queues, routing, JSON only. The database is the truth; this is transport."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

import workers.telemetry  # noqa: F401  (logs with job ids, Prometheus metrics, worker info: Celery signals)
from services.config import QUEUES, load_settings

# Longer than the longest job a message can stand for, so Redis does not redeliver a job that is
# still running; a redelivery that does happen finds the job claimed in the database and returns.
VISIBILITY_TIMEOUT_S = 12 * 3600


def make_app() -> Celery:
    settings = load_settings()
    app = Celery("w2s", broker=settings.broker_url or "memory://", include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # a pickled message is refused
        task_ignore_result=True,  # results live in the database, not in a result backend
        task_acks_late=True,  # a worker that dies mid-job leaves the message to be redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time per process: jobs are long
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="control",
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs) -> None:
    """A forked worker must not share the parent's database sockets."""
    from db.session import dispose_engines

    dispose_engines()
