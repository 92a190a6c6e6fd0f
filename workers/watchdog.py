"""The control worker's watchdog: advance every running round now and then, so a job whose worker
died or whose host dropped off the network is re-planned once its lease runs out, even when no
other job finishes to trigger `advance`; and reconcile the database with the broker
(workers.reconcile), so no queued job waits for a message that will never come."""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import select

from db.schema import Round
from db.session import session_scope
from services.rounds import advance
from services.settings import DeliverySettings, Settings

log = logging.getLogger("w2s.watchdog")


def sweep(database_url: str, delivery: DeliverySettings) -> list[int]:
    """One pass: advance each running round in its own transaction; returns the job ids to send."""
    with session_scope(database_url) as session:
        round_ids = list(session.scalars(select(Round.id).where(Round.state == "running").order_by(Round.id)))
    to_send: list[int] = []
    for round_id in round_ids:
        with session_scope(database_url) as session:
            to_send += advance(session, round_id, delivery)
    return to_send


def watch(settings: Settings, interval_s: float, parent_pid: int | None = None, stop: threading.Event | None = None) -> None:
    """The loop: a sweep every `interval_s` (0: none) and a reconciliation every `reconcile_s`
    (0: none, and none in embedded mode). Jobs a sweep could not send are sent at the next pass."""
    from services.logs import configure_logging
    from workers.dispatch import JobDispatcher
    from workers.reconcile import Reconciler, record_failure

    configure_logging(logging.INFO, settings.log_format)  # a spawned process: its own logging, as the worker's
    stop = stop or threading.Event()
    delivery, enqueue = settings.delivery, JobDispatcher(settings).enqueue
    reconciler = (Reconciler(settings, delivery.reconcile_grace_s)
                  if settings.broker_url and delivery.reconcile_s > 0 else None)
    periods = [s for s in (interval_s, delivery.reconcile_s if reconciler else 0) if s > 0]
    if not periods:
        return
    tick = min(periods)
    next_sweep = next_reconcile = time.monotonic()
    unsent: set[int] = set()
    while not stop.wait(tick):
        if parent_pid is not None and os.getppid() != parent_pid:
            return  # the worker is gone
        now = time.monotonic()
        if interval_s > 0 and now >= next_sweep:
            next_sweep = now + interval_s
            try:
                unsent |= set(sweep(settings.database_url, delivery))
                if unsent:
                    log.warning("watchdog: sending %d job(s) again or for the first time: %s", len(unsent), sorted(unsent))
                    enqueue(sorted(unsent))
                    unsent.clear()
            except Exception as exc:  # noqa: BLE001 - the database or broker is away; try again next time
                record_failure(f"watchdog pass ({len(unsent)} job(s) to send next time)", exc)
        if reconciler is not None and now >= next_reconcile:
            next_reconcile = now + delivery.reconcile_s
            try:
                reconciler.run_once()
            except Exception as exc:  # noqa: BLE001 - the database or broker is away; try again next time
                record_failure("reconciliation", exc)


def start_watchdog(settings: Settings, interval_s: float):
    """Every interval, advance every running round: expired leases are re-planned, missed steps
    planned, and what that yields is sent. Safe beside other watchdogs (advance locks the round).
    Every W2S_RECONCILE_S, re-send queued jobs that have no message (workers.reconcile).

    A separate (spawned) process, not a thread: the worker forks its pool, and a fork taken while
    a thread holds a lock (logging, imports, a connection pool) leaves the child stuck on it. It
    exits when the worker does.
    """
    if interval_s <= 0 and settings.delivery.reconcile_s <= 0:
        return None
    import multiprocessing

    if settings.metrics_port:  # the watchdog's counters go where the worker's endpoint reads
        from workers.telemetry import metrics_directory

        metrics_directory()

    process = multiprocessing.get_context("spawn").Process(target=watch, args=(settings, interval_s, os.getpid()),
                                                           name="w2s-watchdog", daemon=True)
    process.start()
    return process
