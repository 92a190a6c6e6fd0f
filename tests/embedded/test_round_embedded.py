"""A whole stage I round on the tiny demo models, embedded: SQLite and in-process tasks."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, func, select, update

from db.schema import Generation, Job
from db.session import session_scope
from services.settings import load_settings
from tests.support import check_stage1_round, invoke_cli

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
        _embedded_env(patch, home)
        dispatch._local_queue.clear()
        cli_runner = invoke_cli
        cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
        cli_runner("dataset", "import", demo_assets.test, "--name", "test")
        cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
        cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
        result = cli_runner("round", "start", *TINY_ROUND)
        yield result, home


def _embedded_env(patch: pytest.MonkeyPatch, home) -> None:
    """The shared rounds' home, embedded; their runs are logged to MLflow's embedded store there
    (test_rounds_are_tracked_in_mlflow reads them back)."""
    patch.setenv("W2S_HOME", str(home))
    patch.setenv("W2S_TRACKING_BACKEND", "mlflow")
    for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR", "W2S_TRACKING_URI"):
        patch.delenv(var, raising=False)


@pytest.fixture
def in_round_home(embedded_round, monkeypatch):
    """Point this test's environment at the shared round's home."""
    _embedded_env(monkeypatch, embedded_round[1])
    return embedded_round[0]


@pytest.fixture(scope="module")
def preference_round(embedded_round) -> int:
    """A DPO round from round 1's candidate, shared by the tests that look at it. Returns its id."""
    from db.schema import Round

    with pytest.MonkeyPatch.context() as patch:
        _embedded_env(patch, embedded_round[1])
        url = load_settings().database_url
        with session_scope(url) as session:
            student = _a_student_from_round_1(session)
            before = session.scalar(select(func.count()).select_from(Round))
        invoke_cli("round", "start", "--stage", "preference", "--student", student, "--weak", "weak", "--pool", "pool",
                   "--pool-limit", 40, "--eval", "test", "--eval-limit", 30, "--samples", 4, "--loss", "dpo",
                   "--set", "sampling.temperature=0.7", "--set", "pairs.floor=0.5", "--set", "pairs.tau=0.75",
                   "--set", "generation.max_new_tokens=48", "--set", "training.learning_rate=1e-4",
                   "--set", "training.max_seq_len=128")
    return before + 1


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


def test_status_commands_read_no_pool_question_ids(in_round_home, cli_runner):
    """`round status` (both forms), `jobs --round`, `queues` and `round report` read the round's
    row, which holds the pool's size, never its question ids (rows of `round_questions`, read
    by no status query): at a million questions the list was most of `round status`'s time."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from db.schema import Round
    from services.round_questions import round_question_ids

    with session_scope(load_settings().database_url) as session:
        round_ = session.get(Round, 1)
        assert "question_ids" not in round_.resolved and round_.resolved["question_count"] == POOL_LIMIT
        assert len(round_question_ids(session, 1)) == POOL_LIMIT

    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        for command in (["round", "status", "1"], ["round", "status", "1", "--json"], ["jobs", "--round", "1"],
                        ["queues"], ["round", "report", "1"]):
            before = len(statements)
            cli_runner(*command)
            assert len(statements) > before, f"{command}: no SQL seen (the listener is not on the CLI's engine)"
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert not [s for s in statements if "round_questions" in s]


def test_status_of_a_big_running_round_grades_no_generation(in_round_home, cli_runner, monkeypatch):
    """Above LIVE_REPORT_MAX_QUESTIONS a running round's `round status` and `round report` read no
    generation (grading each cost 0.7 s at 20,000 questions, 3-4 s at 70,000) and show the vote's
    counts from its job's result instead."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    import services.monitor
    from db.schema import Round

    monkeypatch.setattr(services.monitor, "LIVE_REPORT_MAX_QUESTIONS", POOL_LIMIT - 1)
    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = session.get(Round, 1)
        saved = round_.state, round_.report
        vote = session.scalar(select(Job.result).where(Job.round_id == 1, Job.kind == "vote", Job.state == "done"))
        round_.state, round_.report = "running", None  # as while training runs, before the report is stored
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        status = json.loads(cli_runner("round", "status", "1", "--json").output)
        text = cli_runner("round", "status", "1").output
        report = json.loads(cli_runner("round", "report", "1", "--json").output)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
        with session_scope(url) as session:
            round_ = session.get(Round, 1)
            round_.state, round_.report = saved
    assert statements, "no SQL seen (the listener is not on the CLI's engine)"
    assert not [s for s in statements if "generations" in s]
    assert "when the round ends" in status["report"]["deferred"]
    assert status["report"]["vote"]["kept"] == vote["kept"] and status["report"]["vote"]["pool"] == POOL_LIMIT
    assert status["report"]["kept_share"] == vote["kept"] / POOL_LIMIT
    assert f"{vote['kept']} (" in text, "the text view shows the vote's kept count"
    assert report["rounds"][0]["kept_share"] == vote["kept"] / POOL_LIMIT


def test_rerunning_a_job_writes_nothing_twice(in_round_home):
    """A redelivered generation job (state reset, as after a lost ack) writes no second row."""
    from workers.runner import run_job
    from workers.steps import HANDLERS

    url = load_settings().database_url
    with session_scope(url) as session:
        before = session.scalar(select(func.count()).select_from(Generation))
        job_id = session.scalar(select(Job.id).where(Job.key == "generate:weak:0000"))
        # A done job is not claimed again.
    assert run_job(job_id, HANDLERS["generate"], settings=load_settings(), enqueue=lambda ids, **kw: None) == "round-over"
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(state="queued", attempts=0))
        from db.schema import Round

        session.execute(update(Round).where(Round.id == 1).values(state="running"))
    assert run_job(job_id, HANDLERS["generate"], settings=load_settings(), enqueue=lambda ids, **kw: None) == "done"
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == before
        assert session.get(Job, job_id).result["generated"] == 0


def test_iteration_2_round_votes_with_the_fine_tuned_students(in_round_home, cli_runner):
    """Iteration 2: the students of iteration 1 vote zero-shot; the student restarts from the base.
    Its tracking server cannot be reached: the round goes on, the job logs say so, the counter counts."""
    from prometheus_client import REGISTRY

    import workers.telemetry  # noqa: F401  (the worker's counter of tracking failures)
    from db.schema import Checkpoint, Round
    from tests.embedded.test_tracking import closed_port

    def tracking_failures() -> float:
        return REGISTRY.get_sample_value("w2s_worker_tracking_failures_total", {"backend": "mlflow"}) or 0.0

    url = load_settings().database_url
    with session_scope(url) as session:
        candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == 1))
        candidate_name = candidate.name
    failures_before = tracking_failures()
    unreachable = f"http://127.0.0.1:{closed_port()}"
    cli_runner("round", "start", "--stage", "sft", "--iteration", 2, "--weak", candidate_name, "--strong", "strong",
               "--student", "strong", "--pool", "pool", "--eval", "test", "--pool-limit", 40, "--eval-limit", 60,
               "--demonstrations", 0, "--variants", "hybrid", "--set", "generation.max_new_tokens=48",
               "--set", "training.epochs=1", "--set", "training.max_seq_len=128",
               "--set", "tracking.backend=mlflow", "--set", f"tracking.uri={unreachable}")
    with session_scope(url) as session:
        round_ = session.get(Round, 2)
        assert round_.state == "done", round_.error
        train = session.scalar(select(Job).where(Job.round_id == 2, Job.key == "train:hybrid"))
        assert train.state == "done", train.error
        training_log = open(train.log_path).read()
        assert f"tracking (mlflow at {unreachable}) failed to open run 'train:hybrid" in training_log, training_log[-3000:]
        # The worker's side: opening the round's run for the training job, and again at the round's end.
        assert tracking_failures() >= failures_before + 2
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


def test_few_shot_demonstrations_come_from_the_weak_voters_outputs(w2s_home, cli_runner, demo_assets):
    from db.schema import Round

    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    cli_runner("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
               "--eval", "test", "--pool-limit", 24, "--eval-limit", 8, "--demonstrations", 3, "--variants", "weak",
               "--set", "generation.max_new_tokens=48", "--set", "training.epochs=1", "--set", "training.max_seq_len=128",
               # A vote threshold above any step score keeps nothing: the demonstrations are chosen and
               # used before the vote, so the round ends after its gate without a training launch.
               "--set", "vote.min_step_score=2.5")
    with session_scope(load_settings().database_url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        train = session.scalar(select(Job).where(Job.round_id == 1, Job.kind == "train"))
        assert train.result["skipped"] == "no training examples: the vote kept no question", train.result
        demos = session.scalars(select(Generation).where(Generation.id.in_(round_.resolved["demonstration_ids"]))).all()
        assert len(demos) == 3
        assert all(d.voter == "weak" and d.round_id == 1 and d.answer for d in demos)
        strategies = {g.voter: g.strategy for g in session.scalars(select(Generation).where(Generation.round_id == 1))}
        assert strategies == {"weak": "zero-shot", "strong": "few-shot"}


def _a_student_from_round_1(session) -> str:
    """Stage II starts from a promoted or candidate stage I checkpoint. The tiny models' stage I
    candidate may well be rejected by the gate; the mechanics of stage II do not depend on that,
    so the test marks it promoted, as an operator overriding the gate would."""
    from db.schema import Checkpoint

    candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == 1))
    candidate.status = "promoted"
    return candidate.name


def test_preference_round_bad_input(in_round_home, cli_runner):
    from tests.embedded.test_bad_input import fails_with

    base = ["round", "start", "--stage", "preference", "--weak", "weak", "--pool", "pool", "--eval", "test"]
    fails_with(cli_runner, [*base, "--student", "strong"], "student 'strong' is a base checkpoint")
    with session_scope(load_settings().database_url) as session:
        student = _a_student_from_round_1(session)
    fails_with(cli_runner, [*base, "--student", student, "--samples", 1], "sampling.samples")
    fails_with(cli_runner, [*base, "--student", student, "--set", "pairs.tau=0.5"], "tau (0.5) must not be below floor")
    fails_with(cli_runner, [*base, "--student", student, "--set", "pairs.floor=1.5"], "pairs.floor")
    fails_with(cli_runner, ["round", "start", "--stage", "preference", "--weak", "strong", "--pool", "pool", "--eval", "test",
                            "--student", student], "has no stage I outputs of weak model 'strong'")


def test_preference_round_embedded(in_round_home, preference_round, cli_runner, tmp_path):
    from db.schema import Checkpoint, Evaluation, PreferencePair, Round
    from services.selection import decide_pairs

    url = load_settings().database_url
    round_id = preference_round
    with session_scope(url) as session:
        round_ = session.get(Round, round_id)
        assert round_.state == "done", round_.error
        samples = session.scalars(select(Generation).where(Generation.round_id == round_id)).all()
        assert len(samples) == 40 * 4 and {g.sample_index for g in samples} == {0, 1, 2, 3}
        weak = {g.question_id: g for g in session.scalars(select(Generation).where(
            Generation.round_id == round_.resolved["weak_round_id"], Generation.voter == "weak"))}
        pairs = session.scalars(select(PreferencePair).where(PreferencePair.round_id == round_id)).all()
        # Recompute with the pure rule: the same questions give pairs, with the same cases.
        by_question: dict[int, list] = {}
        for g in sorted(samples, key=lambda g: g.sample_index):
            by_question.setdefault(g.question_id, []).append((g.answer, g.text))
        expected = {}
        import random

        for qid, got in by_question.items():
            decision = decide_pairs(weak[qid].answer, weak[qid].text, got, floor=0.5, tau=0.75,
                                    rng=random.Random(f"0:{qid}"))
            for pair in decision.pairs:
                expected[qid] = pair.case
        assert {p.question_id: p.case for p in pairs} == expected
        for p in pairs:  # the weak side is the weak model's original stage I response
            weak_side = p.chosen if p.case == "weak_chosen" else p.rejected
            assert weak_side == weak[p.question_id].text
        report = round_.report
        assert report["pairs"] == len(pairs) == report["variants"]["dpo"]["examples"]
        # pass@4 of the starting student (and of the candidate, when one was trained) on the eval set
        assert report["pass_at_k"]["k"] == 4 and 0 <= report["pass_at_k"]["student"] <= 1
        assert ("dpo" in report["pass_at_k"]) == bool(pairs)
        passk = session.scalar(select(Evaluation).where(Evaluation.strategy == "pass@4/0-shot/48-new/t0.7/p1",
                                                        Evaluation.checkpoint_id == round_.resolved["student_id"]))
        greedy = session.scalar(select(Evaluation).where(Evaluation.strategy == "cot/0-shot/48-new",
                                                         Evaluation.checkpoint_id == round_.resolved["student_id"]))
        assert passk.n_questions == 30 and passk.accuracy == report["pass_at_k"]["student"]
        # four samples per question, not one
        assert passk.output_tokens / passk.n_questions > 2 * greedy.output_tokens / greedy.n_questions
        assert sum(report["skipped"].values()) + len({p.question_id for p in pairs}) == 40
        candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == round_id))
        if pairs:
            assert candidate is not None and candidate.variant == "dpo" and candidate.parent_id == round_.resolved["student_id"]
    status = cli_runner("round", "status", round_id).output
    assert "accuracy of chosen / rejected" in status or not pairs
    if pairs:
        for fmt in ("trl", "llama-factory"):
            out = tmp_path / f"pairs-{fmt}.jsonl"
            cli_runner("export", "--round", round_id, "--format", fmt, "--out", out)
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(rows) == len(pairs) and all(r["w2s"]["round"] == round_id for r in rows)
            assert set(rows[0]) == ({"prompt", "chosen", "rejected", "w2s"} if fmt == "trl" else {"instruction", "input", "output", "w2s"})

    # A re-run generation job reproduces the same samples: delete one job's samples, run it again.
    from workers.runner import run_job
    from workers.steps import HANDLERS

    with session_scope(url) as session:
        job = session.scalar(select(Job).where(Job.round_id == round_id, Job.key == "generate:student:0000"))
        original = {(g.question_id, g.sample_index): g.text for g in session.scalars(
            select(Generation).where(Generation.job_id == job.id))}
        assert len(original) == 40 * 4
        session.execute(delete(PreferencePair).where(PreferencePair.round_id == round_id))
        session.execute(delete(Generation).where(Generation.job_id == job.id))
        session.execute(update(Job).where(Job.id == job.id).values(state="queued", attempts=0))
        session.execute(update(Round).where(Round.id == round_id).values(state="running"))
        job_id = job.id
    assert run_job(job_id, HANDLERS["generate"], settings=load_settings(), enqueue=lambda ids, **kw: None) == "done"
    with session_scope(url) as session:
        again = {(g.question_id, g.sample_index): g.text for g in session.scalars(
            select(Generation).where(Generation.round_id == round_id, Generation.question_id.in_(
                {q for q, _ in original})))}
        assert again == original


def test_rounds_are_tracked_in_mlflow(in_round_home, preference_round):
    """The stage I round and the DPO round, read back with MLflow's own client: each round's run
    has its config, figures, decision and lineage; its training job's run is nested under it with
    the loss, learning rate, gradient norm, tokens/s (and DPO's rewards) of every logged step."""
    from mlflow.tracking import MlflowClient

    from db.schema import Checkpoint, Round, TrackingRun

    settings = load_settings()
    client = MlflowClient(f"sqlite:///{settings.home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("w2s")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], max_results=1000)}
    with session_scope(settings.database_url) as session:
        round_runs = {t.owner_id: t.run_id for t in session.scalars(select(TrackingRun).where(TrackingRun.owner == "round"))}
        assert set(round_runs) >= {1, preference_round}
        for round_id, variant in ((1, "hybrid"), (preference_round, "dpo")):
            round_ = session.get(Round, round_id)
            report = round_.report
            run = runs[round_runs[round_id]]
            params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
            assert run.info.status == "FINISHED"
            assert params["stage"] == round_.stage
            assert params["training.learning_rate"] == str(round_.config["training"]["learning_rate"])
            assert params["seed"] == "0" and params["eval.dataset"] == "test"
            student = session.get(Checkpoint, round_.resolved["student_id"])
            candidate = session.scalar(select(Checkpoint).where(Checkpoint.round_id == round_id))
            assert candidate is not None, f"round {round_id} trained no candidate: {report}"
            assert tags["w2s.round_id"] == str(round_id) and tags["w2s.student"] == student.name
            assert tags["w2s.decision"] == round_.outcome == report["outcome"]
            assert tags[f"w2s.candidate.{variant}"] == candidate.name
            assert metrics["promoted"] == (1.0 if round_.outcome == "promoted" else 0.0)
            assert metrics[f"candidate.{variant}.accuracy"] == pytest.approx(report["variants"][variant]["accuracy"])
            assert metrics["student_before.accuracy"] == pytest.approx(report["student_before"]["accuracy"])
            if variant == "hybrid":
                assert metrics["kept_share"] == pytest.approx(report["kept_share"])
                assert metrics["kept"] == report["kept"] > 0
                assert metrics["pseudo_label_accuracy"] == pytest.approx(report["kept_accuracy"])
            else:
                assert metrics["pairs"] == report["pairs"] > 0
                for case, count in report["pairs_by_case"].items():
                    assert metrics[f"pairs.{case}"] == count

            children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
            assert len(children) == 1, f"round {round_id}: {len(children)} training runs nested under its run"
            job = children[0]
            assert job.info.status == "FINISHED"
            assert job.data.tags["w2s.checkpoint"] == candidate.name
            assert job.data.tags["w2s.parent_checkpoint"] == student.name
            assert job.data.params["learning_rate"] == str(round_.config["training"]["learning_rate"])
            train = candidate.metrics["train"]
            keys = ["loss", "lr", "grad_norm", "tokens_per_s"] + (["reward_margin", "reward_accuracy"]
                                                                  if variant == "dpo" else [])
            for key in keys:
                history = client.get_metric_history(job.info.run_id, key)
                assert history and history[-1].step == train["steps"], f"{key}: {history}"
            losses = client.get_metric_history(job.info.run_id, "loss")
            assert losses[-1].value == pytest.approx(train["final_loss"])
            assert all(m.value > 0 for m in client.get_metric_history(job.info.run_id, "grad_norm"))
            assert job.data.metrics["final/tokens"] == train["tokens"]
