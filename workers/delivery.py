"""Delivery settings: leases, heartbeats, attempts, time limits. One typed object, read from the
environment, so an operator (or a test) can shorten or lengthen them without code changes.

How a job survives failures, in one place:

- The broker may deliver a message twice (Redis redelivers unacknowledged messages after the
  visibility timeout; `task_reject_on_worker_lost` requeues the job of a worker that died). The
  database decides: a job is *claimed* by a conditional UPDATE that bumps its attempt number, so
  only one delivery runs it; the attempt number is the fencing token of every later write.
- While a job runs, a heartbeat thread renews its lease (`heartbeat_at`). A job whose lease ran
  out (its worker was killed, its host cut off) is put back in the queue by `advance`, which the
  control worker's watchdog calls every `watchdog_s`, and `round resume` calls on demand.
- A job queued in the database with no message to run it (a send that failed, a message dropped
  or flushed, one stranded in a dead worker's reservation) is re-sent by the control worker's
  reconciliation (workers.reconcile) every `reconcile_s`, once it has been seen without a message
  for `reconcile_grace_s`. A duplicate send is harmless: the claim runs one of the copies.
- A job that lost its worker `max_attempts` times (e.g. it runs the machine out of memory every
  time) ends failed with that reason instead of looping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, Field, ValidationError

from services.config import ConfigError
from services.contracts.graph import KINDS

# Per kind, from the step graph: how long a job may run before Celery's soft limit stops it (the
# job is then retried or failed), and how long its lease lasts without a heartbeat.
JOB_KINDS = tuple(str(kind) for kind in KINDS)
DEFAULT_TIME_LIMIT_S = {str(kind): spec.time_limit_s for kind, spec in KINDS.items()}
DEFAULT_LEASE_S = {str(kind): spec.lease_s for kind, spec in KINDS.items()}


class DeliverySettings(BaseModel):
    lease_s: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LEASE_S))
    time_limit_s: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIME_LIMIT_S))
    heartbeat_s: float | None = Field(None, gt=0, description="default: a tenth of the job's lease")
    watchdog_s: float = Field(30.0, ge=0, description="control worker: re-plan expired leases this often; 0 = off")
    reconcile_s: float = Field(30.0, ge=0, description="control worker: look for queued jobs that no message "
                               "will run (lost sends, dropped or flushed messages) this often; 0 = off")
    reconcile_grace_s: float = Field(60.0, ge=0, description="a queued job is re-sent once it has been seen "
                                     "without a message for this long (a message being handed over is not lost)")
    max_attempts: int = Field(3, ge=1, le=100, description="claims of one job before it ends failed")
    retry_backoff_s: float = Field(30.0, ge=0, description="first retry delay after a failure; doubles each time")
    # Longer than the longest job (Celery's guidance for Redis): the broker itself never
    # redelivers a message whose job is still running; leases handle lost workers much sooner.
    visibility_timeout_s: float = Field(26 * 3600, gt=0)
    unacked_restore_s: float | None = Field(None, gt=0, description="how often workers sweep messages past their "
                                            "visibility timeout back into the queue (kombu's default: about 100 s)")
    soft_shutdown_s: float = Field(60.0, ge=0, description="on SIGTERM, let running jobs finish this long")
    cancel_wait_s: float = Field(60.0, ge=0, description="`round cancel` waits this long for running jobs to stop")

    def lease(self, kind: str) -> float:
        return self.lease_s.get(kind, max(self.lease_s.values()))

    def heartbeat(self, kind: str) -> float:
        return self.heartbeat_s or max(0.2, self.lease(kind) / 10)

    def time_limit(self, kind: str) -> float:
        return self.time_limit_s.get(kind, max(self.time_limit_s.values()))


ENV_FIELDS = {
    "W2S_HEARTBEAT_S": "heartbeat_s",
    "W2S_WATCHDOG_S": "watchdog_s",
    "W2S_RECONCILE_S": "reconcile_s",
    "W2S_RECONCILE_GRACE_S": "reconcile_grace_s",
    "W2S_MAX_ATTEMPTS": "max_attempts",
    "W2S_RETRY_BACKOFF_S": "retry_backoff_s",
    "W2S_VISIBILITY_TIMEOUT_S": "visibility_timeout_s",
    "W2S_UNACKED_RESTORE_S": "unacked_restore_s",
    "W2S_SOFT_SHUTDOWN_S": "soft_shutdown_s",
    "W2S_CANCEL_WAIT_S": "cancel_wait_s",
}


def load_delivery(env: Mapping[str, str] | None = None) -> DeliverySettings:
    """`W2S_LEASE_S` (every kind) or `W2S_LEASE_<KIND>_S`, `W2S_TIME_LIMIT_<KIND>_S`, and the
    names in ENV_FIELDS. A bad value fails with the variable's name."""
    env = os.environ if env is None else env
    values: dict = {}
    for var, field in ENV_FIELDS.items():
        if env.get(var):
            values[field] = _number(env, var)
    lease, limits = dict(DEFAULT_LEASE_S), dict(DEFAULT_TIME_LIMIT_S)
    if env.get("W2S_LEASE_S"):
        lease = {kind: _number(env, "W2S_LEASE_S") for kind in JOB_KINDS}
    for kind in JOB_KINDS:
        if env.get(f"W2S_LEASE_{kind.upper()}_S"):
            lease[kind] = _number(env, f"W2S_LEASE_{kind.upper()}_S")
        if env.get(f"W2S_TIME_LIMIT_{kind.upper()}_S"):
            limits[kind] = _number(env, f"W2S_TIME_LIMIT_{kind.upper()}_S")
    for name, table in (("lease", lease), ("time limit", limits)):
        bad = [kind for kind, value in table.items() if value <= 0]
        if bad:
            raise ConfigError(f"{name} of {', '.join(bad)} must be positive seconds")
    try:
        return DeliverySettings(lease_s=lease, time_limit_s=limits, **values)
    except ValidationError as exc:
        field_to_var = {field: var for var, field in ENV_FIELDS.items()}
        parts = [f"{field_to_var.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("; ".join(parts)) from None


def _number(env: Mapping[str, str], var: str) -> float:
    try:
        return float(env[var])
    except ValueError:
        raise ConfigError(f"{var}={env[var]!r}: expected a number of seconds") from None
