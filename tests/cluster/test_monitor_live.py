"""The monitoring commands against live rounds through the real Redis broker and PostgreSQL, with
a worker process started by the test (tiny demo models, few questions, short answers).

Two rounds are started before the worker: round 1 names a weak model whose weights were removed
after registration (its generation job fails: the injected failure), round 2 is a small stage I
round that runs to the end. What the commands said along the way is recorded once by the module
fixture; each test checks one part of it against the database, the broker or the worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.schema import Evaluation, Generation, Job, Question, Round, TrainingExample
from db.session import session_scope
from services.round_questions import round_question_ids
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import drop_database, fresh_database, invoke_cli, stop_process_group

W2SCTL = [sys.executable, "-m", "cli"]
WORKER_NAME = "w2s-monitor@" + socket.gethostname()
QUEUE_NAMES = ["weak", "strong", "train", "control"]
POOL, EVAL, CHUNK = 20, 10, 10
GOOD_ROUND = ["--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool", "--eval", "test",
              "--pool-limit", POOL, "--eval-limit", EVAL, "--demonstrations", 0, "--variants", "hybrid",
              "--set", "generation.max_new_tokens=48", "--set", "generation.batch_size=20",
              "--set", f"generation.chunk_size={CHUNK}", "--set", "training.epochs=1", "--set", "training.micro_batch_size=16",
              "--set", "training.learning_rate=1e-4", "--set", "training.max_seq_len=128"]
FAILING_ROUND = ["--stage", "sft", "--weak", "broken", "--strong", "strong", "--pool", "pool", "--eval", "test",
                 "--pool-limit", 4, "--eval-limit", 4, "--demonstrations", 0, "--variants", "hybrid",
                 "--set", "generation.max_new_tokens=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout_s: float = 60) -> str:
    """GET /metrics, waiting for the endpoint to come up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(metric sample name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@dataclass
class Live:
    env: dict[str, str]
    url: str
    redis: object
    tmp: Path
    worker: subprocess.Popen
    worker_log: Path
    worker_metrics_port: int
    queues_before_worker: dict = field(default_factory=dict)
    db_queued_before_worker: dict = field(default_factory=dict)
    redis_lengths_before_worker: dict = field(default_factory=dict)
    queues_while_running: dict | None = None
    statuses: list = field(default_factory=list)
    watch_lines: list = field(default_factory=list)
    watch_exit: int | None = None
    seconds: dict = field(default_factory=dict)

    def cli(self, *args, ok: bool = True):
        """A read-only command, in this process, against the live service."""
        return invoke_cli(*args, ok=ok)

    def subprocess_cli(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        """A command that sends messages: its own process, so its Celery app is built for this broker."""
        result = subprocess.run([*W2SCTL, *map(str, args)], env=self.env, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, f"w2sctl {args}: {result.stdout}\n{result.stderr}"
        return result


@pytest.fixture(scope="module")
def live(redis_url, demo_assets, tmp_path_factory):
    import redis

    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("monitor")
    # A database of its own: the other distributed tests count rounds from 1 in theirs.
    url, name = fresh_database(POSTGRES_ADMIN_URL, prefix="w2s_test_monitor")
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()  # nothing left by an earlier module's rounds
    port = free_port()
    env = {**os.environ, "W2S_DATABASE_URL": url, "W2S_BROKER_URL": redis_url, "W2S_HOME": str(tmp / "home"),
           "W2S_CHECKPOINT_DIR": str(tmp / "checkpoints"), "PYTHONUNBUFFERED": "1"}
    patch = pytest.MonkeyPatch()
    for key in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_HOME", "W2S_CHECKPOINT_DIR"):
        patch.setenv(key, env[key])
    worker = watch = None
    try:
        invoke_cli("db", "upgrade")
        invoke_cli("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
        invoke_cli("dataset", "import", demo_assets.test, "--name", "test")
        invoke_cli("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
        invoke_cli("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
        broken = tmp / "broken"
        shutil.copytree(demo_assets.weak_model, broken)
        invoke_cli("model", "register", "broken", "--path", broken, "--role", "weak")
        for weights in broken.glob("*.safetensors"):
            weights.unlink()  # the injected failure: registered, then its weights went missing

        state = Live(env, url, broker, tmp, worker=None, worker_log=tmp / "worker.log", worker_metrics_port=port)
        state.subprocess_cli("round", "start", *FAILING_ROUND)
        with session_scope(url) as session:  # fail at the first attempt rather than after two back-offs
            session.execute(Job.__table__.update().where(Job.round_id == 1).values(max_attempts=1))
        state.subprocess_cli("round", "start", *GOOD_ROUND)

        # Before any worker: every queued job is a message waiting in its queue.
        state.queues_before_worker = json.loads(state.cli("queues", "--json").output)
        with session_scope(url) as session:
            state.db_queued_before_worker = dict(session.execute(
                select(Job.queue, func.count()).where(Job.state == "queued").group_by(Job.queue)).all())
        state.redis_lengths_before_worker = {q: broker.llen(q) for q in QUEUE_NAMES}

        worker_env = {**env, "W2S_METRICS_PORT": str(port), "W2S_LOG_FORMAT": "json",
                      "PROMETHEUS_MULTIPROC_DIR": str(tmp / "worker-metrics")}
        (tmp / "worker-metrics").mkdir()
        log = state.worker_log.open("w")
        worker = subprocess.Popen([*W2SCTL, "worker", "--queues", ",".join(QUEUE_NAMES), "--hostname", WORKER_NAME],
                                  env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state.worker = worker
        watch_out = (tmp / "watch.jsonl").open("w")
        watch = subprocess.Popen([*W2SCTL, "round", "status", "2", "--watch", "--json", "--interval", "1"],
                                 env=env, stdout=watch_out, stderr=subprocess.STDOUT, start_new_session=True)

        deadline = time.monotonic() + 420
        while True:
            assert worker.poll() is None, state.worker_log.read_text()[-3000:]
            status = json.loads(state.cli("round", "status", "2", "--json").output)
            state.statuses.append(status)
            if state.queues_while_running is None:
                seen = json.loads(state.cli("queues", "--json").output)
                if any(w["active"] for w in seen["workers"]):
                    state.queues_while_running = seen
            if status["state"] != "running":
                break
            assert time.monotonic() < deadline, f"round 2 still running: {status['jobs']}"
            time.sleep(1.5)
        state.seconds["round"] = time.monotonic() - started
        watch.wait(timeout=60)
        state.watch_exit = watch.returncode
        watch_out.close()
        state.watch_lines = (tmp / "watch.jsonl").read_text().splitlines()
        yield state
    finally:
        for process in (watch, worker):
            if process is not None:
                stop_process_group(process)
        patch.undo()
        broker.flushdb()  # no message of these rounds may reach a later module's worker
        drop_database(POSTGRES_ADMIN_URL, name)


def test_queues_show_the_depth_and_the_consuming_worker(live):
    before = {q["queue"]: q for q in live.queues_before_worker["queues"]}
    assert live.queues_before_worker["broker"] and live.queues_before_worker["workers"] == []
    for queue in QUEUE_NAMES:
        # The depth is the broker's count: the Redis list, and every job the database has queued there.
        assert before[queue]["depth"] == live.redis_lengths_before_worker[queue] == live.db_queued_before_worker.get(queue, 0)
        assert before[queue]["consumers"] == []
    # Round 1: its baseline evaluation and one chunk per voter; round 2: the same with two chunks.
    assert before["weak"]["depth"] == 1 + POOL // CHUNK and before["strong"]["depth"] == 2 + 1 + POOL // CHUNK
    assert before["weak"]["oldest_waiting_s"] > 0 and before["weak"]["oldest_job"] is not None

    seen = live.queues_while_running
    assert seen is not None, "no `queues` call saw the worker running a job"
    (worker,) = seen["workers"]
    assert worker["worker"] == WORKER_NAME and worker["host"] == socket.gethostname()
    assert worker["queues"] == sorted(QUEUE_NAMES)
    assert worker["gpus"] == []  # answered by the worker's w2s_info command: this machine has none
    assert all(q["consumers"] == [WORKER_NAME] for q in seen["queues"])
    # The job the broker saw active is the one the database says this worker ran (a short job may
    # start and end between two database polls, so the poll is not the witness).
    (active,) = worker["active"]
    with session_scope(live.url) as session:
        job = session.get(Job, active["job"])
        assert active["key"] == job.key and active["queue"] == job.queue
        assert job.owner.startswith(WORKER_NAME + ":")


def test_jobs_state_failed_lists_the_injected_failure(live):
    failed = json.loads(live.cli("jobs", "--state", "failed", "--json").output)
    assert [(j["round"], j["key"]) for j in failed] == [(1, "generate:weak:0000")]
    (job,) = failed
    assert "no *.safetensors weight files" in job["error"] and "broken" in job["error"]
    assert job["attempts"] == 1 and job["owner"].startswith(WORKER_NAME)
    with session_scope(live.url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "failed" and f"job {job['id']} (generate:weak:0000) failed" in round_.error


def test_round_status_json_progresses_to_done(live):
    states = [s["state"] for s in live.statuses]
    assert states[0] == "running" and states[-1] == "done"
    progress = [s["progress"] for s in live.statuses]
    assert progress == sorted(progress) and progress[-1] == 1.0 and progress[0] < 1.0
    final = live.statuses[-1]
    assert all(s["state"] in ("done", "skipped") for s in final["steps"])
    steps = {s["step"]: s for s in final["steps"]}
    assert steps["generate:weak"]["completed"] == steps["generate:weak"]["total"] == POOL
    assert steps["evaluate:baseline"]["completed"] == EVAL
    with session_scope(live.url) as session:
        train = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid"))
        assert steps["train:hybrid"]["completed"] == train.result["train"]["steps"] > 0
        assert steps["train:hybrid"]["tokens_per_s"] == train.result["train"]["tokens_per_s"]
    # Each step's completed count never goes down between polls.
    for step in steps:
        done = [next(s["completed"] for s in status["steps"] if s["step"] == step) for status in live.statuses]
        assert done == sorted(done), (step, done)

    # `--watch --json`: one line per refresh, ending (exit status 0) when the round did.
    lines = [json.loads(line) for line in live.watch_lines if line.startswith("{")]
    assert live.watch_exit == 0, live.watch_lines[-5:]
    assert lines[0]["state"] == "running" and lines[-1]["state"] == "done" and lines[-1]["progress"] == 1.0
    assert len(lines) >= 3
    assert lines[-1]["report"]["kept"] == final["report"]["kept"]

    # The rich view of an ended round: one bar per step, then the status; a failed round exits 1.
    view = live.cli("round", "status", 2, "--watch").output
    assert all(step in view for step in ("generate:weak", "generate:strong", "vote", "train:hybrid", "promote"))
    failed = live.cli("round", "status", 1, "--watch", ok=False)
    assert failed.exit_code == 1 and "round 1 failed: job" in failed.output
    watched = live.cli("jobs", "--round", 2, "--watch").output  # nothing left to wait for: it returns
    assert "vote" in watched and "queued" not in watched and "running" not in watched


def test_report_plot_draws_the_rounds_metrics(live):
    from models.answers import answers_match
    from services.monitor import report_figure

    out = live.tmp / "round2.png"
    report = json.loads(live.cli("round", "report", 2, "--plot", out, "--json").output)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = report_figure(report)
    top, bottom = figure.axes[:2]

    with session_scope(live.url) as session:
        round_ = session.get(Round, 2)
        # The lineage: the strong model (the student before), then the round's candidate, each
        # with the accuracy of its evaluation in this round.
        evaluated = {}
        for job in session.scalars(select(Job).where(Job.round_id == 2, Job.kind == "evaluate")):
            evaluated[job.payload["checkpoint_id"]] = session.get(Evaluation, job.result["evaluation_id"]).accuracy
        baseline_id = round_.resolved["baseline_id"]
        candidate = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid")).result["checkpoint_id"]
        assert list(top.lines[0].get_ydata()) == [evaluated[baseline_id], evaluated[candidate]]
        assert [t.get_text() for t in top.get_xticklabels()] == ["strong", "round2-hybrid"]

        # The vote: kept share and pseudo-label accuracy, recomputed from the rows.
        question_ids = round_question_ids(session, round_.id)
        kept = set(session.scalars(select(TrainingExample.question_id).where(TrainingExample.round_id == 2)))
        gold = dict(session.execute(select(Question.id, Question.gold_answer).where(Question.id.in_(question_ids))).all())
        weak = dict(session.execute(select(Generation.question_id, Generation.answer).where(
            Generation.round_id == 2, Generation.voter == "weak")).all())
        assert list(bottom.lines[0].get_ydata()) == [pytest.approx(len(kept) / len(question_ids))]
        right = sum(answers_match(weak[q], gold[q], "gsm8k") for q in kept)
        expected = right / len(kept) if kept else None
        plotted = bottom.lines[1].get_ydata()[0]
        assert (plotted != plotted) if expected is None else plotted == pytest.approx(expected)
        assert report["report"] == round_.report

    text = live.cli("round", "report", 2).output
    assert "lineage" in text and "round2-hybrid" in text and "kept by the vote" in text


def test_metrics_endpoint_matches_the_database(live):
    port = free_port()
    server = subprocess.Popen([*W2SCTL, "metrics", "serve", "--port", str(port), "--host", "127.0.0.1"], env=live.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        values = samples(scrape(port))
    finally:
        stop_process_group(server)
    with session_scope(live.url) as session:
        counts = dict(((s, q), n) for s, q, n in session.execute(
            select(Job.state, Job.queue, func.count()).group_by(Job.state, Job.queue)))
        for state in ("queued", "running", "done", "failed", "cancelled"):
            for queue in QUEUE_NAMES:
                assert values[("w2s_jobs", (("queue", queue), ("state", state)))] == counts.get((state, queue), 0)
        assert values[("w2s_rounds", (("state", "done"),))] == 1
        assert values[("w2s_rounds", (("state", "failed"),))] == 1
        assert values[("w2s_round_progress", (("round", "2"), ("stage", "sft")))] == 1.0
        assert values[("w2s_round_progress", (("round", "1"), ("stage", "sft")))] < 1.0

        # Generation throughput of a step: its tokens over the wall-clock time from its first
        # job's start to its last job's end.
        jobs = session.scalars(select(Job).where(Job.round_id == 2, Job.step == "generate:weak")).all()
        tokens = session.scalar(select(func.sum(Generation.output_tokens)).where(
            Generation.round_id == 2, Generation.voter == "weak"))
        span = (max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)).total_seconds()
        assert values[("w2s_generation_tokens_per_second", (("round", "2"), ("step", "generate:weak")))] == \
            pytest.approx(tokens / span)
        train = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid"))
        assert values[("w2s_training_tokens_per_second", (("round", "2"), ("step", "train:hybrid")))] == \
            pytest.approx(train.result["train"]["tokens_per_s"])
        baseline = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "evaluate:baseline"))
        assert values[("w2s_round_eval_accuracy", (("checkpoint", "strong"), ("round", "2")))] == \
            pytest.approx(baseline.result["accuracy"])
    for queue in QUEUE_NAMES:
        assert values[("w2s_queue_depth", (("queue", queue),))] == live.redis.llen(queue)
        assert values[("w2s_queue_consumers", (("queue", queue),))] == 1


def test_worker_metrics_and_json_logs(live):
    values = samples(scrape(live.worker_metrics_port))
    ran: dict[str, float] = {}
    for (name, labels), value in values.items():
        if name == "w2s_worker_jobs_total":
            outcome = dict(labels)["outcome"]
            ran[outcome] = ran.get(outcome, 0) + value
    with session_scope(live.url) as session:
        done = session.scalar(select(func.count()).select_from(Job).where(Job.state == "done"))
        failed = session.scalar(select(func.count()).select_from(Job).where(Job.state == "failed"))
        generated = session.scalar(select(func.sum(Generation.output_tokens)))
        eval_tokens = session.scalar(select(func.sum(Evaluation.output_tokens)))
        train = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid"))
        train_job = train.id
    assert ran["done"] == done and ran["failed"] == failed == 1
    by_kind: dict[str, float] = {}
    for (name, labels), value in values.items():
        if name == "w2s_worker_generated_tokens_total":
            by_kind[dict(labels)["kind"]] = by_kind.get(dict(labels)["kind"], 0) + value
    assert by_kind["generate"] == generated and by_kind["evaluate"] == eval_tokens
    assert values[("w2s_worker_training_tokens_per_second", (("queue", "train"),))] == \
        pytest.approx(train.result["train"]["tokens_per_s"])

    # W2S_LOG_FORMAT=json: the worker's log lines are JSON, and a job's lines name its round and job.
    records = [json.loads(line) for line in live.worker_log.read_text().splitlines() if line.startswith("{")]
    assert records, live.worker_log.read_text()[-2000:]
    started = [r for r in records if "attempt" in r["message"] and "started" in r["message"]]
    assert {(r["round_id"], r["job_id"]) for r in started} >= {(2, train_job)}
    with session_scope(live.url) as session:
        failed_id = session.scalar(select(Job.id).where(Job.state == "failed"))
    failure = [r for r in records if r["level"] == "error" and r["job_id"] == failed_id and "failed" in r["message"]]
    assert failure and failure[0]["round_id"] == 1 and "safetensors" in failure[0].get("exception", "")


def test_jobs_show_and_retry(live):
    with session_scope(live.url) as session:
        failed = session.scalar(select(Job).where(Job.state == "failed"))
        failed_id = failed.id
        train = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid"))
        train_id, log_path, train_result = train.id, train.log_path, train.result
    shown = live.cli("jobs", "show", failed_id).output
    assert "generate:weak:0000" in shown and "1 of 1" in shown and WORKER_NAME in shown
    assert "no *.safetensors weight files" in shown
    text = live.cli("jobs", "show", train_id).output
    assert f"log: {log_path}" in text
    if "launch" in train_result:  # training jobs that record their launch: the command and each rank's exit
        command = train_result["launch"]["command"]  # one rank runs alone, more under DeepSpeed's launcher
        assert "training launch" in text and command[command.index("-m") + 1] in text
        ranks = train_result["launch"].get("ranks") or []
        assert all(re.search(rf"rank {i}\s+{rank['status']}", text) for i, rank in enumerate(ranks))
    shown = json.loads(live.cli("jobs", "show", train_id, "--json", "--lines", 5).output)
    assert shown["log_path"] == log_path and shown["log_tail"] == Path(log_path).read_text().splitlines()[-5:]
    assert shown["ran_s"] > 0 and shown["host"] == WORKER_NAME

    refused = live.cli("jobs", "retry", train_id, ok=False)
    assert refused.exit_code == 1
    assert f"job {train_id} (train:hybrid, round 2) is done: it finished; only a failed job can be retried" in refused.output
    unknown = live.cli("jobs", "retry", 99999, ok=False)
    assert unknown.exit_code == 1 and "job 99999 does not exist" in unknown.output
    with session_scope(live.url) as session:
        assert session.get(Job, train_id).state == "done"

    # The failed job goes back through the broker to the worker, and fails again (its weights are
    # still missing) at its second attempt; its round failed again with it.
    live.subprocess_cli("jobs", "retry", failed_id)
    deadline = time.monotonic() + 120
    while True:
        with session_scope(live.url) as session:
            job = session.get(Job, failed_id)
            if job.state == "failed" and job.attempts == 2:
                assert job.max_attempts == 2 and "safetensors" in job.error
                assert session.get(Round, 1).state == "failed"
                break
        assert time.monotonic() < deadline, f"job {failed_id} is {job.state} after {job.attempts} attempts"
        time.sleep(1)
