"""The same stage I round through the real Redis broker and PostgreSQL, with a worker process
started by the test. Every step crosses a process boundary: CLI → database → broker → worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from db.schema import Job, Round
from db.session import session_scope
from tests.support import check_stage1_round
from tests.test_round_embedded import POOL_LIMIT, TINY_ROUND

pytestmark = [pytest.mark.slow, pytest.mark.integration]

W2SCTL = [sys.executable, "-m", "services.cli"]


@pytest.fixture
def service_env(postgres_url, redis_url, tmp_path):
    env = {**os.environ, "W2S_DATABASE_URL": postgres_url, "W2S_BROKER_URL": redis_url,
           "W2S_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "W2S_HOME": str(tmp_path / "home"),
           "PYTHONUNBUFFERED": "1"}
    w2sctl(env, "db", "upgrade")  # a server database is migrated on purpose, before workers start
    return env


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
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    log.close()


def test_stage1_round_through_redis_and_postgres(service_env, worker, demo_assets, tmp_path):
    env = service_env
    w2sctl(env, "dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    w2sctl(env, "dataset", "import", demo_assets.test, "--name", "test")
    w2sctl(env, "model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    w2sctl(env, "model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    started = w2sctl(env, "round", "start", *TINY_ROUND)
    assert "round 1 started" in started.stdout
    # Without --wait a distributed start returns at once: the worker process does the work.

    url = env["W2S_DATABASE_URL"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with session_scope(url) as session:
            state = session.get(Round, 1).state
        if state != "running":
            break
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(2)
    check_stage1_round(url, 1, pool_size=POOL_LIMIT, variants=["hybrid"])

    with session_scope(url) as session:
        owners = set(session.scalars(select(Job.owner)))
    # Every job ran in the worker's processes, none in this test process.
    assert owners and all(owner and not owner.endswith(f":{os.getpid()}") for owner in owners)
    status = w2sctl(env, "round", "status", "1")
    assert "done" in status.stdout and "kept by the vote" in status.stdout
