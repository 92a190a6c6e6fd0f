"""Run a training entry point under the DeepSpeed launcher, as a subprocess.

The train task writes a job file and calls :func:`launch_training`; the launcher starts one
process per rank, each running ``python -m <module> --config <job file>``. Everything the ranks
print goes to ``log_path`` as it comes, and the JSON progress lines (``{"step": .., "loss": ..}``)
can be followed with ``on_progress``. A timeout kills the whole process group (launcher and ranks).
"""

from __future__ import annotations

import json
import os
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

REPO_ROOT = Path(__file__).resolve().parents[1]  # holds models/, workers/, …: the ranks import from it
KILL_GRACE_S = 10.0  # SIGTERM first (the launcher forwards it to its ranks), SIGKILL after this


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    command: list[str]
    log_tail: str  # the last lines the launcher and ranks printed
    duration_s: float
    timed_out: bool = False
    progress: list[dict[str, Any]] = field(default_factory=list, repr=False)  # parsed loss lines

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


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


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_command(
    module: str,
    job_file: Path,
    *,
    num_ranks: int,
    master_port: int,
    visible_devices: str | None = None,
) -> list[str]:
    """The DeepSpeed launcher command line for one job on this host.

    With ``CUDA_VISIBLE_DEVICES`` set, the launcher's ``--num_gpus`` would ignore it and use
    devices 0..N-1, so the visible devices are named with ``--include localhost:<ids>`` instead.
    """
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    devices = [d for d in (visible_devices or "").split(",") if d.strip()]
    if devices:
        if num_ranks > len(devices):
            raise ValueError(
                f"num_ranks: {num_ranks} ranks but only {len(devices)} visible devices ({visible_devices})"
            )
        cmd += ["--include", "localhost:" + ",".join(devices[:num_ranks])]
    else:
        cmd += ["--num_gpus", str(num_ranks)]
    cmd += ["--master_port", str(master_port), "--module", "--no_local_rank", module]
    cmd += ["--config", str(job_file)]
    return cmd


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
) -> LaunchResult:
    """Run ``module`` (e.g. ``"models.train.sft"``) on ``num_ranks`` local ranks with ``job_file``.

    Blocks until the launcher exits or ``timeout_s`` passes (then the process group is killed).
    Output is appended to ``log_path``. With ``check`` (the default) a non-zero exit or a timeout
    raises :class:`LaunchError`; otherwise the result says what happened.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
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
    command = build_command(
        module,
        job_file,
        num_ranks=num_ranks,
        master_port=master_port or free_port(),
        visible_devices=run_env.get("CUDA_VISIBLE_DEVICES"),
    )

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
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # e.g. the worker is being shut down: take the ranks with us
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

    result = LaunchResult(
        returncode=proc.returncode,
        command=command,
        log_tail="\n".join(tail),
        duration_s=duration,
        timed_out=timed_out,
        progress=progress,
    )
    if check and timed_out:
        raise LaunchError(f"{module} timed out after {timeout_s} s", result)
    if check and result.returncode != 0:
        raise LaunchError(f"{module} exited with code {result.returncode}", result)
    return result


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
