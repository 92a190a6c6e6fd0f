"""Worker roles: which queues a worker consumes, how many processes, which GPUs each may use.

A role is the name of its queue. Model roles (weak, strong) run one process per GPU, each process
pinned to one GPU; a train worker runs one process that sees every GPU it was given (DeepSpeed
starts one rank per GPU); a control worker needs no GPU and also runs the watchdog that re-plans
jobs whose worker stopped heart-beating.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.config import QUEUES
from services.errors import InputError

MODEL_ROLES = ("weak", "strong")


@dataclass(frozen=True)
class WorkerPlan:
    queues: list[str]
    concurrency: int
    gpus: list[str]  # empty: no pinning (CPU, or the GPUs the environment already gives)
    pin_per_process: bool  # each pool process gets one GPU of `gpus`
    watchdog: bool
    backend: str | None = None  # the engine this worker's models run on (W2S_BACKEND); None: recognised
    pool: str = "prefork"  # Celery's pool: "solo" for vllm (its engine cannot start in a daemonic child)


def parse_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def plan_worker(*, roles: str | None, queues: str | None, gpus: str | None, concurrency: int | None,
                backend: str | None = None) -> WorkerPlan:
    """--role / --queues / --gpus / --concurrency / --backend → what the worker runs. Errors name the option.

    ``--backend vllm``: one engine per worker process, over all of ``--gpus`` (tensor-parallel
    across them): a solo pool (the engine starts its own processes, which Celery's daemonic pool
    children may not have), concurrency 1; start one worker per GPU set."""
    if roles and queues:
        raise InputError("--role and --queues: give one of them (a role is the name of its queue)")
    names = parse_list(roles or queues) or list(QUEUES)
    option = "--role" if roles else "--queues"
    unknown = [name for name in names if name not in QUEUES]
    if unknown:
        raise InputError(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(QUEUES)}")
    gpu_ids = parse_list(gpus)
    if any(not gpu.isdigit() for gpu in gpu_ids):
        raise InputError(f"--gpus: expected comma-separated GPU indices such as 0,1, got {gpus!r}")
    if gpu_ids and not set(names) & {"weak", "strong", "train"}:
        raise InputError("--gpus: only the weak, strong and train roles use GPUs")
    if backend not in (None, "transformers", "vllm"):
        raise InputError(f"--backend: unknown {backend!r}; expected transformers or vllm")
    if backend == "vllm":
        if not set(names) <= set(MODEL_ROLES):
            raise InputError("--backend vllm: only the weak and strong roles generate (start other roles apart)")
        if concurrency not in (None, 1):
            raise InputError(f"--concurrency {concurrency} with --backend vllm: one engine per worker process; "
                             "start one worker per GPU set")
        return WorkerPlan(queues=names, concurrency=1, gpus=gpu_ids, pin_per_process=False, watchdog=False,
                          backend=backend, pool="solo")
    pin = bool(gpu_ids) and set(names) <= set(MODEL_ROLES)
    if concurrency is None:
        concurrency = len(gpu_ids) if pin else 1
    if concurrency < 1:
        raise InputError(f"--concurrency: must be at least 1, got {concurrency}")
    if pin and concurrency != len(gpu_ids):
        raise InputError(f"--concurrency {concurrency} with --gpus {gpus}: model roles run one process per GPU")
    return WorkerPlan(queues=names, concurrency=concurrency, gpus=gpu_ids, pin_per_process=pin,
                      watchdog="control" in names, backend=backend)


def celery_argv(plan: WorkerPlan, *, loglevel: str, hostname: str | None) -> list[str]:
    argv = ["worker", f"--queues={','.join(plan.queues)}", f"--concurrency={plan.concurrency}",
            f"--loglevel={loglevel}", "--prefetch-multiplier=1", "--without-gossip", "--without-mingle"]
    if plan.pool != "prefork":
        argv.append(f"--pool={plan.pool}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    return argv


def apply_gpus(plan: WorkerPlan) -> None:
    """Before the pool starts. Model roles: each pool process narrows CUDA_VISIBLE_DEVICES to its
    own GPU (`pin_this_process`, on worker_process_init). Train: the launch names the devices to
    DeepSpeed (W2S_TRAIN_GPUS, models.train.launch), which sets each rank's CUDA_VISIBLE_DEVICES.
    A vllm worker: its one process sees all its GPUs (``vllm_environment``)."""
    if plan.backend is not None:
        os.environ["W2S_BACKEND"] = plan.backend
    if plan.backend == "vllm":
        os.environ.update(vllm_environment(plan.gpus, os.environ))
        return
    if not plan.gpus:
        return
    if plan.pin_per_process:
        os.environ["W2S_PIN_GPUS"] = ",".join(plan.gpus)
    elif "train" in plan.queues:
        os.environ["W2S_TRAIN_GPUS"] = ",".join(plan.gpus)
    else:  # a model role sharing a worker with train: every process sees the worker's GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpus)


def vllm_environment(gpus: list[str], env: dict[str, str] | os._Environ) -> dict[str, str]:
    """What a vllm worker's process sets before its engine starts (and before anything touches
    CUDA): its GPUs, one engine over all of them, workers spawned (a forked CUDA context is
    broken), and the engine core in-process on one device (no extra process to lose)."""
    out = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if gpus:
        out["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if not env.get("W2S_VLLM_TENSOR_PARALLEL_SIZE"):
            out["W2S_VLLM_TENSOR_PARALLEL_SIZE"] = str(len(gpus))
    if len(gpus) <= 1:
        out["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return out


def pin_this_process(pin_gpus: str | None) -> None:
    gpus = parse_list(pin_gpus)
    if not gpus:
        return
    from billiard.process import current_process

    index = getattr(current_process(), "index", 0) or 0
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
