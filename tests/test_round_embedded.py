"""A whole stage I round on the tiny demo models, embedded: SQLite and in-process tasks."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, update

from db.schema import Generation, Job
from db.session import session_scope
from services.config import load_settings
from tests.roundcheck import check_stage1_round

pytestmark = pytest.mark.slow

POOL_LIMIT = 120
TINY_ROUND = ["--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool", "--eval", "test",
              "--pool-limit", POOL_LIMIT, "--eval-limit", 60, "--demonstrations", 2, "--variants", "hybrid",
              "--set", "generation.max_new_tokens=48", "--set", "generation.batch_size=32",
              "--set", "generation.chunk_size=50", "--set", "training.epochs=1", "--set", "training.micro_batch_size=16",
              "--set", "training.learning_rate=1e-4", "--set", "training.max_seq_len=128"]


@pytest.fixture
def embedded_round(w2s_home, cli_runner, demo_assets):
    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    result = cli_runner("round", "start", *TINY_ROUND)
    return result


def test_stage1_round_embedded(embedded_round, cli_runner):
    assert "round 1 started" in embedded_round.output
    url = load_settings().database_url
    report = check_stage1_round(url, 1, pool_size=POOL_LIMIT, variants=["hybrid"])

    # The strong voter answered with the weak voter's own outputs as demonstrations.
    with session_scope(url) as session:
        strategies = set(session.scalars(select(Generation.strategy).where(Generation.voter == "strong")))
        assert strategies == {"few-shot"}
        from db.schema import Round

        assert len(session.get(Round, 1).resolved["demonstration_ids"]) == 2

    status = json.loads(cli_runner("round", "status", "1", "--json").output)
    assert status["state"] == "done"
    assert status["report"]["kept"] == report["kept"]
    assert status["jobs"]["generate:weak"] == {"done": 3}
    assert "pseudo-label accuracy" in cli_runner("round", "status", "1").output
    jobs = json.loads(cli_runner("jobs", "--round", "1", "--json").output)
    assert {j["key"] for j in jobs} >= {"vote", "train:hybrid", "promote", "evaluate:baseline"}


def test_rerunning_a_job_writes_nothing_twice(embedded_round):
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
