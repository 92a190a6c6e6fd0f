"""A stage I round whose voters answer with LECO and self-consistency, embedded: every generation
stores its step scores, and the vote's step-score threshold drops agreed questions and says so."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from db.schema import Generation, Job, Round
from db.session import session_scope
from models.answers import answers_match
from services.round_questions import round_question_ids
from services.selection import Vote, agreed, min_step_score
from services.settings import load_settings

POOL_LIMIT = 32
SAMPLES = 3


def test_round_with_leco_and_sc_voters_and_a_step_score_threshold(w2s_home, cli_runner, demo_assets):
    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    # Both voters are the strong model, its samples nearly greedy: the tiny models' answers agree on so
    # few questions that which ones agree (if any) turned on the machine's float rounding, and the test
    # needs agreed questions for the threshold to drop.
    cli_runner("model", "register", "weak", "--path", demo_assets.strong_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    # A threshold above any possible score (avg + trans - diver <= 2) drops every agreed question,
    # so nothing trains and the round ends after the gate.
    cli_runner("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
               "--eval", "test", "--pool-limit", POOL_LIMIT, "--eval-limit", 4, "--demonstrations", 0,
               "--variants", "hybrid", "--set", "generation.max_new_tokens=32", "--set", "generation.batch_size=16",
               "--set", "strategies.weak.strategy=leco", "--set", "strategies.strong.strategy=sc",
               "--set", f"strategies.strong.samples={SAMPLES}",
               "--set", "strategies.strong.temperature=0.05", "--set", "vote.min_step_score=2.5")

    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        rows = session.scalars(select(Generation).where(Generation.round_id == 1)).all()
        weak = {g.question_id: g for g in rows if g.voter == "weak"}
        strong: dict[int, list[Generation]] = {}
        for g in sorted((g for g in rows if g.voter == "strong"), key=lambda g: g.sample_index):
            strong.setdefault(g.question_id, []).append(g)
        assert len(weak) == len(strong) == POOL_LIMIT
        assert {g.strategy for g in weak.values()} == {"zero-shot/leco"}
        assert {g.strategy for samples in strong.values() for g in samples} == {f"zero-shot/sc@{SAMPLES}"}
        for g in rows:  # every generation carries its step scores
            if g.text.strip():
                assert g.step_scores and all(
                    s["score"] == pytest.approx(s["avg"] + s["trans"] - s["diver"]) for s in g.step_scores)
        for samples in strong.values():  # sample 0 holds a majority answer of the n samples
            assert [g.sample_index for g in samples] == list(range(SAMPLES))
            answers = [g.answer for g in samples]
            if samples[0].answer:
                count = sum(answers_match(samples[0].answer, a, "gsm8k") for a in answers if a)
                assert all(count >= sum(answers_match(b, a, "gsm8k") for a in answers if a) for b in answers if b)

        votes = [Vote(q, weak[q].answer, strong[q][0].answer, min_step_score(weak[q].step_scores),
                      min_step_score(strong[q][0].step_scores)) for q in round_question_ids(session, round_.id)]
        agreed_ids = [v.question_id for v in votes if agreed(v, "gsm8k")]
        assert agreed_ids, "the tiny voters agreed on nothing: the threshold was not exercised"
        vote = session.scalar(select(Job).where(Job.round_id == 1, Job.key == "vote"))
        assert vote.result["kept"] == 0
        assert vote.result["dropped_by_step_score"] == len(agreed_ids)
        assert round_.report["dropped_by_step_score"] == len(agreed_ids) and round_.report["kept"] == 0

    status = cli_runner("round", "status", 1)
    assert "dropped by step score" in status.output and str(len(agreed_ids)) in status.output

    # An evaluation job can run a strategy (payload "strategy"): stored under its label, for its round.
    from db.schema import Evaluation
    from services.config import StrategyConfig
    from workers.runner import JobContext
    from workers.steps import run_evaluate

    with session_scope(url) as session:
        round_ = session.get(Round, 1)
        payload = {"checkpoint_id": round_.resolved["strong_id"], "dataset_id": round_.resolved["eval_id"], "limit": 3,
                   "strategy": StrategyConfig(strategy="leco", max_rethinks=1).model_dump(), "shots": 0}
        job = Job(round_id=1, key="evaluate:leco", step="evaluate", kind="evaluate", queue="strong", state="running",
                  attempts=1, payload=payload)
        session.add(job)
        session.flush()
        job_id = job.id
    run_evaluate(JobContext(load_settings(), job_id, 1, 1, payload))
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        evaluation = session.get(Evaluation, job.result["evaluation_id"])
        assert job.state == "done" and evaluation.strategy == "leco/0-shot/32-new/top5/1-rethinks/divert" and evaluation.n_questions == 3
        assert evaluation.round_id == 1 and job.result["input_tokens"] == evaluation.input_tokens > 0
