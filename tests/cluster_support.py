"""What the cluster and failure tests share: a fresh PostgreSQL database per test, worker
processes started (and killed) by the test, a private redis-server when a test must restart or
cut off the broker, and replay checkpoints (models/backends/replay.py) so that a job's length is set by
the test (a delay per question) rather than by a model on a busy CPU.

The questions are tiny word problems written here; the replayed answers are their right answers,
the strong voter's optionally off by one (then the vote keeps nothing, no training is launched
and a round is over in seconds)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.schema import Checkpoint, Generation, Job, Round
from db.session import session_scope
from services.round_questions import round_question_ids
from tests.support import drop_database, fresh_database  # noqa: F401 - the cluster tests import them from here

REPO = Path(__file__).resolve().parents[1]
W2SCTL = [sys.executable, "-m", "cli"]
# w2sctl with a failpoint armed (tests/failpoints.py): the failpoint comes first, then w2sctl's arguments.
W2SCTL_FAILPOINT = [sys.executable, "-c", "from tests.failpoints import main; main()"]

# Leases and heartbeats short enough for a test to outlive them (services.settings reads these).
FAST_DELIVERY = {
    "W2S_LEASE_S": "4", "W2S_HEARTBEAT_S": "0.5", "W2S_WATCHDOG_S": "1", "W2S_RETRY_BACKOFF_S": "0.5",
    "W2S_CANCEL_WAIT_S": "20", "W2S_SOFT_SHUTDOWN_S": "0",
}


def question(i: int) -> tuple[str, int]:
    a, b = i + 2, 2 * i + 3
    return f"Ada has {a} pens. She buys {b} more. How many pens does Ada have now?", a + b


def write_questions(directory: Path, pool: int, test: int) -> tuple[Path, Path]:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    pool_file, test_file = directory / "pool.jsonl", directory / "test.jsonl"
    pool_file.write_text("".join(json.dumps({"question": question(i)[0]}) + "\n" for i in range(pool)))
    test_file.write_text("".join(json.dumps({"question": question(i)[0], "answer": str(question(i)[1])}) + "\n"
                                 for i in range(1000, 1000 + test)))
    return pool_file, test_file


def write_replay_models(directory: Path, pool: int, test: int, *, agree: bool, delay_s: float) -> tuple[Path, Path]:
    from models.backends.replay import write_replay
    from models.prompts import zero_shot

    indices = list(range(pool)) + list(range(1000, 1000 + test))

    def records(offset: int) -> list[dict]:
        out = []
        for i in indices:
            text, answer = question(i)
            answer += offset if i < 1000 else 0  # eval answers stay right
            out.append({"prompt": zero_shot(text), "response": f"The answer is {answer}.\n#### {answer}"})
        return out

    weak = write_replay(directory / "weak", records(0), delay_s=delay_s)
    strong = write_replay(directory / "strong", records(0 if agree else 1), delay_s=delay_s)
    return weak, strong


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The whole worker (main process and pool), like `kill -9` of its process group."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class Cluster:
    tmp_path: Path
    database_url: str
    broker_url: str
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "W2S_DATABASE_URL": self.database_url, "W2S_BROKER_URL": self.broker_url,
                    "W2S_CHECKPOINT_DIR": str(self.tmp_path / "checkpoints"), "W2S_HOME": str(self.tmp_path / "home"),
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **FAST_DELIVERY, **self.env}

    # --- commands --------------------------------------------------------------------------------

    def w2sctl(self, *args, check: bool = True, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*W2SCTL, *map(str, args)], env={**self.env, **env}, capture_output=True, text=True,
                                timeout=timeout, cwd=REPO)
        if check:
            assert result.returncode == 0, f"w2sctl {args}: {result.stdout}\n{result.stderr}"
        return result

    def start_worker(self, name: str, roles: str, *, netns: str | None = None, failpoint: str | None = None,
                     backend: str | None = None, **env: str) -> Worker:
        log_path = self.tmp_path / f"worker-{name}.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        w2sctl = [*W2SCTL_FAILPOINT, failpoint] if failpoint else W2SCTL
        command = [*prefix, *w2sctl, "worker", "--role", roles, "--hostname", f"{name}@%h", "--loglevel", "info",
                                *(["--backend", backend] if backend else [])]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=REPO)
        worker = Worker(name, process, log_path)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    # --- data ------------------------------------------------------------------------------------

    def setup(self, *, pool: int, test: int, agree: bool = False, delay_s: float = 0.5) -> None:
        """Migrate, import the question sets, register the replay voters (in this process)."""
        from db.session import upgrade
        from services.registry import import_dataset, register_model

        upgrade(self.database_url)
        pool_file, test_file = write_questions(self.tmp_path / "data", pool, test)
        weak, strong = write_replay_models(self.tmp_path / "models", pool, test, agree=agree, delay_s=delay_s)
        with self.session() as session:
            import_dataset(session, pool_file, name="pool", task="gsm8k", labelled=False)
            import_dataset(session, test_file, name="test", task="gsm8k", labelled=True)
            register_model(session, name="weak", path=weak, role="weak")
            register_model(session, name="strong", path=strong, role="strong")

    def start_round(self, *, pool: int, chunk: int, extra: tuple = (), **env: str) -> int:
        out = self.w2sctl("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
                          "--eval", "test", "--pool-limit", pool, "--demonstrations", 0, "--variants", "hybrid",
                          "--set", f"generation.chunk_size={chunk}", "--set", "generation.batch_size=4", *extra, **env).stdout
        assert "started" in out, out
        return int(out.split("round ", 1)[1].split()[0])

    def session(self):
        return session_scope(self.database_url)

    # --- waiting ---------------------------------------------------------------------------------

    def wait_until(self, condition, what: str, timeout: float = 90, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(interval)
        logs = "\n".join(f"--- {w.name} ---\n{w.log()[-2500:]}" for w in self.workers)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}\n{logs}")

    def round_state(self, round_id: int) -> str:
        with self.session() as session:
            return session.get(Round, round_id).state

    def wait_for_round(self, round_id: int, timeout: float = 120) -> Round:
        self.wait_until(lambda: self.round_state(round_id) != "running", f"round {round_id} to end", timeout)
        with self.session() as session:
            round_ = session.get(Round, round_id)
            session.expunge(round_)
            return round_

    def running_job(self, owner_prefix: str, kind: str = "generate") -> Job | None:
        with self.session() as session:
            job = session.scalar(select(Job).where(Job.state == "running", Job.kind == kind,
                                                   Job.owner.like(f"{owner_prefix}%")).limit(1))
            if job is not None:
                session.expunge(job)
            return job

    def describe(self) -> str:
        with self.session() as session:
            rows = session.execute(select(Job.id, Job.key, Job.state, Job.attempts, Job.owner, Job.error)
                                   .order_by(Job.id)).all()
            rounds = session.execute(select(Round.id, Round.state, Round.error)).all()
        return "\n".join([f"rounds: {rounds}", *(str(tuple(r)) for r in rows)])

    # --- checks ----------------------------------------------------------------------------------

    def check_generations_exactly_once(self, round_id: int, pool: int) -> None:
        """Every (question, voter, sample) has exactly one generation, written by its job's owner."""
        with self.session() as session:
            rows = session.execute(select(Generation.question_id, Generation.voter, Generation.sample_index)
                                   .where(Generation.round_id == round_id)).all()
            expected = {(q, v, 0) for q in round_question_ids(session, round_id) for v in ("weak", "strong")}
        assert len(rows) == len(expected) == 2 * pool, (len(rows), len(expected))
        assert set(map(tuple, rows)) == expected

    def checkpoints(self) -> list[tuple]:
        with self.session() as session:
            return [tuple(r) for r in session.execute(select(
                Checkpoint.id, Checkpoint.name, Checkpoint.status, Checkpoint.promoted_at).order_by(Checkpoint.id))]

    def job_count(self, **where) -> int:
        with self.session() as session:
            query = select(func.count()).select_from(Job)
            for key, value in where.items():
                query = query.where(getattr(Job, key) == value)
            return session.scalar(query)


class RedisServer:
    """A private redis-server (the shared one on 6379 is never restarted), with an append-only
    file so that a restart keeps the queues, as the compose file's broker does."""

    def __init__(self, directory: Path, port: int, bind: str = "127.0.0.1") -> None:
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed on this machine (apt-get install redis-server)")
        self.directory, self.port, self.bind = directory, port, bind
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind.split(), "--protected-mode", "no",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(self.directory),
             "--maxmemory-policy", "noeviction"],
            stdout=(self.directory / "redis.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        pytest.fail(f"private redis-server on port {self.port} did not start: {(self.directory / 'redis.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
