"""Experiment tracking: runs in MLflow or TensorBoard, written with the libraries' own clients.

One small surface, used by the training entry points (rank 0: one run per training job, a step's
loss, learning rate, gradient norm, tokens/s, DPO/ORPO rewards) and by the coordinator (a run per
round and per pipeline, with the training runs nested under them)::

    run = open_run(target, name="train:hybrid", parent_run_id=round_run_id, tags={...})
    run.log_params(flatten(config)); run.log_metrics({"loss": 0.7}, step=10); run.end()

Tracking never breaks the work it watches: every call is guarded, and the first failure (a
server that cannot be reached, a store that cannot be written) is one warning in the log, a count
in `FAILURES` (and in the worker's Prometheus counter, through `on_failure`), and turns that run
off, so an unreachable server costs one connection attempt per run, not one per step.

The libraries are imported when a run is opened, never before: a process with tracking off does
not load them. MLflow's HTTP client retries for minutes by default; unless the operator set
MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT, a run gives up after one retry
and a few seconds (MLflow reads only these variables for it).

A TensorBoard "run" is a directory under the target's log directory; a nested run is a
sub-directory of its parent's, so its run id is its path relative to the log directory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("w2s.tracking")

BACKENDS = ("mlflow", "tensorboard")
FAILURES: Counter[str] = Counter()  # failed tracking calls in this process, by backend
_failure_hooks: list[Callable[[str, BaseException], None]] = []
_open_runs: set[Run] = set()
_lock = threading.Lock()

# MLflow's limits (mlflow.utils.validation): a param value up to 6000 characters, a batch of at
# most 100 params / 100 tags / 1000 metrics.
PARAM_MAX_CHARS = 6000
BATCH = 100
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: a backend and its URI (an MLflow tracking URI, or a TensorBoard log directory)."""

    backend: str
    uri: str
    experiment: str = "w2s"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tracking backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.backend} at {_redact(self.uri)}"


def on_failure(hook: Callable[[str, BaseException], None]) -> None:
    """Call ``hook(backend, exception)`` on every tracking failure in this process (metrics)."""
    _failure_hooks.append(hook)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1}}`` → ``{"training.lr": 1}``: nested configs as run parameters."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (booleans as 0/1): what a metric can hold."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not (isinstance(v, float) and v != v)}


# --- runs ----------------------------------------------------------------------------------------


class Run:
    """An open run. Every method is safe to call: after a failure, or with no run, it does nothing."""

    def __init__(self, target: TrackingTarget | None, client: Any = None, run_id: str | None = None) -> None:
        self.target, self._client, self.run_id = target, client, run_id
        self.failed = False

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None and not self.failed

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._guard("log params", lambda: self._client.log(self.run_id, params=params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = numeric(metrics)
        if values:
            self._guard("log metrics", lambda: self._client.log(self.run_id, metrics=values, step=step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._guard("set tags", lambda: self._client.log(self.run_id, tags={k: v for k, v in tags.items()
                                                                          if v is not None}))

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED."""
        self._guard("end the run", lambda: self._client.end(self.run_id, status))
        with _lock:
            _open_runs.discard(self)

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        if not self.active:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never break the work it watches
            self.failed = True
            _failed(self.target, f"{what} of run {self.run_id}", exc)


def open_run(target: TrackingTarget | None, *, name: str | None = None, parent_run_id: str | None = None,
             run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Run:
    """A new run (nested under ``parent_run_id``), or the existing ``run_id`` to log more into.
    Never raises: a failure gives an inactive run, a warning and a count."""
    if target is None:
        return Run(None)
    try:
        client = _MlflowClient(target) if target.backend == "mlflow" else _TensorBoardClient(target)
        if run_id is None:
            run_id = client.create(name or "run", parent_run_id, {k: v for k, v in (tags or {}).items() if v is not None})
    except Exception as exc:  # noqa: BLE001
        _failed(target, f"open run {name or run_id!r}", exc)
        return Run(target)
    run = Run(target, client, run_id)
    with _lock:
        _open_runs.add(run)
    return run


def end_open_runs(status: str) -> None:
    """End every run this process still has open (a training rank that fails ends its run FAILED)."""
    with _lock:
        runs = list(_open_runs)
    for run in runs:
        run.end(status)


def _failed(target: TrackingTarget | None, what: str, exc: BaseException) -> None:
    backend = target.backend if target else "none"
    FAILURES[backend] += 1
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    log.warning("tracking (%s) failed to %s: %s: %s; the job goes on without it",
                target.describe() if target else "none", what, type(exc).__name__, first_line)
    for hook in list(_failure_hooks):
        try:
            hook(backend, exc)
        except Exception:  # noqa: BLE001
            log.debug("tracking failure hook failed", exc_info=True)


def _redact(uri: str) -> str:
    head, sep, tail = uri.partition("://")
    return head + sep + ("***@" + tail.split("@", 1)[1] if "@" in tail.split("/", 1)[0] else tail)


# --- backends ------------------------------------------------------------------------------------


class _MlflowClient:
    """MLflow's own MlflowClient (mlflow-skinny): experiments, nested runs (mlflow.parentRunId), batches."""

    def __init__(self, target: TrackingTarget) -> None:
        if target.uri.startswith(("http://", "https://")):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=target.uri)
        self.target = target

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.target.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.target.experiment)
        except Exception:  # created by another process meanwhile
            experiment = self.client.get_experiment_by_name(self.target.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def create(self, name: str, parent_run_id: str | None, tags: Mapping[str, Any]) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # how MLflow nests runs
        return self.client.create_run(self._experiment_id(), run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
            tags: Mapping[str, Any] | None = None, step: int | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        param_list = [Param(k, _text(v)[:PARAM_MAX_CHARS]) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, _text(v)) for k, v in (tags or {}).items()]
        metric_list = [Metric(k, v, now, step or 0) for k, v in (metrics or {}).items()]
        for i in range(0, max(len(param_list), len(tag_list), len(metric_list)), BATCH):
            self.client.log_batch(run_id, metrics=metric_list[i:i + BATCH], params=param_list[i:i + BATCH],
                                  tags=tag_list[i:i + BATCH])

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


class _TensorBoardClient:
    """torch.utils.tensorboard's SummaryWriter: scalars for metrics, text for params and tags."""

    def __init__(self, target: TrackingTarget) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.root = Path(target.uri)
        self.writers: dict[str, Any] = {}

    def _writer(self, run_id: str) -> Any:
        if run_id not in self.writers:
            self.writers[run_id] = self._writer_class(log_dir=str(self.root / run_id))
        return self.writers[run_id]

    def create(self, name: str, parent_run_id: str | None, tags: Mapping[str, Any]) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        run_id = f"{parent_run_id}/{safe}" if parent_run_id else safe
        self.log(run_id, tags=tags)
        return run_id

    def log(self, run_id: str, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
            tags: Mapping[str, Any] | None = None, step: int | None = None) -> None:
        writer = self._writer(run_id)
        for key, value in (params or {}).items():
            writer.add_text(f"params/{key}", _text(value))
        for key, value in (tags or {}).items():
            writer.add_text(f"tags/{key}", _text(value))
        for key, value in (metrics or {}).items():
            writer.add_scalar(key, value, step or 0)
        writer.flush()

    def end(self, run_id: str, status: str) -> None:
        writer = self._writer(run_id)
        writer.add_text("status", status)
        writer.close()
        self.writers.pop(run_id, None)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
