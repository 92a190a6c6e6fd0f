"""The rules behind the cluster's delivery guarantees, called directly: delivery settings from the
environment, worker roles, lease expiry and the attempt cap, fencing, cancel, path confinement,
trust_remote_code by name. The database ones run on the real PostgreSQL server."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from db.schema import Job, Round, utcnow
from services.config import ConfigError, parse_round_config
from services.errors import InputError
from services.settings import load_settings
from tests.cluster_support import Cluster, drop_database, fresh_database
from tests.conftest import POSTGRES_ADMIN_URL
from workers.roles import plan_worker


def test_delivery_settings_from_the_environment():
    default = load_settings({}).delivery
    assert default.lease("train") > default.lease("generate") and default.heartbeat("generate") < default.lease("generate")
    assert default.visibility_timeout_s > max(default.time_limit_s.values())  # the broker never redelivers a live job
    fast = load_settings({"W2S_LEASE_S": "4", "W2S_LEASE_TRAIN_S": "9", "W2S_MAX_ATTEMPTS": "2",
                          "W2S_TIME_LIMIT_VOTE_S": "60"}).delivery
    assert fast.lease("generate") == 4 and fast.lease("train") == 9 and fast.heartbeat("generate") == pytest.approx(0.4)
    assert fast.max_attempts == 2 and fast.time_limit("vote") == 60
    with pytest.raises(ConfigError, match="W2S_LEASE_S='soon'"):
        load_settings({"W2S_LEASE_S": "soon"})
    with pytest.raises(ConfigError, match="W2S_MAX_ATTEMPTS"):
        load_settings({"W2S_MAX_ATTEMPTS": "0"})


def test_worker_roles():
    weak = plan_worker(roles="weak", queues=None, gpus="0,1", concurrency=None)
    assert weak.queues == ["weak"] and weak.concurrency == 2 and weak.pin_per_process and not weak.watchdog
    train = plan_worker(roles="train", queues=None, gpus="0,1,2,3", concurrency=None)
    assert train.concurrency == 1 and not train.pin_per_process  # one process; DeepSpeed starts the ranks
    assert plan_worker(roles="control", queues=None, gpus=None, concurrency=None).watchdog
    assert plan_worker(roles=None, queues=None, gpus=None, concurrency=None).queues == ["weak", "strong", "train", "control"]
    for kwargs, message in [({"roles": "gpu"}, "--role: unknown gpu"), ({"roles": "weak", "gpus": "a"}, "--gpus"),
                            ({"roles": "control", "gpus": "0"}, "only the weak, strong and train"),
                            ({"roles": "weak", "queues": "weak"}, "--role and --queues"),
                            ({"roles": "weak", "gpus": "0,1", "concurrency": 3}, "one process per GPU")]:
        with pytest.raises(InputError, match=message):
            plan_worker(**{"roles": None, "queues": None, "gpus": None, "concurrency": None, **kwargs})


def test_checkpoint_names_stay_in_the_store(tmp_path):
    from services.store import checkpoint_path

    store = tmp_path / "store"
    store.mkdir()
    assert checkpoint_path(store, "round3-hybrid") == store.resolve() / "round3-hybrid"
    assert checkpoint_path(store, "jobs/job4-attempt1").parent == store.resolve() / "jobs"
    for name, message in [("../elsewhere", "'..' is not allowed"), ("a/../../x", "'..' is not allowed"),
                          ("/etc/passwd", "absolute"), ("", "empty")]:
        with pytest.raises(InputError, match=message):
            checkpoint_path(store, name)
    (store / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside the checkpoint store"):
        checkpoint_path(store, "link/x")


def test_trust_remote_code_only_for_models_allowed_by_name(tmp_path, monkeypatch):
    from models.backends.checkpoints import CheckpointError, check_remote_code

    model = tmp_path / "fancy-model"
    model.mkdir()
    check_remote_code(model, False)  # not asked for: nothing to allow
    with pytest.raises(CheckpointError, match="add its name \\(fancy-model\\) to W2S_TRUST_REMOTE_CODE"):
        check_remote_code(model, True, load_settings({}).remote_code_allowed)
    allowed = load_settings({"W2S_TRUST_REMOTE_CODE": "other-model, fancy-model"}).remote_code_allowed
    assert allowed == ("other-model", "fancy-model")
    check_remote_code(model, True, allowed)


def test_replay_finds_the_asked_question_in_a_few_shot_prompt():
    from models.backends.replay import question_key
    from models.prompts import few_shot, zero_shot

    assert question_key(few_shot("What is 2 + 2?", [("What is 1 + 1?", "2")])) == zero_shot("What is 2 + 2?")
    assert question_key(zero_shot("What is 3 + 3?")) == zero_shot("What is 3 + 3?")


# --- on PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
def round_db(postgres_url, tmp_path, monkeypatch):
    """A started stage I round (jobs planned, nothing run) in a fresh database."""
    url, name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, "redis://unused")
    cluster.setup(pool=4, test=2)
    monkeypatch.setenv("W2S_LEASE_S", "5")
    monkeypatch.setenv("W2S_MAX_ATTEMPTS", "2")
    from services.rounds import start_round

    config = parse_round_config({"stage": "sft", "weak": "weak", "strong": "strong", "pool": "pool",
                                 "eval": {"dataset": "test"}, "demonstrations": 0, "variants": ["hybrid"],
                                 "generation": {"chunk_size": 2}})
    with cluster.session() as session:
        round_, _ = start_round(session, config, load_settings().delivery)
        round_id = round_.id
    yield cluster, round_id
    drop_database(POSTGRES_ADMIN_URL, name)


def _run(cluster, job_id: int, *, attempts: int, heartbeat_age_s: float, owner: str = "gone@host:1") -> None:
    with cluster.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state="running", attempts=attempts, owner=owner, heartbeat_at=utcnow() - timedelta(seconds=heartbeat_age_s)))


def test_an_expired_lease_is_replanned_and_the_zombie_keeps_nothing(round_db):
    from services.rounds import advance
    from workers.runner import JobContext, Superseded, claim

    cluster, round_id = round_db
    with cluster.session() as session:
        live, dead = session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate")
                                     .order_by(Job.id).limit(2)).all()
    _run(cluster, live, attempts=1, heartbeat_age_s=1)
    _run(cluster, dead, attempts=1, heartbeat_age_s=60)
    with cluster.session() as session:
        assert advance(session, round_id, load_settings().delivery) == [dead]  # only the job whose worker went quiet
    with cluster.session() as session:
        job = session.get(Job, dead)
        assert job.state == "queued" and "attempt 1 lost: its worker gone@host:1 stopped heart-beating" in job.error
        assert session.get(Job, live).state == "running"
        assert claim(session, live, timedelta(seconds=5)) is None  # a second delivery of a live job
        assert claim(session, dead, timedelta(seconds=5)).attempts == 2  # the re-sent one is claimed

    zombie = JobContext(cluster_settings(cluster), dead, round_id, attempt=1, payload={})
    with pytest.raises(Superseded):  # the first attempt wakes up: its writes are refused
        with cluster.session() as session:
            zombie.finish(session, {"generated": 99})
    with cluster.session() as session:
        assert session.get(Job, dead).state == "running" and session.get(Job, dead).result is None


def test_a_job_that_keeps_losing_its_worker_fails_the_round_with_the_reason(round_db):
    from services.rounds import advance, resume_round

    cluster, round_id = round_db
    with cluster.session() as session:
        job_id = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate").limit(1))
    _run(cluster, job_id, attempts=2, heartbeat_age_s=60, owner="oom@host:7")  # the cap is 2
    with cluster.session() as session:
        assert advance(session, round_id, load_settings().delivery) == []
    with cluster.session() as session:
        job, round_ = session.get(Job, job_id), session.get(Round, round_id)
        assert job.state == "failed" and "gave up after 2 attempts" in job.error and "oom@host:7" in job.error
        assert round_.state == "failed" and f"job {job_id}" in round_.error and "out of memory" in round_.error
        assert resume_round(session, round_id, load_settings().delivery) == []  # a finished round: resume is a no-op


def test_cancel_leaves_nothing_to_claim(round_db):
    from services.rounds import advance, cancel_round
    from workers.runner import claim

    cluster, round_id = round_db
    with cluster.session() as session:
        running, queued = session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate")
                                          .order_by(Job.id).limit(2)).all()
    _run(cluster, running, attempts=1, heartbeat_age_s=0)
    with cluster.session() as session:
        cancelled = cancel_round(session, round_id, load_settings().delivery)
    assert running in cancelled.running and queued in cancelled.queued
    with cluster.session() as session:
        assert session.get(Round, round_id).state == "cancelled"
        assert {j.state for j in session.scalars(select(Job).where(Job.round_id == round_id))} == {"cancelled"}
        assert claim(session, queued, timedelta(seconds=5)) is None
        assert advance(session, round_id, load_settings().delivery) == []
    with pytest.raises(Exception, match="already cancelled"):
        with cluster.session() as session:
            cancel_round(session, round_id, load_settings().delivery)


def test_page_progress_leaves_the_job_row_unlocked_and_is_fenced(round_db):
    """`page_done`, the progress of a long job transaction (the vote's, the pairs'): while that
    transaction is still open, the job's heartbeat from another connection gets through and the
    progress is already seen; a stale attempt's raises Superseded and records nothing."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from workers.runner import JobContext, Superseded

    cluster, round_id = round_db
    with cluster.session() as session:
        job_id = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate").limit(1))
    _run(cluster, job_id, attempts=1, heartbeat_age_s=0)
    ctx = JobContext(cluster_settings(cluster), job_id, round_id, attempt=1, payload={})
    with ctx.session() as long_transaction:
        long_transaction.execute(select(Job.id).where(Job.id == job_id))  # the transaction is open
        ctx.page_done(long_transaction, 0.5)
        with cluster.session() as other:
            other.execute(text("SET LOCAL lock_timeout = '5s'"))
            try:
                other.execute(update(Job).where(Job.id == job_id, Job.attempts == 1).values(heartbeat_at=utcnow()))
            except OperationalError as exc:
                pytest.fail(f"the heartbeat's UPDATE of job {job_id} waited over 5 s for its row lock while the "
                            f"job's transaction was open after page_done: {exc}")
            assert other.scalar(select(Job.progress).where(Job.id == job_id)) == 0.5
    _run(cluster, job_id, attempts=2, heartbeat_age_s=0, owner="live@host:2")  # another worker took the job over
    with pytest.raises(Superseded):
        with ctx.session() as long_transaction:
            ctx.page_done(long_transaction, 0.75)
    with cluster.session() as session:
        assert session.scalar(select(Job.progress).where(Job.id == job_id)) == 0.5, "a stale attempt recorded progress"


def cluster_settings(cluster):
    from services.settings import load_settings

    return load_settings({"W2S_DATABASE_URL": cluster.database_url, "W2S_HOME": str(cluster.tmp_path / "home")})


def test_message_settings_follow_celerys_guidance_for_redis():
    from workers.app import app, settings
    from workers.tasks import TASKS

    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == conf.result_backend_transport_options["visibility_timeout"]
    for kind, task in TASKS.items():
        assert task.soft_time_limit == settings.delivery.time_limit(kind) < task.time_limit
        # Short jobs: the message outlives the job. Training: acknowledged at start, held by its lease.
        assert task.acks_late == (kind != "train") and (not task.acks_late or visibility > task.time_limit)


def _busy(seconds: float) -> None:
    """A handler computing, looking at the current stop signal at safe points as generation and
    the training launch do: raises Stopped there once the signal is set."""
    import time

    from models.stopping import current_signal

    signal, deadline = current_signal(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        signal.wait(0.02)
        signal.check()


def test_a_job_cut_off_from_the_database_stops_itself_after_its_lease(tmp_path):
    from models.stopping import Stopped, stopping
    from services.settings import load_settings
    from workers.runner import Heartbeat, JobContext

    nowhere = load_settings({"W2S_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:9/none?connect_timeout=1",
                             "W2S_HOME": str(tmp_path)})
    ctx = JobContext(nowhere, job_id=1, round_id=1, attempt=1, payload={})
    with pytest.raises(Stopped, match="no heartbeat got through"):
        with Heartbeat(ctx, interval=0.1, lease=0.6), stopping(ctx.stop):
            _busy(10)
    assert ctx.stop.is_set()


def test_a_cancelled_job_is_stopped_by_its_heartbeat(round_db):
    from models.stopping import Stopped, stopping
    from services.rounds import cancel_round
    from workers.runner import Heartbeat, JobContext

    cluster, round_id = round_db
    with cluster.session() as session:
        job_id = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate").limit(1))
    _run(cluster, job_id, attempts=1, heartbeat_age_s=0)
    ctx = JobContext(cluster_settings(cluster), job_id, round_id, attempt=1, payload={})
    with pytest.raises(Stopped, match="no longer owns the job"):
        with Heartbeat(ctx, interval=0.1, lease=30), stopping(ctx.stop):
            with cluster.session() as session:
                cancel_round(session, round_id, load_settings().delivery)
            _busy(10)


def test_cancelling_a_pipeline_round_stops_the_pipeline(postgres_url, tmp_path):
    from db.schema import Pipeline
    from services.pipeline import PipelineConfig
    from services.rounds import cancel_round, start_pipeline

    url, name = fresh_database(POSTGRES_ADMIN_URL)
    cluster = Cluster(tmp_path, url, "redis://unused")
    cluster.setup(pool=4, test=2)
    try:
        config = PipelineConfig.model_validate({"weak": "weak", "strong": "strong", "pool": "pool",
                                                "eval": {"dataset": "test"}, "iteration1": {"demonstrations": 0}})
        with cluster.session() as session:
            pipeline, _ = start_pipeline(session, config, load_settings().delivery)
            pipeline_id = pipeline.id
            round_id = session.scalar(select(Round.id).where(Round.pipeline_id == pipeline_id))
        with cluster.session() as session:
            cancel_round(session, round_id, load_settings().delivery)
        with cluster.session() as session:
            pipeline = session.get(Pipeline, pipeline_id)
            assert pipeline.state == "stopped" and pipeline.reason == "iteration1 round cancelled"
            assert session.scalar(select(func.count()).select_from(Round).where(Round.pipeline_id == pipeline_id)) == 1
    finally:
        drop_database(POSTGRES_ADMIN_URL, name)
