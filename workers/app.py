"""The Celery app: broker, queues, routing, delivery semantics, JSON only. The database is the
truth; this is transport. Delivery settings (timeouts, limits) come from services.settings.

This module is the worker's edge: its settings are read here, once, when Celery loads the app."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import task_rejected, worker_process_init
from kombu import Queue

from services.config import QUEUES
from services.settings import Settings, apply_torch_threads, load_settings
from workers import telemetry  # logs with job ids, Prometheus metrics, worker info: Celery signals

log = logging.getLogger("w2s.worker")


def make_app(settings: Settings) -> Celery:
    delivery = settings.delivery
    # Redis redelivers an unacknowledged message after this: longer than the longest job, so the
    # broker never hands out a job that still runs; a lost worker's job is re-planned much sooner
    # from its lease in the database (workers.runner).
    transport: dict = {"visibility_timeout": delivery.visibility_timeout_s}
    if delivery.unacked_restore_s:
        transport |= {"unacked_restore_interval": delivery.unacked_restore_s, "unacked_restore_throttle": 1}
    app = Celery("w2s", broker=settings.broker_url or "memory://", include=["workers.tasks"])
    app.conf.update(
        # JSON only, on both sides: a pickled message (which could run code when loaded) is refused
        # by the worker, logged and dropped; this side never produces one.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,  # results live in the database, not in a result backend
        task_acks_late=True,  # a worker that dies mid-job leaves the message to be redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time per process: jobs are long
        # ... and none reserved ahead while every process is busy (Celery >= 5.6, Redis only): a
        # message whose run acknowledged it at the start (training, workers.tasks.ACK_ON_START)
        # no longer frees a slot that the next message would wait in, stranded if the worker dies.
        worker_disable_prefetch=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="control",
        broker_transport_options=transport,
        result_backend_transport_options=transport,  # the same, should a Redis result backend be set
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart is waited out, never fatal
        # A worker that lost the broker cannot ack what it runs; it stops those jobs (their leases
        # lapse and they are re-planned) instead of finishing work whose message comes back anyway.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # On SIGTERM (scaling down, a deploy) running jobs get this long before a cold shutdown;
        # what is cut off is requeued (acks_late) and re-planned from its lease.
        worker_soft_shutdown_timeout=delivery.soft_shutdown_s,
        worker_hijack_root_logger=False,
    )
    return app


settings = load_settings()  # the worker's settings (`w2sctl worker` sets its GPUs and name first)
telemetry.use_settings(settings)  # its signal handlers read them
app = make_app(settings)


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs) -> None:
    """A forked worker must not share the parent's database sockets."""
    from db.session import dispose_engines
    from workers.roles import pin_this_process

    dispose_engines()
    pin_this_process(settings.pin_gpus)  # a model role's pool process uses one GPU of the worker's --gpus
    threads, source = apply_torch_threads(settings)
    log.info("worker process started: torch intra-op threads %d (%s)", threads, source)


@task_rejected.connect
def _log_refused_message(message=None, exc=None, **_kwargs) -> None:
    """Celery drops a message it may not decode (e.g. pickle); say so in w2s's own log."""
    info = getattr(message, "delivery_info", {}) or {}
    log.error("refused a message on queue %s (content type %s): %s",
              info.get("routing_key", "?"), getattr(message, "content_type", "?"), exc)
