"""A whole stage I round on the tiny demo models, embedded: SQLite and in-process tasks."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, update

from db.schema import Generation, Job
from db.session import session_scope
from services.config import load_settings
from tests.support import check_stage1_round, invoke_cli

pytestmark = pytest.mark.slow

POOL_LIMIT = 120
TINY_ROUND = ["--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool", "--eval", "test",
              "--pool-limit", POOL_LIMIT, "--eval-limit", 60, "--demonstrations", 0, "--variants", "hybrid",
              "--set", "generation.max_new_tokens=48", "--set", "generation.batch_size=32",
              "--set", "generation.chunk_size=50", "--set", "training.epochs=1", "--set", "training.micro_batch_size=16",
              "--set", "training.learning_rate=1e-4", "--set", "training.max_seq_len=128"]


@pytest.fixture(scope="module")
def embedded_round(tmp_path_factory, demo_assets):
    """One stage I round shared by the tests of this module (a round costs about a minute)."""
    from workers import dispatch

    home = tmp_path_factory.mktemp("embedded") / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("W2S_HOME", str(home))
        for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR"):
            patch.delenv(var, raising=False)
        dispatch._local_queue.clear()
        cli_runner = invoke_cli
        cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
        cli_runner("dataset", "import", demo_assets.test, "--name", "test")
        cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
        cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
        result = cli_runner("round", "start", *TINY_ROUND)
        yield result, home


@pytest.fixture
def in_round_home(embedded_round, monkeypatch):
    """Point this test's environment at the shared round's home."""
    _, home = embedded_round
    monkeypatch.setenv("W2S_HOME", str(home))
    for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    return embedded_round[0]


def test_stage1_round_embedded(in_round_home, cli_runner):
    assert "round 1 started" in in_round_home.output
    url = load_settings().database_url
    report = check_stage1_round(url, 1, pool_size=POOL_LIMIT, variants=["hybrid"])

    assert report["kept"] > 0, "the tiny models should agree on some questions, or nothing was trained"

    status = json.loads(cli_runner("round", "status", "1", "--json").output)
    assert status["state"] == "done"
    assert status["report"]["kept"] == report["kept"]
    assert status["jobs"]["generate:weak"] == {"done": 3}
    assert "pseudo-label accuracy" in cli_runner("round", "status", "1").output
    jobs = json.loads(cli_runner("jobs", "--round", "1", "--json").output)
    assert {j["key"] for j in jobs} >= {"vote", "train:hybrid", "promote", "evaluate:baseline"}


def test_rerunning_a_job_writes_nothing_twice(in_round_home):
    """A redelivered generation job (state reset, as after a lost ack) writes no second row."""
    from workers.runner import run_job
    from workers.steps import HANDLERS

    url = load_settings().database_url
    with session_scope(url) as session:
        before = session.scalar(select(func.count()).select_from(Generation))
        job_id = session.scalar(select(Job.id).where(Job.key == "generate:weak:0000"))
        # A done job is not claimed again.
    assert run_job(job_id, HANDLERS["generate"], enqueue=lambda ids, **kw: None) == "round-over"
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(state="queued", attempts=0))
        from db.schema import Round

        session.execute(update(Round).where(Round.id == 1).values(state="running"))
    assert run_job(job_id, HANDLERS["generate"], enqueue=lambda ids, **kw: None) == "done"
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == before
        assert session.get(Job, job_id).result["skipped_existing"] == 50


def test_iteration_2_round_votes_with_the_fine_tuned_students(in_round_home, cli_runner):
    """Iteration 2: the students of iteration 1 vote zero-shot; the student restarts from the base."""
    from db.schema import Checkpoint, Round

    url = load_settings().database_url
    with session_scope(url) as session:
        candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == 1))
        candidate_name = candidate.name
    cli_runner("round", "start", "--stage", "sft", "--iteration", 2, "--weak", candidate_name, "--strong", "strong",
               "--student", "strong", "--pool", "pool", "--eval", "test", "--pool-limit", 40, "--eval-limit", 60,
               "--demonstrations", 0, "--variants", "hybrid", "--set", "generation.max_new_tokens=48",
               "--set", "training.epochs=1", "--set", "training.max_seq_len=128")
    with session_scope(url) as session:
        round_ = session.get(Round, 2)
        assert round_.state == "done", round_.error
        assert round_.iteration == 2
        assert round_.resolved["weak_id"] == candidate.id
        # The gate compares with the newest promoted student of the lineage, not always the base.
        expected_baseline = candidate.id if candidate.status == "promoted" else round_.resolved["student_id"]
        assert round_.resolved["baseline_id"] == expected_baseline
        strategies = set(session.scalars(select(Generation.strategy).where(Generation.round_id == 2)))
        assert strategies == {"zero-shot"}
        for new in session.scalars(select(Checkpoint).where(Checkpoint.round_id == 2)):
            assert new.parent_id == round_.resolved["student_id"]
            assert new.lineage_root_id == round_.resolved["student_id"]


def test_weak_sft_round_trains_the_weak_model_on_gold(w2s_home, cli_runner, demo_assets):
    from db.schema import Checkpoint, Evaluation, Round, TrainingExample

    cli_runner("dataset", "import", demo_assets.weak_train, "--name", "weak-train")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("round", "start", "--stage", "weak-sft", "--weak", "weak", "--train", "weak-train", "--train-limit", 200,
               "--eval", "test", "--eval-limit", 60, "--set", "generation.max_new_tokens=48",
               "--set", "training.epochs=1", "--set", "training.max_seq_len=128", "--set", "training.learning_rate=1e-4")
    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        examples = session.scalars(select(TrainingExample).where(TrainingExample.round_id == 1)).all()
        assert len(examples) == 200 and all(e.variant == "gold" and e.generation_id is None for e in examples)
        candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == 1))
        assert candidate.role == "weak" and candidate.parent_id == round_.resolved["student_id"]
        accuracy = {e.checkpoint_id: e.accuracy for e in session.scalars(select(Evaluation))}
        expected = "promoted" if accuracy[candidate.id] > accuracy[candidate.parent_id] else "rejected"
        assert candidate.status == expected == round_.outcome


def test_few_shot_demonstrations_come_from_the_weak_voters_outputs(w2s_home, cli_runner, demo_assets):
    from db.schema import Round

    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    cli_runner("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
               "--eval", "test", "--pool-limit", 24, "--eval-limit", 8, "--demonstrations", 3, "--variants", "weak",
               "--set", "generation.max_new_tokens=48", "--set", "training.epochs=1", "--set", "training.max_seq_len=128")
    with session_scope(load_settings().database_url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        demos = session.scalars(select(Generation).where(Generation.id.in_(round_.resolved["demonstration_ids"]))).all()
        assert len(demos) == 3
        assert all(d.voter == "weak" and d.round_id == 1 and d.answer for d in demos)
        strategies = {g.voter: g.strategy for g in session.scalars(select(Generation).where(Generation.round_id == 1))}
        assert strategies == {"weak": "zero-shot", "strong": "few-shot"}
