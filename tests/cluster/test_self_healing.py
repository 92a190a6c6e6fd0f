"""A round heals itself (issue #12): each fault that used to leave queued jobs without a message
(a send lost while the broker was down, messages taken while PostgreSQL was down, a killed train
worker, a start with the broker unreachable, a flushed broker) is reproduced against a private
redis-server and a cut-off link to the real PostgreSQL, and the round finishes with no manual
command, with the same rows as a clean round, within the bound the delivery settings promise.

Cheap on purpose: replay voters that disagree (the vote keeps nothing, so no training launches),
one small worker, leases and reconciliation periods of a few seconds. Each test prints the
recovery time it measured (run with -s to see them)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest
import redis
from sqlalchemy import select, text

from db.schema import Generation, Job, Question, Round, TrainingExample
from services.monitor import broker_messages
from tests.cluster_support import REPO, W2SCTL, Cluster, RedisServer, drop_database, free_port, fresh_database
from tests.conftest import POSTGRES_ADMIN_URL

# Short periods, so that the bound below is small: a queued job without a message is re-sent at
# the first reconciliation after it has been seen without one for the grace period.
RECONCILE = {"W2S_RECONCILE_S": "1", "W2S_RECONCILE_GRACE_S": "2"}
LEASE_S = 4.0  # tests.cluster_support.FAST_DELIVERY
# A stranded job is claimed again within lease (a lost attempt is re-planned) + grace + period (its
# message is re-sent) of the fault's end; the slack is for a busy worker finishing the job it runs
# and for scheduling on a loaded 2-core machine.
SLACK_S = 15.0
RECOVERY_BOUND_S = LEASE_S + 2 + 1 + SLACK_S
POOL = 4


def round_rows(cluster: Cluster, round_id: int) -> dict:
    """What a round leaves behind, by question index (ids differ between databases)."""
    with cluster.session() as session:
        index = dict(session.execute(select(Question.id, Question.index)).all())
        generations = sorted((index[q], voter, sample, answer) for q, voter, sample, answer in session.execute(
            select(Generation.question_id, Generation.voter, Generation.sample_index, Generation.answer)
            .where(Generation.round_id == round_id)))
        kept = sorted((variant, index[q]) for variant, q in session.execute(
            select(TrainingExample.variant, TrainingExample.question_id).where(TrainingExample.round_id == round_id)))
        jobs = sorted(tuple(r) for r in session.execute(select(Job.key, Job.state).where(Job.round_id == round_id)))
        round_ = session.get(Round, round_id)
        return {"state": round_.state, "outcome": round_.outcome, "generations": generations, "kept": kept,
                "jobs": jobs}


def clean_rows(pool: int) -> dict:
    """A clean round of these replay voters: every question answered once by each (the weak voter
    right, the strong one off by one), nothing kept, every job done, the candidate-less round rejected."""
    from tests.cluster_support import question

    generations = sorted([(i, "weak", 0, str(question(i)[1])) for i in range(pool)]
                         + [(i, "strong", 0, str(question(i)[1] + 1)) for i in range(pool)])
    jobs = sorted([(f"generate:{voter}:{c:04d}", "done") for voter in ("weak", "strong") for c in range(pool // 2)]
                  + [("evaluate:baseline", "done"), ("vote", "done"), ("promote", "done")]
                  + [(f"train:{v}", "done") for v in ("hybrid",)])
    return {"generations": generations, "kept": [], "jobs": jobs}


def assert_like_clean(cluster: Cluster, round_id: int, variants: tuple[str, ...] = ("hybrid",)) -> None:
    rows = round_rows(cluster, round_id)
    expected = clean_rows(POOL)
    expected["jobs"] = sorted([j for j in expected["jobs"] if not j[0].startswith("train:")]
                              + [(f"train:{v}", "done") for v in variants])
    assert rows["state"] == "done", cluster.describe()
    assert {k: rows[k] for k in expected} == expected


def queued_ids(cluster: Cluster, round_id: int) -> list[int]:
    with cluster.session() as session:
        return list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.state == "queued")))


def recovery_s(cluster: Cluster, stranded: list[int], fault_over: datetime) -> float:
    """Seconds from the end of a fault until the first job it stranded was claimed again: the time
    the system took to notice and send, not the rest of the round."""
    assert stranded, "the fault stranded no job: the test reproduced nothing"
    with cluster.session() as session:
        starts = list(session.scalars(select(Job.started_at).where(Job.id.in_(stranded))))
    assert all(start is not None and start > fault_over for start in starts), (starts, fault_over)
    return (min(starts) - fault_over).total_seconds()


def report(fault: str, recovered_s: float, done_s: float) -> None:
    print(f"\n{fault}: stranded jobs claimed again {recovered_s:.1f} s after the fault ended; round done after "
          f"{done_s:.1f} s")
    assert recovered_s < RECOVERY_BOUND_S, f"{fault}: {recovered_s:.1f} s > {RECOVERY_BOUND_S} s"


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cluster(postgres_url, broker, tmp_path):
    url, name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, broker.url, env=dict(RECONCILE))
    yield cluster
    cluster.stop_all()
    drop_database(POSTGRES_ADMIN_URL, name)


def test_clean_round_matches_the_expected_rows(cluster):
    """The reference every faulted round is compared with."""
    cluster.setup(pool=POOL, test=2, delay_s=0.0)
    cluster.start_worker("w", "weak,strong,train,control")
    round_id = cluster.start_round(pool=POOL, chunk=2)
    cluster.wait_for_round(round_id)
    assert_like_clean(cluster, round_id)


def test_watchdog_send_lost_while_broker_down_is_retried(cluster, broker):
    """Fault 1: the broker is down longer than a lease while a job runs: the worker gives the job up,
    the watchdog re-plans it and its send fails; once the broker is back the send is retried."""
    cluster.setup(pool=POOL, test=2, delay_s=1.0)
    worker = cluster.start_worker("w", "weak,strong,train,control")
    round_id = cluster.start_round(pool=POOL, chunk=2)
    cluster.wait_until(lambda: cluster.running_job("w@"), "a generation job to run")
    broker.kill()
    cluster.wait_until(lambda: "watchdog pass" in worker.log() and "failed" in worker.log(),
                       "the watchdog's send to fail while the broker is down", timeout=60)
    stranded = queued_ids(cluster, round_id)
    broker.start()
    back, over = time.monotonic(), datetime.now(timezone.utc)
    cluster.wait_for_round(round_id, timeout=RECOVERY_BOUND_S + 90)
    assert_like_clean(cluster, round_id)
    report("fault 1 (watchdog send lost)", recovery_s(cluster, stranded, over), time.monotonic() - back)


class PostgresLink:
    """The workers reach PostgreSQL through this TCP forwarder; stopping it is, for them, the
    database going away (established connections are cut too: socat forks one child per link)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen | None = None

    def up(self) -> None:
        self.process = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr", "TCP:127.0.0.1:5432"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import socket

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        pytest.fail(f"socat did not listen on {self.port}")

    def down(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
            self.process = None


def test_messages_taken_while_database_down_are_not_lost(cluster, broker):
    """Fault 2: workers take messages while PostgreSQL is unreachable; each goes back to the broker
    (retried with back-off) instead of being acknowledged, and runs once the database is back."""
    link = PostgresLink(free_port())
    link.up()
    try:
        cluster.setup(pool=POOL, test=2, delay_s=0.0)
        over_link = {"W2S_DATABASE_URL": cluster.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{link.port}")}
        # No reconciliation: this fault must heal by itself (the messages are kept, not re-sent).
        worker = cluster.start_worker("w", "weak,strong,train,control", W2S_RECONCILE_S="0", **over_link)
        cluster.wait_until(lambda: "ready" in worker.log(), "the worker to be ready")
        link.down()
        round_id = cluster.start_round(pool=POOL, chunk=2)  # written directly, sent to the broker
        cluster.wait_until(lambda: worker.log().count("message sent back") >= 2,
                           "the worker to send messages back while the database is down", timeout=60)
        time.sleep(3)  # the database stays down a while: the messages go round with back-off
        stranded = queued_ids(cluster, round_id)
        link.up()
        back, over = time.monotonic(), datetime.now(timezone.utc)
        cluster.wait_for_round(round_id, timeout=RECOVERY_BOUND_S + 90)
        assert_like_clean(cluster, round_id)
        report("fault 2 (database down)", recovery_s(cluster, stranded, over), time.monotonic() - back)
    finally:
        cluster.stop_all()
        link.down()


def _held_in_unacked(client: redis.Redis) -> list[str]:
    return [str(v) for v in client.hvals("unacked")]


def test_killed_train_worker_strands_no_other_training_message(cluster, broker):
    """Fault 3: a train worker busy with one training job reserves no other; killed, it leaves the
    other job's message in the queue for the next worker, and the job it was running is re-sent."""
    cluster.setup(pool=POOL, test=2, delay_s=0.0)
    cluster.start_worker("m", "weak,strong,control")
    round_id = cluster.start_round(pool=POOL, chunk=2, extra=("--variants", "weak,hybrid"))
    cluster.wait_until(lambda: cluster.job_count(round_id=round_id, kind="train") == 2, "two training jobs")
    client = redis.Redis.from_url(broker.url)
    # Hold both training jobs' rows: a train worker's claim blocks on them, so its first job stays
    # active (its message acknowledged at the start, as training's is) for as long as the test wants.
    with cluster.session() as holder:
        holder.execute(text("SELECT id FROM jobs WHERE kind = 'train' FOR UPDATE"))
        trainer = cluster.start_worker("t", "train")
        cluster.wait_until(lambda: "w2s.train[" in trainer.log() and "received" in trainer.log(),
                           "the train worker to take a training message")
        time.sleep(2)  # time enough for a prefetching worker to reserve the second message
        assert client.llen("train") == 1, "the second training message left the queue"
        assert not any("w2s.train" in entry for entry in _held_in_unacked(client)), "a training message is reserved"
        # The next train worker is up (and waits on the second job's row) before the first dies.
        successor = cluster.start_worker("t2", "train")
        cluster.wait_until(lambda: client.llen("train") == 0 and "w2s.train[" in successor.log(),
                           "the second train worker to take the waiting training message")
        # The job the first worker took: its message was acknowledged when its run started.
        stranded = [int(trainer.log().split("w2s.train[w2s-job-", 1)[1].split("]", 1)[0])]
        trainer.kill()
        trainer.process.wait(timeout=10)
        killed, over = time.monotonic(), datetime.now(timezone.utc)
        holder.rollback()
    cluster.wait_for_round(round_id, timeout=RECOVERY_BOUND_S + 90)
    assert_like_clean(cluster, round_id, variants=("hybrid", "weak"))
    # That job's message died with the first worker: the reconciliation sent it again.
    report("fault 3 (train worker killed)", recovery_s(cluster, stranded, over), time.monotonic() - killed)


def test_start_with_broker_unreachable_is_left_to_reconciliation(cluster, broker):
    """Fault 4: `round start` with the broker down records the round, says in one line that the
    control worker will send its jobs, exits non-zero; the same start again (same --name) returns
    that round instead of making a second one; the round runs once the broker is back."""
    cluster.setup(pool=POOL, test=2, delay_s=0.0)
    worker = cluster.start_worker("w", "weak,strong,train,control")
    cluster.wait_until(lambda: "ready" in worker.log(), "the worker to be ready")
    broker.kill()
    args = ("round", "start", "--name", "nightly-1", "--stage", "sft", "--weak", "weak", "--strong", "strong",
            "--pool", "pool", "--eval", "test", "--pool-limit", POOL, "--demonstrations", 0, "--variants", "hybrid",
            "--set", "generation.chunk_size=2", "--set", "generation.batch_size=4")
    first = cluster.w2sctl(*args, check=False)
    assert first.returncode != 0
    message = first.stderr.strip()
    assert len(message.splitlines()) == 1, first.stderr
    assert "could not be sent" in message and "reconciliation" in message and "redis://" in message, message
    again = cluster.w2sctl(*args, check=False)
    assert again.returncode != 0 and "round 1 " in again.stderr, again.stderr
    with cluster.session() as session:
        assert session.scalar(select(text("count(*)")).select_from(Round)) == 1
    stranded = queued_ids(cluster, 1)
    broker.start()
    back, over = time.monotonic(), datetime.now(timezone.utc)
    cluster.wait_for_round(1, timeout=RECOVERY_BOUND_S + 90)
    assert_like_clean(cluster, 1)
    report("fault 4 (start with the broker down)", recovery_s(cluster, stranded, over), time.monotonic() - back)
    third = cluster.w2sctl(*args)
    assert "round 1" in third.stdout and "already" in third.stdout, third.stdout


def test_flushed_broker_is_noticed_and_refilled(cluster, broker):
    """Fault 5: FLUSHALL drops every queued message; the reconciliation sees queued jobs without
    messages and sends them again."""
    cluster.setup(pool=POOL, test=2, delay_s=1.0)
    metrics_port = free_port()
    worker = cluster.start_worker("w", "weak,strong,train,control", W2S_METRICS_PORT=str(metrics_port),
                                  PROMETHEUS_MULTIPROC_DIR=str(cluster.tmp_path / "metrics"))
    (cluster.tmp_path / "metrics").mkdir()
    round_id = cluster.start_round(pool=POOL, chunk=2)
    cluster.wait_until(lambda: cluster.running_job("w@"), "a generation job to run")
    client = redis.Redis.from_url(broker.url)
    assert client.llen("weak") + client.llen("strong") >= 1, "nothing queued to lose"
    stranded = queued_ids(cluster, round_id)
    client.flushall()
    flushed, over = time.monotonic(), datetime.now(timezone.utc)
    cluster.wait_for_round(round_id, timeout=RECOVERY_BOUND_S + 90)
    assert_like_clean(cluster, round_id)
    report("fault 5 (FLUSHALL)", recovery_s(cluster, stranded, over), time.monotonic() - flushed)
    # Logged with its time, and counted where the worker's metrics endpoint reads.
    resent = [line for line in worker.log().splitlines() if "had no message for the grace period; sent again" in line]
    assert resent and resent[0][:4].isdigit(), worker.log()[-3000:]
    from urllib.request import urlopen

    scrape = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counted = {line.split(" ")[0]: float(line.split(" ")[1]) for line in scrape.splitlines()
               if line.startswith(("w2s_reconcile_resent_jobs_total", 'w2s_reconcile_passes_total{outcome="ok"}'))}
    assert counted.get("w2s_reconcile_resent_jobs_total", 0) >= 1, scrape
    assert counted.get('w2s_reconcile_passes_total{outcome="ok"}', 0) >= 2, scrape


def test_status_says_what_holds_a_round_up(cluster, broker):
    """`round status` names, per step, a job backing off after a failure (with its error), a queue
    no worker consumes, and jobs queued with no message (and what will send them); `--watch`
    into a pipe prints as it goes."""
    cluster.setup(pool=POOL, test=2, delay_s=0.0)
    responses = cluster.tmp_path / "models" / "strong" / "responses.jsonl"
    lines = responses.read_text().splitlines(keepends=True)
    responses.write_text("".join(lines[1:]))  # question 0 has no strong answer: its chunk fails
    worker = cluster.start_worker("w", "weak,strong", W2S_RETRY_BACKOFF_S="120")
    round_id = cluster.start_round(pool=POOL, chunk=2)

    def backing_off():
        with cluster.session() as session:
            return session.scalar(select(Job).where(Job.round_id == round_id, Job.key == "generate:strong:0000",
                                                    Job.state == "queued", Job.attempts == 1))
    failed = cluster.wait_until(backing_off, "the strong chunk to fail once and back off")
    # The retry's message goes to the queue first, then the worker takes it and holds it for its
    # countdown; killed before it took it, the message would still wait in the queue.
    cluster.wait_until(lambda: broker_messages(broker.url).get(failed.id) == "taken",
                       f"the worker to take job {failed.id}'s retry message (held for its 120 s countdown)")
    worker.kill()  # its retry (held back for 120 s) dies with it: no message, no consumer
    worker.process.wait(timeout=10)

    status = cluster.w2sctl("round", "status", round_id, COLUMNS="250").stdout
    assert f"job {failed.id} backing off after attempt 1 of 3: KeyError" in status, status
    assert "generate:strong: queue strong has no consumer: start one (`w2sctl worker --role strong`)" in status, status
    assert (f"job(s) {failed.id} queued with no message: no control worker reconciles them: "
            f"run `w2sctl round resume {round_id}`") in status, status

    cluster.start_worker("c", "control", W2S_RECONCILE_GRACE_S="60")
    cluster.wait_until(lambda: "reconciliation sends them again within 61 s" in cluster.w2sctl(
        "round", "status", round_id, COLUMNS="250", W2S_RECONCILE_GRACE_S="60").stdout,
        "status to say that the control worker will send the job again, and when", timeout=60)

    watch = subprocess.Popen([*W2SCTL, "round", "status", str(round_id), "--watch", "--interval", "0.5"],
                             env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the round cannot end (no strong worker): whatever comes, comes while it runs
        first, second = read_line(watch, 60), read_line(watch, 60)
        assert f"round {round_id} running" in first, first
        assert second.startswith("  ! generate:strong: job ") and "backing off" in second, second
    finally:
        watch.kill()
        watch.wait(timeout=10)


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next line the process prints, or a failure after `timeout` seconds."""
    import queue
    import threading

    lines = process.__dict__.setdefault("_lines", queue.Queue())
    if not process.__dict__.get("_reader"):
        process._reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
        process._reader.start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line from {process.args} within {timeout} s") from None
