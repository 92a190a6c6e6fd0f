"""Prompts that fit (issue 17): a stage I round whose four weak demonstrations overflow the strong
model's 256-position context finishes; questions get fewer demonstrations where they need it,
questions that cannot fit at all are skipped with the reason, and the report counts both. And
`round start --wait` exits non-zero when the round it waited for failed."""

from __future__ import annotations

import json
import shutil

from sqlalchemy import select

from db.schema import Generation, Job, Round
from db.session import session_scope
from models.prompts import few_shot
from services.round_questions import round_question_ids
from services.settings import load_settings

POOL = 16
MAX_NEW_TOKENS = 64
LONG_QUESTIONS = 2


def _pool_with_long_questions(demo_assets, tmp_path):
    """The demo pool's first questions, then questions too long for any prompt to leave 64 tokens free."""
    lines = demo_assets.pool.read_text().splitlines()[:POOL]
    filler = " ".join(["Sam has 3 beads and gives 1 away."] * 30)
    for i in range(LONG_QUESTIONS):
        lines.append(json.dumps({"question": f"{filler} How many beads does Sam have now, case {i}?"}))
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_round_whose_demonstrations_overflow_the_context_finishes_and_counts_them(
        w2s_home, cli_runner, demo_assets, tmp_path):
    cli_runner("dataset", "import", _pool_with_long_questions(demo_assets, tmp_path), "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    # A step-score threshold above any score keeps nothing, so nothing trains: the round is about its prompts.
    started = cli_runner("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
                         "--eval", "test", "--eval-limit", 4, "--demonstrations", 4, "--variants", "weak",
                         "--set", f"generation.max_new_tokens={MAX_NEW_TOKENS}", "--set", "vote.min_step_score=2.5")
    # 5 x 64 tokens > 256: said up front, in one line
    assert "warning: 4 demonstrations of up to max_new_tokens 64" in started.output

    with session_scope(load_settings().database_url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        questions = round_question_ids(session, round_.id)
        long_ids = set(questions[POOL:])
        demo_ids = round_.resolved["demonstration_ids"]
        demos = session.scalars(select(Generation).where(Generation.id.in_(demo_ids)).order_by(Generation.id)).all()
        assert len(demos) == 4 and all(d.voter == "weak" and d.answer for d in demos)
        # The four weak demonstrations really overflow: with them no prompt leaves room for the answer.
        from models.backends import load_backend

        strong = load_backend(demo_assets.strong_model)
        from db.schema import Question

        texts = dict(session.execute(select(Question.id, Question.text).where(Question.id.in_(questions))).all())
        pairs = [(texts[d.question_id], d.text) for d in demos]
        full = strong.count_tokens([few_shot(texts[q], pairs) for q in questions[:POOL]])
        assert min(full) + MAX_NEW_TOKENS > strong.context_length == 256

        generated = session.scalars(select(Generation).where(Generation.round_id == 1)).all()
        answered = {(g.voter, g.question_id) for g in generated}
        # every short question answered by both voters, no long one by either
        assert answered == {(voter, q) for voter in ("weak", "strong") for q in questions[:POOL]}
        jobs = session.scalars(select(Job).where(Job.round_id == 1, Job.kind == "generate")).all()
        assert all(job.state == "done" and job.attempts == 1 for job in jobs)
        strong_jobs = [job for job in jobs if job.payload["voter"] == "strong"]
        fewer = {int(q): n for job in strong_jobs for q, n in job.result.get("fewer_demonstrations", {}).items()}
        assert set(fewer) == set(questions[:POOL]) and all(0 <= n < 4 for n in fewer.values())
        for job in jobs:  # each skipped question is recorded with why
            skipped = {int(q): why for q, why in job.result.get("skipped", {}).items()}
            assert set(skipped) == long_ids
            assert all(why.startswith("prompt too long: ") and "context of 256 tokens" in why for why in skipped.values())
        # every prompt encoded left room for max_new_tokens
        assert all(g.input_tokens + MAX_NEW_TOKENS <= 256 for g in generated)
        assert max(g.input_tokens for g in generated if g.voter == "strong") > \
            max(g.input_tokens for g in generated if g.voter == "weak")  # the strong voter's kept demonstrations
        report = round_.report
        assert report["fewer_demonstrations"] == POOL
        assert report["skipped_prompt_too_long"] == {"strong": LONG_QUESTIONS, "weak": LONG_QUESTIONS}

    text = " ".join(cli_runner("round", "report", 1).output.split())
    assert f"answered with fewer demonstrations: {POOL}" in text
    assert f"skipped (prompt too long): {2 * LONG_QUESTIONS}" in text


def test_round_start_wait_exits_non_zero_when_the_round_failed(w2s_home, cli_runner, demo_assets, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("W2S_MAX_ATTEMPTS", "1")
    broken = tmp_path / "broken"
    shutil.copytree(demo_assets.weak_model, broken)
    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "broken", "--path", broken, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()  # registered, then broken: its generate job fails
    result = cli_runner("round", "start", "--stage", "sft", "--weak", "broken", "--strong", "strong", "--pool", "pool",
                        "--pool-limit", 4, "--eval", "test", "--eval-limit", 2, "--demonstrations", 0,
                        "--set", "generation.max_new_tokens=16", "--wait", ok=False)
    assert result.exit_code == 1, result.output
    assert "round 1 failed: job" in " ".join(result.output.split()) and "broken" in result.output
    with session_scope(load_settings().database_url) as session:
        assert session.get(Round, 1).state == "failed"


def test_model_register_reports_and_overrides_generation_config_decoding(w2s_home, cli_runner, demo_assets, tmp_path):
    from db.schema import Checkpoint

    path = tmp_path / "penalised"
    shutil.copytree(demo_assets.strong_model, path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 1.2, "top_k": 20}))
    shipped = cli_runner("model", "register", "shipped", "--path", path, "--role", "strong")
    line = " ".join(shipped.output.split())
    assert "generation_config.json changes decoding: repetition_penalty=1.2 (applied to every generation" in line
    assert "top_k=20 (w2s's own sampling settings win)" in line
    neutral = cli_runner("model", "register", "neutral", "--path", path, "--role", "strong", "--decoding", "neutral")
    assert "overridden at registration: repetition_penalty=1.0" in " ".join(neutral.output.split())
    plain = cli_runner("model", "register", "plain", "--path", demo_assets.strong_model, "--role", "strong")
    assert "changes decoding" not in plain.output
    bad = cli_runner("model", "register", "bad", "--path", path, "--role", "strong", "--decoding", "top_k=5", ok=False)
    assert bad.exit_code == 2 and "w2s sets top_k itself" in bad.output
    with session_scope(load_settings().database_url) as session:
        decoding = dict(session.execute(select(Checkpoint.name, Checkpoint.decoding)).all())
    assert decoding == {"shipped": {}, "neutral": {"repetition_penalty": 1.0}, "plain": {}}
