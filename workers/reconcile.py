"""Reconciliation: the database says which jobs wait to run, the broker must agree.

A job `queued` in the database needs a message that will run it. That message can be lost in
several ways: a send that failed (the broker was down when the round started, or when the
watchdog re-planned an expired lease), a message dropped (FLUSHALL, a broker restart without its
append-only file), or one stranded in the reservation of a worker that was killed (Redis hands it
out again only after the visibility timeout, a day). Rather than handling each of those where it
happens, the control worker periodically compares the two sides and re-sends what is missing.

A job counts as having a message when one waits in its queue, or a live worker holds it (active,
reserved, or scheduled for a retry). A job without one is re-sent once it has been seen without
one for a grace period (a message being handed from the queue to a worker is briefly in neither
place). Sending one message too many is harmless: the claim (a conditional UPDATE that bumps the
attempt number, workers.runner.claim) lets exactly one copy run the job, the others find it taken
and are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select

from db.schema import Job, Round
from db.session import session_scope
from services.monitor import MessageCensus, message_census
from services.settings import Settings

log = logging.getLogger("w2s.reconcile")


def jobs_to_resend(queued: Iterable[int], census: MessageCensus, missing_since: dict[int, float], now: float,
                   grace_s: float) -> tuple[list[int], dict[int, float]]:
    """The rule, without I/O: which queued jobs to send again, and since when each one still
    without a message has been seen so. A job re-sent starts a new grace period."""
    missing = {job: missing_since.get(job, now) for job in queued if not census.has_message(job)}
    due = sorted(job for job, since in missing.items() if now - since >= grace_s)
    return due, {job: (now if job in due else since) for job, since in missing.items()}


def queued_jobs(database_url: str) -> list[int]:
    """Queued jobs of running rounds (a finished or cancelled round's jobs are not to be run)."""
    with session_scope(database_url) as session:
        return list(session.scalars(select(Job.id).join(Round, Round.id == Job.round_id)
                                    .where(Job.state == "queued", Round.state == "running").order_by(Job.id)))


@dataclass
class Reconciler:
    """Holds, between passes, since when each job has been seen without a message."""

    settings: Settings
    grace_s: float
    inspect_timeout: float = 1.0
    missing_since: dict[int, float] = field(default_factory=dict)
    broker_url: str = field(init=False)

    def __post_init__(self) -> None:
        if self.settings.broker_url is None:  # the watchdog builds one only with a broker
            raise ValueError("reconciliation compares the database with the broker: these settings name no broker")
        self.broker_url = self.settings.broker_url

    def run_once(self, now: float | None = None) -> list[int]:
        """One pass: look, decide, send. Returns the ids sent."""
        from services.monitor import control_app
        from workers.dispatch import JobDispatcher

        started = time.monotonic()
        queued = queued_jobs(self.settings.database_url)
        with control_app(self.broker_url) as app:
            census = message_census(self.broker_url, app, self.inspect_timeout)
        if census is None:
            log.warning("reconciliation: the broker is not Redis; its queues cannot be read, nothing checked")
            return []
        due, self.missing_since = jobs_to_resend(queued, census, self.missing_since,
                                                 time.monotonic() if now is None else now, self.grace_s)
        if due:
            JobDispatcher(self.settings).enqueue(due)
        record_pass(checked=len(queued), missing=len(self.missing_since), resent=due,
                    seconds=time.monotonic() - started)
        return due


def record_pass(*, checked: int, missing: int, resent: list[int], seconds: float) -> None:
    """A log line (with its timestamp, as every line) and the metrics of one pass."""
    if resent:
        log.warning("reconciliation: %d queued job(s) had no message for the grace period; sent again: %s",
                    len(resent), resent)
    log.info("reconciliation pass: %d queued job(s) checked, %d without a message, %d sent again (%.2f s)",
             checked, missing, len(resent), seconds)
    metrics = watchdog_metrics()
    if metrics:
        metrics["passes"].labels("ok").inc()
        metrics["resent"].inc(len(resent))


def record_failure(what: str, exc: BaseException) -> None:
    log.warning("%s failed: %s", what, exc)
    metrics = watchdog_metrics()
    if metrics:
        if what == "reconciliation":
            metrics["passes"].labels("failed").inc()
        else:
            metrics["send_failures"].inc()


_metrics: dict | None = None


def watchdog_metrics() -> dict | None:
    """Counters of the control worker's watchdog process, in the worker's multiprocess metrics
    directory (workers.telemetry), so the worker's endpoint exports them. None without metrics."""
    global _metrics
    import os

    # The worker sets prometheus_client's directory only when its metrics are on (W2S_METRICS_PORT).
    if _metrics is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import Counter

        _metrics = {
            "passes": Counter("w2s_reconcile_passes", "Reconciliation passes of the control worker, by outcome",
                              ["outcome"]),
            "resent": Counter("w2s_reconcile_resent_jobs", "Queued jobs the reconciliation found without a message "
                              "and sent again"),
            "send_failures": Counter("w2s_watchdog_send_failures", "Watchdog passes whose sends failed (they are "
                                     "retried at the next pass)"),
        }
    return _metrics
