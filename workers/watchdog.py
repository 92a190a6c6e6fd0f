"""The control worker's watchdog: advance every running round now and then, so a job whose worker
died or whose host dropped off the network is re-planned once its lease runs out, even when no
other job finishes to trigger `advance`."""

from __future__ import annotations

import logging
import os
import threading

from sqlalchemy import select

from db.schema import Round
from db.session import session_scope
from services.config import load_settings
from services.rounds import advance

log = logging.getLogger("w2s.watchdog")


def sweep(database_url: str) -> list[int]:
    """One pass: advance each running round in its own transaction; returns the job ids to send."""
    with session_scope(database_url) as session:
        round_ids = list(session.scalars(select(Round.id).where(Round.state == "running").order_by(Round.id)))
    to_send: list[int] = []
    for round_id in round_ids:
        with session_scope(database_url) as session:
            to_send += advance(session, round_id)
    return to_send


def watch(interval_s: float, parent_pid: int | None = None, stop: threading.Event | None = None) -> None:
    from workers.dispatch import enqueue

    stop = stop or threading.Event()
    url = load_settings().database_url
    while not stop.wait(interval_s):
        if parent_pid is not None and os.getppid() != parent_pid:
            return  # the worker is gone
        try:
            job_ids = sweep(url)
            if job_ids:
                log.warning("watchdog: sending %d job(s) again or for the first time: %s", len(job_ids), job_ids)
                enqueue(job_ids)
        except Exception as exc:  # noqa: BLE001 - the database or broker is away; try again next time
            log.warning("watchdog pass failed: %s", exc)
