"""`round cancel`: mark the round cancelled, revoke its queued messages, wait for running jobs to stop.

The database transaction is what makes the cancel safe (nothing of the round can be claimed or
kept after it commits, see services.rounds.cancel_round); the wait is what makes the
acknowledgement true: each running attempt's heartbeat finds the job cancelled, stops its handler
and clears `heartbeat_at`. A worker that cannot be reached (its host is down) is taken as stopped
once its lease has run out; until then it is reported as unconfirmed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select

from db.schema import Job, utcnow
from db.session import session_scope
from services.rounds import cancel_round
from services.settings import DeliverySettings, Settings
from services.tracking import record_round_end


@dataclass
class CancelOutcome:
    queued: int
    running: int
    unconfirmed: list[int] = field(default_factory=list)


def still_running(session, job_ids: list[int], delivery: DeliverySettings) -> list[int]:
    """Cancelled jobs whose attempt has not yet said it stopped and whose lease is still live."""
    if not job_ids:
        return []
    now = utcnow()
    rows = session.execute(select(Job.id, Job.kind, Job.heartbeat_at).where(
        Job.id.in_(job_ids), Job.heartbeat_at.is_not(None))).all()
    live = []
    for job_id, kind, heartbeat_at in rows:
        if heartbeat_at.tzinfo is None:  # SQLite keeps naive UTC
            heartbeat_at = heartbeat_at.replace(tzinfo=now.tzinfo)
        if heartbeat_at >= now - timedelta(seconds=delivery.lease(kind)):
            live.append(job_id)
    return live


def cancel(settings: Settings, round_id: int) -> CancelOutcome:
    from workers.dispatch import JobDispatcher, discard_local

    delivery = settings.delivery
    with session_scope(settings.database_url) as session:
        cancelled = cancel_round(session, round_id, delivery)
    if settings.embedded:
        discard_local(cancelled.queued)
    else:
        JobDispatcher(settings).revoke(cancelled.queued + cancelled.running)
    deadline = time.monotonic() + delivery.cancel_wait_s
    while True:
        with session_scope(settings.database_url) as session:
            live = still_running(session, cancelled.running, delivery)
        if not live or time.monotonic() > deadline:
            break
        time.sleep(min(0.2, delivery.heartbeat("generate")))
    record_round_end(settings, round_id)  # its tracking run ends KILLED
    return CancelOutcome(queued=len(cancelled.queued), running=len(cancelled.running), unconfirmed=live)
