"""Every setting of the service, from the `W2S_*` environment variables, in one typed object.

Built once at the edges (the CLI root, the Celery worker, a DeepSpeed rank) by `load_settings()`
and passed in from there: nothing below those entry points reads the environment. Each field is
one variable (the field's name in capitals after `W2S_`), grouped by what reads it: the store, the
broker, delivery (leases, limits, attempts), the training cluster, logging, metrics and the models
allowed to run their own code. An empty variable counts as unset.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.config import ConfigError, TrackingConfig
from services.contracts.graph import KINDS

ENV_PREFIX = "W2S_"
# Per kind, from the step graph: how long a job may run before Celery's soft limit stops it (the
# job is then retried or failed), and how long its lease lasts without a heartbeat.
JOB_KINDS = tuple(str(kind) for kind in KINDS)
DEFAULT_TIME_LIMIT_S = {str(kind): spec.time_limit_s for kind, spec in KINDS.items()}
DEFAULT_LEASE_S = {str(kind): spec.lease_s for kind, spec in KINDS.items()}


class DeliverySettings(BaseModel):
    """How a job survives failures (see workers/runner.py and docs/design-notes.md)."""

    model_config = ConfigDict(frozen=True)

    lease_s: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LEASE_S))
    time_limit_s: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIME_LIMIT_S))
    heartbeat_s: float | None = None
    watchdog_s: float = 30.0
    reconcile_s: float = 30.0
    reconcile_grace_s: float = 60.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    visibility_timeout_s: float = 26 * 3600
    unacked_restore_s: float | None = None
    soft_shutdown_s: float = 60.0
    cancel_wait_s: float = 60.0

    def lease(self, kind: str) -> float:
        return self.lease_s.get(kind, max(self.lease_s.values()))

    def heartbeat(self, kind: str) -> float:
        return self.heartbeat_s or max(0.2, self.lease(kind) / 10)

    def time_limit(self, kind: str) -> float:
        return self.time_limit_s.get(kind, max(self.time_limit_s.values()))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore",
                                      validate_default=True)

    # --- store ---
    home: Path = Field(Path(".w2s"), description="where embedded state lives")
    database_url: str = Field("", description="default: SQLite under home")
    checkpoint_dir: Path = Field(Path(""), description="trained checkpoints; default: home/checkpoints")

    # --- broker ---
    broker_url: str | None = Field(None, description="None: jobs run in-process (embedded mode)")

    # --- delivery (leases, limits, attempts): W2S_LEASE_S for every kind, W2S_LEASE_<KIND>_S and
    # W2S_TIME_LIMIT_<KIND>_S per kind ---
    lease_s: float | None = Field(None, gt=0, description="every kind's lease")
    lease_generate_s: float | None = Field(None, gt=0)
    lease_vote_s: float | None = Field(None, gt=0)
    lease_pairs_s: float | None = Field(None, gt=0)
    lease_train_s: float | None = Field(None, gt=0)
    lease_evaluate_s: float | None = Field(None, gt=0)
    lease_promote_s: float | None = Field(None, gt=0)
    time_limit_generate_s: float | None = Field(None, gt=0)
    time_limit_vote_s: float | None = Field(None, gt=0)
    time_limit_pairs_s: float | None = Field(None, gt=0)
    time_limit_train_s: float | None = Field(None, gt=0)
    time_limit_evaluate_s: float | None = Field(None, gt=0)
    time_limit_promote_s: float | None = Field(None, gt=0)
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

    # --- training cluster (models/train/launch.py ClusterSpec) ---
    train_hostfile: Path | None = Field(None, description="a DeepSpeed hostfile; None: this host only")
    train_master_addr: str | None = None
    train_master_port: int | None = Field(None, ge=1, le=65535)
    train_launcher: str = "pdsh"
    train_launcher_args: str = ""
    train_ssh_check: bool = True
    train_gpus: str | None = Field(None, description="set by `w2sctl worker --gpus` for the train role")

    # --- worker process (set by `w2sctl worker` for its pool processes) ---
    worker_name: str | None = Field(None, description="the Celery node name, recorded as a job's owner")
    pin_gpus: str | None = Field(None, description="model roles: one of these GPUs per pool process")

    # --- generation engine of a model worker (`w2sctl worker --backend`); a round's config may name its own ---
    backend: Literal["transformers", "vllm"] | None = Field(
        None, description="engine for checkpoints this worker loads; None: recognised from the directory")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of each GPU's memory")
    vllm_enforce_eager: bool = Field(False, description="vllm: no CUDA graphs (slower, starts faster)")
    vllm_tensor_parallel_size: int | None = Field(None, ge=1, description="vllm: GPUs per engine; None: the worker's --gpus")
    vllm_max_model_len: int | None = Field(None, ge=16, description="vllm: context length; None: the model's own")
    vllm_max_lora_rank: int = Field(64, ge=1, description="vllm: largest LoRA rank served")
    vllm_block_size: int | None = Field(None, ge=1, description="vllm: KV block size (the prefix cache serves whole "
                                        "blocks: short prompts want small ones); None: vLLM's")

    # --- experiment tracking of rounds without a `tracking:` of their own ---
    tracking_backend: Literal["mlflow", "tensorboard", "none"] = "none"
    tracking_uri: str | None = Field(None, description="MLflow URI or TensorBoard directory; None: under home")
    tracking_experiment: str = Field("w2s", min_length=1)

    # --- logging and metrics ---
    log_format: Literal["text", "json"] = "text"
    metrics_port: int | None = Field(None, ge=1, le=65535, description="a worker's /metrics port; None: off")
    metrics_addr: str = "0.0.0.0"

    # --- torch: intra-op threads per process. Unset: OMP_NUM_THREADS if set, else 1. Small-batch
    # generation is many tiny ops: on a shared 2-core machine 64 tokens took 13 s with 2 OpenMP
    # threads and 1.1 s with 1 (issue 17), and a worker runs one model process per GPU or core. ---
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads per process")

    # --- models allowed to run their own code at load time (trust_remote_code), by name or path ---
    trust_remote_code: str = Field("", description="comma-separated; empty: none")

    @model_validator(mode="before")
    @classmethod
    def _lowercase(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("log_format"), str):
            data = {**data, "log_format": data["log_format"].strip().lower()}
        return data

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        self.home = self.home.absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'w2s.sqlite'}"
        if str(self.checkpoint_dir) in ("", "."):
            self.checkpoint_dir = self.home / "checkpoints"
        self.checkpoint_dir = self.checkpoint_dir.absolute()
        return self

    # --- views ---

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    def redacted_database_url(self) -> str:
        return redact(self.database_url)

    def redacted_broker_url(self) -> str | None:
        return redact(self.broker_url) if self.broker_url else None

    @property
    def delivery(self) -> DeliverySettings:
        lease = dict(DEFAULT_LEASE_S) if self.lease_s is None else {kind: self.lease_s for kind in JOB_KINDS}
        limits = dict(DEFAULT_TIME_LIMIT_S)
        for kind in JOB_KINDS:
            if getattr(self, f"lease_{kind}_s") is not None:
                lease[kind] = getattr(self, f"lease_{kind}_s")
            if getattr(self, f"time_limit_{kind}_s") is not None:
                limits[kind] = getattr(self, f"time_limit_{kind}_s")
        return DeliverySettings(
            lease_s=lease, time_limit_s=limits, heartbeat_s=self.heartbeat_s, watchdog_s=self.watchdog_s,
            reconcile_s=self.reconcile_s, reconcile_grace_s=self.reconcile_grace_s, max_attempts=self.max_attempts,
            retry_backoff_s=self.retry_backoff_s, visibility_timeout_s=self.visibility_timeout_s,
            unacked_restore_s=self.unacked_restore_s, soft_shutdown_s=self.soft_shutdown_s,
            cancel_wait_s=self.cancel_wait_s)

    @property
    def tracking(self) -> TrackingConfig:
        return TrackingConfig(backend=self.tracking_backend, uri=self.tracking_uri, experiment=self.tracking_experiment)

    @property
    def remote_code_allowed(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.trust_remote_code.split(",") if item.strip())

    def backend_options(self) -> dict[str, dict[str, Any]]:
        """Per-backend load options (models.backends.loader.ModelCache's backend_options)."""
        return {"vllm": {"gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                         "enforce_eager": self.vllm_enforce_eager,
                         "tensor_parallel_size": self.vllm_tensor_parallel_size or 1,
                         "max_model_len": self.vllm_max_model_len, "max_lora_rank": self.vllm_max_lora_rank,
                         "block_size": self.vllm_block_size}}

    def cluster_options(self) -> dict[str, Any]:
        """The keyword arguments of models.train.launch.ClusterSpec."""
        return {"hostfile": self.train_hostfile, "master_addr": self.train_master_addr,
                "master_port": self.train_master_port, "launcher": self.train_launcher,
                "launcher_args": self.train_launcher_args, "ssh_check": self.train_ssh_check, "gpus": self.train_gpus}


# A new job kind in the step graph needs its two fields above (W2S_LEASE_<KIND>_S, W2S_TIME_LIMIT_<KIND>_S).
_missing = [f"{what}_{kind}_s" for kind in JOB_KINDS for what in ("lease", "time_limit")
            if f"{what}_{kind}_s" not in Settings.model_fields]
assert not _missing, f"services/settings.py: add the fields {_missing} for the step graph's job kinds"


def env_names() -> set[str]:
    """Every variable the service reads (docker-compose.yml and .env.example may set only these)."""
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """From the process environment, or from `env` when given. A bad value is one ConfigError
    line (ConfigError) naming each variable, its value and what is wrong."""
    try:
        if env is None:
            return Settings()
        values = {name[len(ENV_PREFIX):].lower(): value for name, value in env.items()
                  if name.upper().startswith(ENV_PREFIX) and value != ""}
        return Settings.model_validate(values)  # validation only: no environment source runs
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = ENV_PREFIX + field.upper() if field in Settings.model_fields else field or "W2S settings"
            value = f"={error['input']!r}" if field in Settings.model_fields and not isinstance(error["input"], dict) else ""
            parts.append(f"{name}{value}: {error['msg']}")
        raise ConfigError("; ".join(parts)) from None


def torch_thread_count(setting: int | None, environ: Mapping[str, str]) -> tuple[int, str]:
    """How many intra-op threads torch gets in a w2s process, and where that number comes from:
    W2S_TORCH_THREADS, else a valid OMP_NUM_THREADS the operator set, else 1."""
    if setting is not None:
        return setting, "W2S_TORCH_THREADS"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return 1, "default: one per process; W2S_TORCH_THREADS to change"


def apply_torch_threads(settings: Settings) -> tuple[int, str]:
    """Set this process's (and its children's) torch thread count; called at the entry points only
    (the CLI's App, the worker's start and each pool process). OMP_NUM_THREADS is what torch reads
    when it is first imported; a torch already imported is told directly."""
    import os
    import sys

    threads, source = torch_thread_count(settings.torch_threads, os.environ)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads, source


def redact(url: str) -> str:
    """Credentials never reach a terminal or a log."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (e.g. redis://): hide anything between :// and @
        head, sep, tail = url.partition("://")
        return head + sep + ("***@" + tail.split("@", 1)[1] if "@" in tail else tail)
