"""The same stage I round through the real Redis broker and PostgreSQL, with a worker process
started by the test. Every step crosses a process boundary: CLI → database → broker → worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from db.schema import Job, Round
from db.session import session_scope
from tests.conftest import POSTGRES_ADMIN_URL
from tests.embedded.test_round_embedded import POOL_LIMIT, TINY_ROUND
from tests.support import check_stage1_round, drop_database, fresh_database, stop_process_group

W2SCTL = [sys.executable, "-m", "cli"]


@pytest.fixture
def service_env(redis_url, tmp_path):
    # A database of its own: the test reads rounds by id (1, 2), which the session's shared database
    # has already handed out when an earlier cluster test started rounds there.
    url, name = fresh_database(POSTGRES_ADMIN_URL, prefix="w2s_test_distributed")
    env = {**os.environ, "W2S_DATABASE_URL": url, "W2S_BROKER_URL": redis_url,
           "W2S_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "W2S_HOME": str(tmp_path / "home"),
           "PYTHONUNBUFFERED": "1"}
    w2sctl(env, "db", "upgrade")  # a server database is migrated on purpose, before workers start
    yield env
    drop_database(POSTGRES_ADMIN_URL, name)


def w2sctl(env, *args, check=True):
    result = subprocess.run([*W2SCTL, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"w2sctl {args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def worker(service_env, tmp_path):
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen([*W2SCTL, "worker", "--queues", "weak,strong,train,control", "--hostname", "w2s-test@%h"],
                               env=service_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield process
    stop_process_group(process)
    log.close()


def wait_for_round(url: str, round_id: int, worker, tmp_path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(url) as session:
            if session.get(Round, round_id).state != "running":
                return
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.5)  # one indexed read a poll: a short interval costs nothing, a long one waits
    with session_scope(url) as session:
        jobs = session.execute(select(Job.key, Job.state).where(Job.round_id == round_id).order_by(Job.id)).all()
    raise AssertionError(f"round {round_id} still running after {timeout_s}s; its jobs: {[tuple(j) for j in jobs]}\n"
                         + (tmp_path / "worker.log").read_text()[-3000:])


def test_stage1_and_stage2_rounds_through_redis_and_postgres(service_env, worker, demo_assets, tmp_path):
    env = service_env
    w2sctl(env, "dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    w2sctl(env, "dataset", "import", demo_assets.test, "--name", "test")
    w2sctl(env, "model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    w2sctl(env, "model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    started = w2sctl(env, "round", "start", *TINY_ROUND)
    assert "round 1 started" in started.stdout
    # Without --wait a distributed start returns at once: the worker process does the work.

    url = env["W2S_DATABASE_URL"]
    wait_for_round(url, 1, worker, tmp_path)
    check_stage1_round(url, 1, pool_size=POOL_LIMIT, variants=["hybrid"])

    with session_scope(url) as session:
        owners = set(session.scalars(select(Job.owner)))
    # Every job ran in the worker's processes, none in this test process.
    assert owners and all(owner and not owner.endswith(f":{os.getpid()}") for owner in owners)
    status = w2sctl(env, "round", "status", "1")
    assert "done" in status.stdout and "kept by the vote" in status.stdout

    # Stage II through the same worker, from the stage I candidate (marked promoted, as an operator
    # overriding the gate would: the tiny models' candidate may have been rejected).
    from db.schema import Checkpoint, PreferencePair

    with session_scope(url) as session:
        candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == 1))
        candidate.status = "promoted"
        student = candidate.name
    w2sctl(env, "round", "start", "--stage", "preference", "--student", student, "--weak", "weak", "--pool", "pool",
           "--pool-limit", 30, "--eval", "test", "--eval-limit", 30, "--samples", 4, "--loss", "orpo",
           "--set", "sampling.temperature=0.7", "--set", "pairs.floor=0.5", "--set", "pairs.tau=0.75",
           "--set", "generation.max_new_tokens=48", "--set", "training.learning_rate=1e-4",
           "--set", "training.max_seq_len=128")
    wait_for_round(url, 2, worker, tmp_path)
    with session_scope(url) as session:
        round_ = session.get(Round, 2)
        assert round_.state == "done", round_.error
        samples = session.scalars(select(Job).where(Job.round_id == 2, Job.kind == "generate")).all()
        assert samples and all(job.state == "done" for job in samples)
        pairs = session.scalar(select(func.count()).select_from(PreferencePair).where(PreferencePair.round_id == 2))
        assert round_.report["pairs"] == pairs
