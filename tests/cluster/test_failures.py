"""A round survives its parts failing: a worker killed mid-job, the broker restarted, the control
worker killed between steps, a crashing training job, a cancel, a pickled message, a job delivered
twice at once. Real PostgreSQL and Redis, worker processes started and killed by the test; replay
voters (models/backends/replay.py) give every job a length the test controls."""

from __future__ import annotations

import signal
import time
from datetime import datetime, timezone

import pytest
import redis
from sqlalchemy import func, select

from db.schema import Checkpoint, Generation, Job, Round
from tests.cluster_support import Cluster, RedisServer, drop_database, free_port, fresh_database
from tests.conftest import POSTGRES_ADMIN_URL


@pytest.fixture
def cluster(postgres_url, redis_url, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    url, name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, redis_url)
    yield cluster
    cluster.stop_all()
    drop_database(POSTGRES_ADMIN_URL, name)


def test_worker_killed_mid_generation_job_is_redelivered(cluster):
    pool = 6
    cluster.setup(pool=pool, test=2, delay_s=0.5)
    a = cluster.start_worker("a", "weak,strong")
    _b = cluster.start_worker("b", "weak,strong,train,control")
    round_id = cluster.start_round(pool=pool, chunk=2)
    victim = cluster.wait_until(lambda: cluster.running_job("a@"), "worker a to run a generation job")
    a.kill(signal.SIGKILL)  # mid-job: two questions at 0.5 s each

    round_ = cluster.wait_for_round(round_id)
    assert round_.state == "done", cluster.describe()
    cluster.check_generations_exactly_once(round_id, pool)
    with cluster.session() as session:
        job = session.get(Job, victim.id)
        assert job.state == "done" and job.attempts == 2, (job.state, job.attempts)
        assert job.owner.startswith("b@"), job.owner
        # The generations of that chunk are the second attempt's: the first attempt kept nothing.
        assert set(session.scalars(select(Generation.job_id).where(
            Generation.question_id.in_(job.payload["question_ids"]), Generation.voter == job.payload["voter"]))) == {job.id}


def test_broker_restarted_mid_round(postgres_url, tmp_path):
    broker = RedisServer(tmp_path / "redis", free_port())
    broker.start()
    url, name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, broker.url)
    try:
        pool = 6
        cluster.setup(pool=pool, test=2, delay_s=0.5)
        worker = cluster.start_worker("w", "weak,strong,train,control")
        round_id = cluster.start_round(pool=pool, chunk=2)
        cluster.wait_until(lambda: cluster.job_count(kind="generate", state="done") >= 1, "a first generation job")
        broker.kill()  # kill -9: whatever the append-only file holds is what survives
        time.sleep(2)
        assert worker.alive()
        broker.start()  # same port, same data directory

        round_ = cluster.wait_for_round(round_id)
        assert round_.state == "done", cluster.describe()
        cluster.check_generations_exactly_once(round_id, pool)
        assert worker.alive(), worker.log()[-2000:]
        log = worker.log()
        assert "Connection to broker lost" in log or "Cannot connect to redis" in log, log[-2000:]
    finally:
        cluster.stop_all()
        broker.kill()
        drop_database(POSTGRES_ADMIN_URL, name)


def test_control_worker_killed_between_steps_then_resume_completes(cluster):
    pool = 4
    cluster.setup(pool=pool, test=2, delay_s=0.1)
    cluster.start_worker("m", "weak,strong,train")
    # No watchdog anywhere: only `round resume` may repair the round.
    control = cluster.start_worker("c", "control", failpoint="after-finish:vote", W2S_WATCHDOG_S="0")
    round_id = cluster.start_round(pool=pool, chunk=2)
    # The control worker dies right after the vote committed, before it planned the next step.
    cluster.wait_until(lambda: not control.alive(), "the control worker to die after the vote")
    assert "failpoint after-finish:vote" in control.log()
    cluster.start_worker("c2", "control", W2S_WATCHDOG_S="0")
    time.sleep(2)
    assert cluster.job_count(round_id=round_id, kind="train") == 0, "nothing but resume should plan training"
    assert cluster.round_state(round_id) == "running"

    first = cluster.w2sctl("round", "resume", round_id).stdout
    second = cluster.w2sctl("round", "resume", round_id).stdout  # at once: duplicate messages at most
    assert "1 queued jobs sent" in first, first  # the training job
    assert "queued jobs sent" in second or "nothing to resume" in second, second
    round_ = cluster.wait_for_round(round_id)
    assert round_.state == "done", cluster.describe()
    cluster.check_generations_exactly_once(round_id, pool)
    with cluster.session() as session:
        jobs = session.execute(select(Job.key, Job.state, Job.attempts, Job.result).where(Job.round_id == round_id)
                               .order_by(Job.key)).all()
    assert all(state == "done" and attempts == 1 for _, state, attempts, _ in jobs), jobs
    # Once the round is over, resume changes nothing.
    again = cluster.w2sctl("round", "resume", round_id).stdout
    assert "is done: nothing to resume" in again
    with cluster.session() as session:
        assert session.execute(select(Job.key, Job.state, Job.attempts, Job.result).where(Job.round_id == round_id)
                               .order_by(Job.key)).all() == jobs


def test_crashing_training_job_fails_the_round_and_keeps_the_promoted_checkpoint(cluster):
    pool = 4
    # The voters agree, so training starts; the student is a replay directory, not a model: the
    # training ranks crash loading it, on every attempt.
    cluster.setup(pool=pool, test=2, agree=True, delay_s=0.0)
    with cluster.session() as session:
        strong = session.scalar(select(Checkpoint).where(Checkpoint.name == "strong"))
        session.add(Checkpoint(name="strong-promoted", path=strong.path, role="strong", status="promoted",
                               parent_id=strong.id, lineage_root_id=strong.id, variant="hybrid", metrics={},
                               promoted_at=strong.created_at))
    before = cluster.checkpoints()
    cluster.start_worker("w", "weak,strong,train,control", W2S_MAX_ATTEMPTS="1")  # one launch: ~20 s
    round_id = cluster.start_round(pool=pool, chunk=4, extra=("--set", "training.timeout_s=120"),
                                   W2S_MAX_ATTEMPTS="1")

    round_ = cluster.wait_for_round(round_id, timeout=150)
    assert round_.state == "failed", cluster.describe()
    assert "train:hybrid" in round_.error and "base_model" in round_.error, round_.error  # the reason
    with cluster.session() as session:
        train = session.scalar(select(Job).where(Job.round_id == round_id, Job.kind == "train"))
        assert train.state == "failed" and train.attempts == 1 and "base_model" in train.error
        assert session.scalar(select(Job).where(Job.round_id == round_id, Job.kind == "promote")) is None
    assert cluster.checkpoints() == before  # nothing registered, nothing promoted or demoted
    assert not (cluster.tmp_path / "checkpoints" / f"round{round_id}-hybrid").exists()


def test_cancel_during_generation_stops_every_job(cluster):
    pool = 8
    cluster.setup(pool=pool, test=2, delay_s=1.0)  # four questions a job: 4 s
    worker = cluster.start_worker("w", "weak,strong,train,control")
    round_id = cluster.start_round(pool=pool, chunk=4)
    cluster.wait_until(lambda: cluster.job_count(round_id=round_id, kind="generate", state="done") >= 1
                       and cluster.running_job("w@"), "a second generation job to be running")

    out = cluster.w2sctl("round", "cancel", round_id).stdout
    acknowledged = datetime.now(timezone.utc)
    assert "1 running job(s) stopped" in out and "not confirmed" not in out, out
    generations = cluster.wait_until(lambda: _generation_count(cluster), "generations")
    # The worker goes on taking the round's remaining messages: waited for until it is done with every
    # job's message (run, ending at once as the round is cancelled, or discarded as revoked), not for
    # a fixed time.
    with cluster.session() as session:
        job_ids = session.scalars(select(Job.id).where(Job.round_id == round_id)).all()
    cluster.wait_until(lambda: all(_message_ran(worker, job_id) for job_id in job_ids),
                       f"the worker to be done with the messages of jobs {job_ids} (Celery's 'succeeded', 'raised' or 'Discarding revoked task' line)")

    with cluster.session() as session:
        round_ = session.get(Round, round_id)
        assert round_.state == "cancelled"
        jobs = session.scalars(select(Job).where(Job.round_id == round_id)).all()
        assert {job.state for job in jobs} <= {"done", "cancelled"}
        assert all(job.started_at is None or job.started_at < acknowledged for job in jobs)
        assert all(job.finished_at is None or job.finished_at < acknowledged for job in jobs)
        stopped = [job for job in jobs if job.state == "cancelled" and job.attempts > 0]
        assert len(stopped) == 1 and stopped[0].heartbeat_at is None  # its attempt said it stopped
        latest = session.scalar(select(Generation.created_at).order_by(Generation.created_at.desc()).limit(1))
        assert latest < acknowledged
        assert session.scalar(select(Job).where(Job.round_id == round_id, Job.kind == "vote")) is None
    assert _generation_count(cluster) == generations  # nothing written after the acknowledgement
    assert worker.alive()
    assert f"job {stopped[0].id} attempt 1 stopped" in worker.log()


def _message_ran(worker, job_id: int) -> bool:
    """The worker took the job's message and is done with it: ran it, or discarded it (revoked)."""
    tag = f"[w2s-job-{job_id}]"
    return any(f"{tag} succeeded" in line or f"{tag} raised" in line or ("Discarding revoked task" in line and tag in line)
               for line in worker.log().splitlines())


def _generation_count(cluster) -> int:
    with cluster.session() as session:
        return session.scalar(select(func.count()).select_from(Generation))


class _OpensAFile:
    """Unpickling this creates a file: what a pickled message could do to a worker that loads it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_message_is_refused(cluster, redis_url):
    from celery import Celery

    cluster.setup(pool=2, test=1)
    worker = cluster.start_worker("w", "weak")
    marker = cluster.tmp_path / "unpickled"
    sender = Celery("attacker", broker=redis_url)
    sender.conf.task_serializer = "pickle"
    sender.send_task("w2s.generate", args=[_OpensAFile(str(marker))], queue="weak")

    cluster.wait_until(lambda: "refused a message" in worker.log(), "the worker to refuse the message", timeout=60)
    client = redis.Redis.from_url(redis_url)
    assert client.llen("weak") == 0 and client.hlen("unacked") == 0  # dropped, not requeued
    assert not marker.exists()
    assert "application/x-python-serialize" in worker.log()
    assert worker.alive()


def test_same_job_delivered_twice_at_once_runs_once(cluster):
    pool = 2
    cluster.setup(pool=pool, test=1, delay_s=2.0)
    # Redis hands an unacknowledged message out again after the visibility timeout: shortened
    # here below a job's length, so a second copy reaches the other worker while the first runs.
    fast_redelivery = {"W2S_VISIBILITY_TIMEOUT_S": "1", "W2S_UNACKED_RESTORE_S": "0.5", "W2S_LEASE_S": "30"}
    a = cluster.start_worker("a", "weak,strong,train,control", **fast_redelivery)
    b = cluster.start_worker("b", "weak,strong,train,control", **fast_redelivery)
    round_id = cluster.start_round(pool=pool, chunk=2)
    round_ = cluster.wait_for_round(round_id)
    assert round_.state == "done", cluster.describe()
    cluster.check_generations_exactly_once(round_id, pool)
    logs = a.log() + b.log()
    with cluster.session() as session:
        for job in session.scalars(select(Job).where(Job.round_id == round_id, Job.kind == "generate")):
            assert job.attempts == 1, (job.key, job.attempts)  # one owner, never re-claimed
            received = logs.count(f"w2s.generate[w2s-job-{job.id}] received")
            assert received >= 2, f"job {job.id} was delivered {received} time(s): no redelivery was forced"
            owners = {g for g in session.scalars(select(Generation.job_id).where(
                Generation.question_id.in_(job.payload["question_ids"]), Generation.voter == job.payload["voter"]))}
            assert owners == {job.id}
    assert "'not-claimed'" in logs
