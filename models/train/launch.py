"""Run a training entry point under the DeepSpeed launcher, as a subprocess.

The train task writes a job file and calls :func:`launch_training`; the launcher starts one
process per rank, each running ``python -m <module> --config <job file>``. Everything the ranks
print goes to ``log_path`` as it comes, and the JSON progress lines (``{"step": .., "loss": ..}``)
can be followed with ``on_progress``. A timeout kills the whole process group (launcher and ranks).

One node: ``num_ranks`` ranks on this host (the worker's ``--gpus``, or ``CUDA_VISIBLE_DEVICES``),
started by DeepSpeed's per-node launcher (``deepspeed.launcher.launch``) without its runner, and
one rank without either: the rank process itself, with the variables the launcher would set
(:func:`plan_launch`; docs/design-notes.md says why). Several nodes: a DeepSpeed hostfile
(``host slots=N`` per line) in the worker's settings (:class:`ClusterSpec`, from ``W2S_TRAIN_*``),
launched through DeepSpeed's runner and its multi-node backend (pdsh over ssh by default; openmpi,
slurm, ... by name) with a configurable master address and port.

The launcher's exit status is not enough: a multi-node launcher can exit 0 when a remote rank
died (and DeepSpeed's runner itself exits 0 when its child is killed by a signal). Every rank
writes an exit record to a ``status_dir`` on the shared store (``models.train.common.run_rank``);
:func:`check_ranks` reads one per rank, and a missing or failed record fails the launch.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.stopping import StopSignal, current_signal

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds models/, workers/, …: the ranks import from it
KILL_GRACE_S = 10.0  # SIGTERM first (the launcher forwards it to its ranks), SIGKILL after this
WAIT_POLL_S = 0.5  # how soon the wait sees the launcher exit (a stop signal wakes it at once)


# Environment variables recorded with a launch (the rest of the worker's environment is not
# the launch's business); values of names that look secret are redacted.
RECORDED_ENV_PREFIXES = (
    "W2S_", "MASTER_", "NCCL_", "GLOO_", "CUDA_", "OMP_", "DS_", "TORCH", "HF_", "PDSH_", "PYTHON",
    "TOKENIZERS_", "WORLD_SIZE", "LOCAL_", "SLURM_", "PATH", "RANK", "CROSS_",
)  # fmt: skip
SECRET_NAME_PARTS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIALS", "AUTH", "PRIVATE"}
LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")


class ClusterSpec:
    """Where the ranks run: this host, or the hosts of a DeepSpeed hostfile. From the worker's
    settings (``W2S_TRAIN_*`` environment variables, services.settings ``cluster_options``)."""

    def __init__(
        self,
        *,
        hostfile: str | Path | None = None,  # "host slots=N" per line; None: this host only
        master_addr: str | None = None,  # rank 0's address; default 127.0.0.1, or the first host
        master_port: int | None = None,  # default: a port free on this host
        launcher: str = "pdsh",  # DeepSpeed's multi-node backend
        launcher_args: str = "",  # passed to that backend (e.g. pdsh -R ssh options, srun flags)
        ssh_check: bool = True,  # DeepSpeed's passwordless-ssh check before a pdsh launch
        gpus: str | None = None,  # this worker's devices, e.g. "0,1" (one node only)
    ) -> None:
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if master_port is not None and not 1 <= int(master_port) <= 65535:
            raise ValueError(f"master_port: {master_port} is not a TCP port (1-65535)")
        self.hostfile = Path(hostfile).absolute() if hostfile else None
        self.hosts = parse_hostfile(self.hostfile) if self.hostfile else {}
        self.master_addr = master_addr
        self.master_port = int(master_port) if master_port is not None else None
        self.launcher = launcher
        self.launcher_args = launcher_args
        self.ssh_check = ssh_check
        self.gpus = gpus

    @property
    def multi_node(self) -> bool:
        return bool(self.hosts)

    def world_size(self, num_ranks: int) -> int:
        """Ranks in the launch: every slot of the hostfile, else ``num_ranks`` on this host."""
        return sum(self.hosts.values()) if self.hosts else num_ranks

    def describe(self) -> dict[str, Any]:
        return {
            "hostfile": str(self.hostfile) if self.hostfile else None,
            "hosts": dict(self.hosts),
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "launcher": self.launcher if self.multi_node else "local",
            "gpus": self.gpus,
        }


def parse_hostfile(path: Path) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile; errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"hostfile: {path} does not exist") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ValueError(f"hostfile {path}:{lineno}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise ValueError(f"hostfile {path}:{lineno}: host {host!r} listed twice")
        if slots < 1:
            raise ValueError(f"hostfile {path}:{lineno}: slots must be >= 1")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"hostfile {path}: names no host")
    return hosts


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """The launch-relevant variables of ``env``; secret-looking values and URL passwords hidden."""
    out = {}
    for name in sorted(env):
        if not name.startswith(RECORDED_ENV_PREFIXES):
            continue
        value = env[name]
        if SECRET_NAME_PARTS & set(name.upper().split("_")):
            value = "***"
        else:
            value = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", value)  # scheme://user:pass@host
        out[name] = value
    return out


@dataclass(frozen=True)
class RankStatus:
    """How one rank ended, from its exit record (or the absence of one)."""

    rank: int
    status: str  # ok | error | missing
    host: str | None = None
    node_rank: int | None = None
    error: str | None = None
    out_of_memory: bool = False

    def as_dict(self) -> dict[str, Any]:
        # `is`, not `in`: rank 0 == False, and the rank number must survive.
        return {k: v for k, v in self.__dict__.items() if v is not None and v is not False}


def check_ranks(status_dir: Path, world_size: int) -> list[RankStatus]:
    """One status per rank 0..world_size-1 from ``status_dir/rank<N>.json``: missing = no record."""
    statuses = []
    for rank in range(world_size):
        path = Path(status_dir) / f"rank{rank}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            statuses.append(RankStatus(rank, "missing"))
            continue
        statuses.append(RankStatus(
            rank, "ok" if record.get("status") == "ok" else "error", host=record.get("host"),
            node_rank=record.get("node_rank"), error=record.get("error"),
            out_of_memory=bool(record.get("out_of_memory")),
        ))  # fmt: skip
    return statuses


_RANK_EXIT = re.compile(r"exits with return code = (-?\d+)")
_OOM_TEXT = re.compile(r"out of memory|OutOfMemoryError|MemoryError|oom-kill", re.IGNORECASE)


def failure_reason(
    *,
    returncode: int,
    timed_out: bool,
    timeout_s: float | None,
    ranks: list[RankStatus],
    log_tail: str,
    process: str = "launcher",  # what returncode is the status of: "launcher", or "rank" (no launcher)
) -> str | None:
    """Why a launch failed, in one line a person can act on; None if it did not.

    Causes first (a hang, a killed rank, out of memory), consequences after (the other ranks
    then fail on a broken collective): every failed rank is named.
    """
    parts = []
    if timed_out:
        parts.append(f"hang: still running after the time limit of {timeout_s:g} s; process group killed")
    codes = [int(c) for c in _RANK_EXIT.findall(log_tail)]
    killed = [c for c in codes if c < 0]
    if process == "rank" and returncode < 0:  # no launcher to log it: the rank's own status names the signal
        killed = [returncode]
    missing = [r.rank for r in ranks if r.status == "missing"]
    if missing and not timed_out:
        how = f"killed by {_signal_name(-killed[0])}" if killed else "killed by a signal, or never started"
        if killed and -killed[0] == signal.SIGKILL:
            how += " (the kernel's OOM killer sends it too)"
        parts.append(f"rank {', '.join(map(str, missing))} left no exit record: {how}")
    oom = [r for r in ranks if r.out_of_memory]
    if oom or (not ranks and _OOM_TEXT.search(log_tail)):
        where = f" on rank {', '.join(str(r.rank) for r in oom)}" if oom else ""
        parts.append(f"out of memory{where}")
    for r in ranks:
        if r.status == "error" and not r.out_of_memory:
            host = f" (host {r.host}, node {r.node_rank})" if r.host else ""
            parts.append(f"rank {r.rank}{host} failed: {r.error}")
    if returncode != 0 and not timed_out:
        parts.append(f"{process} exited with status {returncode}")
    elif parts and returncode == 0:
        parts.append(f"the {process} itself exited 0")
    return "; ".join(parts) or None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    command: list[str]
    log_tail: str  # the last lines the launcher and ranks printed
    duration_s: float
    timed_out: bool = False
    progress: list[dict[str, Any]] = field(default_factory=list, repr=False)  # parsed loss lines
    world_size: int = 1
    ranks: list[RankStatus] = field(default_factory=list)  # empty when no status_dir was given
    env: dict[str, str] = field(default_factory=dict, repr=False)  # recorded, secrets redacted
    cluster: dict[str, Any] = field(default_factory=dict)
    log_path: str | None = None
    failure: str | None = None  # failure_reason(): None when the launch succeeded

    @property
    def ok(self) -> bool:
        return self.failure is None and self.returncode == 0 and not self.timed_out

    def record(self) -> dict[str, Any]:
        """What a job keeps of its launch (``w2sctl jobs show`` prints it)."""
        return {
            "command": self.command,
            "env": self.env,
            "cluster": self.cluster,
            "world_size": self.world_size,
            "returncode": self.returncode,
            "timed_out": self.timed_out,
            "ranks": [r.as_dict() for r in self.ranks],
            "duration_s": round(self.duration_s, 3),
            "log_path": self.log_path,
            "failure": self.failure,
        }


class LaunchError(RuntimeError):
    """A training launch that exited non-zero or ran out of time; carries the log tail."""

    def __init__(self, message: str, result: LaunchResult) -> None:
        super().__init__(f"{message}\n--- last lines of the log ---\n{result.log_tail}")
        self.result = result
        self.returncode = result.returncode
        self.log_tail = result.log_tail


def parse_progress(line: str) -> dict[str, Any] | None:
    """The record of a JSON loss line (``{"step": .., "loss": .., ...}``), else ``None``."""
    start = line.find("{")
    if start == -1:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    if isinstance(record, dict) and "step" in record and "loss" in record:
        return record
    return None


def default_num_ranks(gpus: str | None = None) -> int:
    """Ranks on this node when the round does not say: the devices the worker was given
    (``--gpus``, e.g. "0,1"), else every GPU it sees (torch honours CUDA_VISIBLE_DEVICES), else 1 (CPU)."""
    named = [d for d in (gpus or "").split(",") if d.strip()]
    if named:
        return len(named)
    import torch

    return max(1, torch.cuda.device_count())


def prepare_state_dir(state_dir: Path, fingerprint: Mapping[str, Any]) -> int:
    """Keep ``state_dir`` (a job's resumable DeepSpeed state) only if it was saved by a run of
    the same job: same data, base model and training config (``fingerprint``). Otherwise remove
    it, so the launch starts clean. Returns the optimiser step the launch will resume from."""
    state_dir = Path(state_dir)
    stamp_file = state_dir / "w2s-fingerprint.json"
    stamp = json.dumps(fingerprint, sort_keys=True, default=str)
    if state_dir.exists():
        try:
            same = stamp_file.read_text(encoding="utf-8") == stamp
        except FileNotFoundError:
            same = False
        if not same:
            shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp, encoding="utf-8")
    latest = state_dir / "latest"
    tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else 0


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LaunchPlan:
    """What to start for one job: the command line, and the variables it needs set on top of
    the worker's environment (only a rank started without a launcher needs any)."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "runner"  # runner (several nodes) | launch (one node) | rank (one rank, no launcher)
    named_devices: tuple[int | str, ...] = ()  # the devices named for the ranks (one node), to check


def plan_launch(
    module: str,
    job_file: Path,
    *,
    num_ranks: int,
    master_port: int,
    visible_devices: str | None = None,
    cluster: ClusterSpec | None = None,
) -> LaunchPlan:
    """How to start one job.

    Several nodes: DeepSpeed's runner, with ``--hostfile`` (every slot), the backend
    (``--launcher``) and the master address. One node: what the runner would run for localhost,
    without the runner: DeepSpeed's per-node launcher with the world it would compute
    (``{"localhost": [device ids]}``, base64 JSON), or, for one rank, the rank itself with the
    variables that launcher sets. Devices named (``cluster.gpus``, else ``CUDA_VISIBLE_DEVICES``)
    are used in order, as the runner's ``--include localhost:<ids>`` used them; none named: 0..N-1,
    as its ``--num_gpus N`` did.
    """
    if cluster is not None and cluster.multi_node:
        first_host = next(iter(cluster.hosts))
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
        cmd += ["--hostfile", str(cluster.hostfile), "--launcher", cluster.launcher]
        cmd += ["--master_addr", cluster.master_addr or first_host]
        if cluster.launcher_args:
            cmd += ["--launcher_args", cluster.launcher_args]
        if not cluster.ssh_check:
            cmd += ["--no_ssh_check"]
        cmd += ["--master_port", str(master_port), "--module", "--no_local_rank", module]
        return LaunchPlan(cmd + ["--config", str(job_file)])

    named = cluster.gpus if cluster is not None and cluster.gpus else visible_devices
    devices = [d.strip() for d in (named or "").split(",") if d.strip()]
    if devices and num_ranks > len(devices):
        raise ValueError(f"num_ranks: {num_ranks} ranks but only {len(devices)} visible devices ({named})")
    # The runner's --include/--num_gpus parse ids as integers; UUIDs (GPU-…) are passed as they are.
    ids: list[int | str] = [int(d) if d.isdigit() else d for d in devices[:num_ranks]] or list(range(num_ranks))
    master_addr = "127.0.0.1"  # what the runner uses when there is no hostfile
    if num_ranks == 1:
        # launch.py's environment for its only rank (RANK.. LOCAL_SIZE, CROSS_*: DeepSpeed's
        # checkpointing reads them; LOCAL_SIZE is the CPU accelerator's device count).
        env = {
            "CUDA_VISIBLE_DEVICES": str(ids[0]), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "0", "CROSS_SIZE": "1",
        }  # fmt: skip
        command = [sys.executable, "-u", "-m", module, "--config", str(job_file)]
        return LaunchPlan(command, env, "rank", tuple(ids) if devices else ())
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": ids}).encode("utf-8")).decode("utf-8")
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--node_rank=0"]
    cmd += [f"--master_addr={master_addr}", f"--master_port={master_port}", "--module", "--no_local_rank", module]
    return LaunchPlan(cmd + ["--config", str(job_file)], {}, "launch", tuple(ids) if devices else ())


def check_devices(ids: tuple[int | str, ...]) -> None:
    """Refuse a named device index this host does not have, as DeepSpeed's runner did: given
    CUDA_VISIBLE_DEVICES naming no device, the ranks would not fail but train on the CPU.
    The host's devices come from ``nvidia-smi`` (it ignores CUDA_VISIBLE_DEVICES, as the ids here
    are physical); without it (no NVIDIA driver: CPU ranks) there is nothing to check. UUIDs are
    left to CUDA."""
    smi = shutil.which("nvidia-smi")
    indices = [i for i in ids if isinstance(i, int)]
    if smi is None or not indices:
        return
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"devices: could not list this host's GPUs with {smi}: {exc}") from exc
    missing = [i for i in indices if str(i) not in listed]
    if missing:
        have = ", ".join(listed) or "none"
        raise ValueError(f"devices: {', '.join(map(str, missing))} named, but this host's GPUs are {have} (nvidia-smi)")


def launch_training(
    module: str,
    job_file: Path,
    *,
    num_ranks: int = 1,
    log_path: Path,
    timeout_s: float | None = None,
    master_port: int | None = None,
    check: bool = True,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    env: Mapping[str, str] | None = None,
    tail_lines: int = 80,
    cluster: ClusterSpec | None = None,
    status_dir: Path | None = None,
) -> LaunchResult:
    """Run ``module`` (e.g. ``"models.train.sft"``) with ``job_file`` on ``num_ranks`` local ranks,
    or on every slot of ``cluster``'s hostfile.

    Blocks until the launcher exits or ``timeout_s`` passes (then the process group is killed);
    the current job's stop signal (``models.stopping``) kills the group and raises ``Stopped``.
    Output is appended to ``log_path``. With ``status_dir`` (where the job file tells the ranks to
    write their exit records) every rank's record is checked too. With ``check`` (the default) a
    failure raises :class:`LaunchError`; otherwise ``result.failure`` says what happened.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
    cluster = cluster or ClusterSpec()
    world_size = cluster.world_size(num_ranks)
    if status_dir is not None:
        status_dir = Path(status_dir)
        shutil.rmtree(status_dir, ignore_errors=True)  # records of an earlier launch are not this one's
    job_file = Path(job_file).resolve()
    if not job_file.is_file():
        raise FileNotFoundError(f"job_file: {job_file} does not exist")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), run_env.get("PYTHONPATH", "")) if p
    )
    run_env["PYTHONUNBUFFERED"] = "1"
    if "OMP_NUM_THREADS" not in run_env:
        # share this host's cores between the ranks (torch would otherwise give each one all of them)
        run_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // num_ranks))
    plan = plan_launch(
        module,
        job_file,
        num_ranks=num_ranks,
        master_port=master_port or cluster.master_port or free_port(),
        visible_devices=run_env.get("CUDA_VISIBLE_DEVICES"),
        cluster=cluster,
    )
    check_devices(plan.named_devices)
    run_env.update(plan.env)
    command = plan.command

    tail: deque[str] = deque(maxlen=tail_lines)
    progress: list[dict[str, Any]] = []
    timed_out = False
    start = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=run_env,
            start_new_session=True,  # its own process group: one killpg reaches every rank
        )

        def pump() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
                record = parse_progress(line)
                if record is not None:
                    progress.append(record)
                    if on_progress is not None:
                        try:
                            on_progress(record)
                        except Exception as exc:  # a reporting hiccup must not kill the run
                            log.write(f"[launch] on_progress failed: {exc!r}\n")

        reader = threading.Thread(target=pump, name="launch-log", daemon=True)
        reader.start()
        try:
            timed_out = not _wait(proc, timeout_s, current_signal())
            if timed_out:
                _kill_group(proc)
        except BaseException:  # the job was stopped, or the worker is shutting down: take the ranks with us
            _kill_group(proc)
            raise
        finally:
            reader.join(timeout=KILL_GRACE_S)
            if proc.stdout is not None:
                proc.stdout.close()
        duration = time.monotonic() - start
        if timed_out:
            log.write(f"[launch] timed out after {timeout_s} s; process group killed\n")
            tail.append(f"[launch] timed out after {timeout_s} s; process group killed")

    log_tail = "\n".join(tail)
    ranks = check_ranks(status_dir, world_size) if status_dir is not None else []
    process = "rank" if plan.kind == "rank" else "launcher"
    failure = failure_reason(
        returncode=proc.returncode, timed_out=timed_out, timeout_s=timeout_s, ranks=ranks, log_tail=log_tail,
        process=process,
    )  # fmt: skip
    if failure is None and (proc.returncode != 0 or timed_out):  # defensive: never report a failed run ok
        failure = f"{process} exited with status {proc.returncode}"
    result = LaunchResult(
        returncode=proc.returncode,
        command=command,
        log_tail=log_tail,
        duration_s=duration,
        timed_out=timed_out,
        progress=progress,
        world_size=world_size,
        ranks=ranks,
        env=redact_env(run_env),
        cluster=cluster.describe(),
        log_path=str(log_path),
        failure=failure,
    )
    if check and timed_out:
        raise LaunchError(f"{module} timed out after {timeout_s} s", result)
    if check and result.returncode != 0:
        raise LaunchError(f"{module} exited with code {result.returncode}", result)
    if check and failure is not None:
        raise LaunchError(f"{module} failed: {failure}", result)
    return result


def _wait(proc: subprocess.Popen, timeout_s: float | None, stop: StopSignal) -> bool:
    """Wait for the launcher to exit (True) or ``timeout_s`` to pass (False); raises Stopped as
    soon as the job's stop signal is set."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while proc.poll() is None:
        left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, deadline - time.monotonic())
        if left <= 0:
            return False
        stop.wait(left)
        stop.check()
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group, then SIGKILL whatever is left after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # ranks that ignored SIGTERM, or outlived the launcher
    except ProcessLookupError:
        pass
    proc.wait()
