"""Idempotence and fencing of the bulk write paths, on whichever database a test passes (PostgreSQL
in tests/cluster, SQLite in tests/embedded): the generation chunks, the paged vote, and
`insert_ignore` itself over more rows than one multi-row INSERT holds; a round's pool question
ids (`round_questions`): stored once, in order, the chunks covering them, and their migration.

A redelivered job (its state reset, as after a lost acknowledgement) writes nothing twice; a stale
attempt (another worker took the job over) writes nothing at all, though its rows went out in
batches before the fenced `done` mark refused it. While the vote's transaction is open, its job's
heartbeat still gets through (PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import delete, event, func, inspect, select, text, update

from db.schema import Generation, Job, Question, Round, TrainingExample
from db.session import insert_ignore, session_scope, upgrade
from services.settings import load_settings
from tests.cluster_support import write_questions, write_replay_models

POOL = 13  # chunks of 5 (the last short), vote pages of 4: every bulk path spans several batches


def make_round(url: str, tmp_path: Path, pool: int = POOL, generation: dict | None = None) -> int:
    """A stage I round of `pool` questions on replay voters that agree, planned and not run; names
    unique per call (the session's PostgreSQL database is shared by the tests). `generation`: the
    round's generation settings (default: chunks of 5, batches of 1)."""
    from services.config import parse_round_config
    from services.registry import import_dataset, register_model
    from services.rounds import start_round

    tag = uuid.uuid4().hex[:8]
    upgrade(url)
    pool_file, test_file = write_questions(tmp_path / "data", pool, 2)
    weak, strong = write_replay_models(tmp_path / "models", pool, 2, agree=True, delay_s=0)
    with session_scope(url) as session:
        import_dataset(session, pool_file, name=f"pool-{tag}", task="gsm8k", labelled=False)
        import_dataset(session, test_file, name=f"test-{tag}", task="gsm8k", labelled=True)
        register_model(session, name=f"weak-{tag}", path=weak, role="weak")
        register_model(session, name=f"strong-{tag}", path=strong, role="strong")
        config = parse_round_config({"stage": "sft", "weak": f"weak-{tag}", "strong": f"strong-{tag}",
                                     "pool": f"pool-{tag}", "eval": {"dataset": f"test-{tag}"}, "demonstrations": 0,
                                     "variants": ["hybrid"],
                                     "generation": generation or {"chunk_size": 5, "batch_size": 1}})
        round_, _ = start_round(session, config, load_settings({"W2S_DATABASE_URL": url}).delivery)
        return round_.id


def _settings(url: str, tmp_path: Path):
    return load_settings({"W2S_DATABASE_URL": url, "W2S_HOME": str(tmp_path / "home"),
                          "W2S_CHECKPOINT_DIR": str(tmp_path / "checkpoints")})


def _jobs(url: str, round_id: int, kind: str) -> list[int]:
    with session_scope(url) as session:
        return list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == kind).order_by(Job.id)))


def _count(url: str, model, round_id: int, **where) -> int:
    with session_scope(url) as session:
        query = select(func.count()).select_from(model).where(model.round_id == round_id)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        return session.scalar(query)


def _stale_attempt(url: str, settings, job_id: int, handler) -> None:
    """Claim the job, let another worker take it over (attempt 2), then run attempt 1's handler:
    it must raise Superseded, and its batches must be rolled back with the refused `done` mark."""
    from workers.runner import JobContext, Superseded, claim

    with session_scope(url) as session:
        job = claim(session, job_id, timedelta(seconds=60), owner="zombie@host:1")
        ctx = JobContext(settings, job.id, job.round_id, job.attempts, dict(job.payload or {}), kind=job.kind)
    with session_scope(url) as session:  # the lease ran out and a second worker claimed the job
        session.execute(update(Job).where(Job.id == job_id).values(attempts=Job.attempts + 1, owner="live@host:2"))
    with pytest.raises(Superseded):
        handler(ctx)
    with session_scope(url) as session:  # back to queued, as the live worker would leave it for the test
        session.execute(update(Job).where(Job.id == job_id).values(state="queued", attempts=0, owner=None))


def _redeliver(url: str, job_id: int) -> None:
    """The job's message again after its work committed: the broker lost the acknowledgement and
    an operator (or `jobs retry`) queued it again."""
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(state="queued", attempts=0))


def check_bulk_paths(url: str, tmp_path: Path, monkeypatch) -> None:
    import functools

    from services.voting import voted_pages
    from workers import steps
    from workers.runner import run_job

    # Pages of 4 (voted_pages binds its default page when defined: patching PAGE would not reach it).
    monkeypatch.setattr(steps, "voted_pages", functools.partial(voted_pages, page=4))
    settings = _settings(url, tmp_path)
    round_id = make_round(url, tmp_path)
    no_enqueue = lambda *a, **k: None  # noqa: E731 - the test runs every job itself

    # Generation: a stale chunk writes nothing; a redelivered one writes nothing twice.
    generate = _jobs(url, round_id, "generate")
    assert len(generate) == 6  # 13 questions in chunks of 5, two voters
    _stale_attempt(url, settings, generate[0], steps.run_generate)
    assert _count(url, Generation, round_id) == 0, "a stale generation attempt kept rows"
    for job_id in generate:
        assert run_job(job_id, steps.run_generate, settings=settings, enqueue=no_enqueue) == "done"
    assert _count(url, Generation, round_id) == 2 * POOL
    _redeliver(url, generate[0])
    assert run_job(generate[0], steps.run_generate, settings=settings, enqueue=no_enqueue) == "done"
    assert _count(url, Generation, round_id) == 2 * POOL, "a redelivered generation job wrote rows twice"
    with session_scope(url) as session:
        assert session.get(Job, generate[0]).result["generated"] == 0  # everything was in already
        # `round status` counts done chunks from their results, not the table: the same figures.
        from services.monitor import generated_so_far

        jobs = list(session.scalars(select(Job).where(Job.round_id == round_id)))
        tokens = dict(session.execute(select(Generation.voter, func.sum(Generation.output_tokens))
                                      .where(Generation.round_id == round_id).group_by(Generation.voter)).all())
        counted = generated_so_far(session, round_id, jobs)
    assert {voter: count for voter, (count, _) in counted.items()} == {"weak": POOL, "strong": POOL}
    assert counted["strong"][1] == tokens["strong"] > 0

    # The vote: pages of 4 questions, each page's examples in bulk, all with the done mark.
    vote = _jobs(url, round_id, "vote")
    assert len(vote) == 1, "generation done: the vote is planned"
    _stale_attempt(url, settings, vote[0], steps.run_vote)
    assert _count(url, TrainingExample, round_id) == 0, "a stale vote attempt kept training examples"
    assert run_job(vote[0], steps.run_vote, settings=settings, enqueue=no_enqueue) == "done"
    assert _count(url, TrainingExample, round_id) == 2 * POOL  # hybrid: both voters' answers of every question
    with session_scope(url) as session:
        first = session.get(Job, vote[0]).result
        examples = session.execute(select(TrainingExample.question_id, TrainingExample.generation_id)
                                   .where(TrainingExample.round_id == round_id).order_by(TrainingExample.id)).all()
        pool_order = list(session.scalars(select(Question.id).join(Generation, Generation.question_id == Question.id)
                                          .where(Generation.round_id == round_id, Generation.voter == "weak")
                                          .order_by(Question.index)))
    assert first["kept"] == POOL and first["voted"] == POOL and first["examples"] == {"hybrid": 2 * POOL}
    assert [q for q, _ in examples[::2]] == pool_order, "examples follow the pool's order across pages"
    _redeliver(url, vote[0])
    assert run_job(vote[0], steps.run_vote, settings=settings, enqueue=no_enqueue) == "done"
    with session_scope(url) as session:
        again = session.execute(select(TrainingExample.question_id, TrainingExample.generation_id)
                                .where(TrainingExample.round_id == round_id).order_by(TrainingExample.id)).all()
        assert session.get(Job, vote[0]).result == first
    assert again == examples, "a redelivered vote wrote training examples twice"


def check_insert_ignore_pages(url: str, tmp_path: Path) -> None:
    """More rows than one multi-row INSERT page (1,000): every new row's id comes back once, the
    rows already in come back as nothing, across pages. (Job rows: their unique key has no NULL.)"""
    round_id = make_round(url, tmp_path)
    planned = _count(url, Job, round_id)

    def rows(keys: range) -> list[dict]:
        return [{"round_id": round_id, "key": f"bulk:{k:05d}", "step": "bulk", "kind": "bulk", "queue": "control",
                 "state": "done", "payload": {"k": k}} for k in keys]

    with session_scope(url) as session:
        first = insert_ignore(session, Job, rows(range(0, 2600)))  # three pages
    assert len(first) == len(set(first)) == 2600
    with session_scope(url) as session:
        second = insert_ignore(session, Job, rows(range(1300, 3900)))  # half of them in already
    assert len(second) == 1300 and not set(second) & set(first)
    with session_scope(url) as session:
        payload = session.scalar(select(Job.payload).where(Job.round_id == round_id, Job.key == "bulk:02000"))
    assert payload == {"k": 2000}  # the first write stands
    assert _count(url, Job, round_id) == planned + 3900


# --- a round's pool questions (round_questions, migration 0010) ------------------------------------


def check_round_questions(url: str, tmp_path: Path) -> None:
    """The round's pool ids are stored once, in pool order; the generation chunks cover exactly
    them, in order; a second start or planning writes none again; a chunk planned late gets its ids."""
    from db.schema import Question, Round, RoundQuestion
    from services.contracts import ResolvedSFT, resolved_of
    from services.round_questions import round_question_ids, store_round_questions
    from services.rounds import advance

    round_id = make_round(url, tmp_path)
    delivery = load_settings({"W2S_DATABASE_URL": url}).delivery
    with session_scope(url) as session:
        round_ = session.get(Round, round_id)
        pool = list(session.scalars(select(Question.id).where(Question.dataset_id == resolved_of(round_, ResolvedSFT).pool_id)
                                    .order_by(Question.index)))
        assert len(pool) == POOL and resolved_of(round_, ResolvedSFT).question_count == POOL
        assert "question_ids" not in round_.resolved  # the row holds the count, never the list
        assert round_question_ids(session, round_id) == pool
        assert round_question_ids(session, round_id, 5, 10) == pool[5:10]
        for voter in ("weak", "strong"):
            chunks = session.scalars(select(Job).where(Job.round_id == round_id, Job.step == f"generate:{voter}")
                                     .order_by(Job.id)).all()
            assert [job.key for job in chunks] == [f"generate:{voter}:{i:04d}" for i in range(3)]
            assert [qid for job in chunks for qid in job.payload["question_ids"]] == pool, voter

    loaded: list[set[str]] = []  # per Job row planning loads: its attributes left unloaded

    def on_load(job, _context) -> None:
        loaded.append(set(inspect(job).unloaded))

    event.listen(Job, "load", on_load)
    with session_scope(url) as session:  # planning and storing again write nothing twice
        try:
            assert advance(session, round_id, delivery) == []
        finally:
            event.remove(Job, "load", on_load)
        # ... and reads no payload: a chunk's holds its question ids (at scale, every pool id, per pass)
        assert len(loaded) >= 6 and all("payload" in unloaded for unloaded in loaded), \
            "advance loaded the jobs' payloads"
        assert store_round_questions(session, round_id, pool) == 0
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(RoundQuestion).where(RoundQuestion.round_id == round_id)) == POOL
        assert round_question_ids(session, round_id) == pool
        # A chunk missing from the middle (e.g. planned by an older version) is planned with its own ids.
        session.execute(delete(Job).where(Job.round_id == round_id, Job.key == "generate:strong:0001"))
    with session_scope(url) as session:
        assert len(advance(session, round_id, delivery)) == 1
        replanned = session.scalar(select(Job).where(Job.round_id == round_id, Job.key == "generate:strong:0001"))
        assert replanned.payload["question_ids"] == pool[5:10]


def check_named_start_stores_the_ids_once(url: str, tmp_path: Path) -> None:
    """`round start --name` retried finds its round and writes its pool ids no second time."""
    from db.schema import RoundQuestion
    from services.config import parse_round_config
    from services.round_questions import round_question_ids
    from services.rounds import start_round

    round_id = make_round(url, tmp_path)
    delivery = load_settings({"W2S_DATABASE_URL": url}).delivery
    with session_scope(url) as session:
        config = parse_round_config(session.get(Round, round_id).config)
    name = f"named-{uuid.uuid4().hex[:8]}"
    ids = []
    for _ in range(2):
        with session_scope(url) as session:
            round_, _jobs = start_round(session, config, delivery, name=name)
            ids.append(round_.id)
    assert ids[0] == ids[1] != round_id
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(RoundQuestion).where(RoundQuestion.round_id == ids[0])) == POOL
        assert round_question_ids(session, ids[0]) == round_question_ids(session, round_id)


def check_round_questions_migration(url: str) -> None:
    """Migration 0010 on a database at 0009 (`url`: a fresh, empty one): a round's `question_ids`
    move into `round_questions` in their order and the JSON keeps their count; a weak-sft round is
    untouched; the downgrade puts the list back as it was and drops the table; upgrading again works."""
    import sqlalchemy as sa
    from alembic import command

    from db.session import alembic_config, current_revision, get_engine

    upgrade(url, "0009")
    now = datetime.now(timezone.utc)
    datasets = sa.table("datasets", *(sa.column(c) for c in ("id", "name", "task", "labelled", "source", "size")),
                        sa.column("created_at", sa.DateTime(timezone=True)))
    questions = sa.table("questions", *(sa.column(c) for c in ("id", "dataset_id", "index", "text")))
    rounds = sa.table("rounds", sa.column("id"), sa.column("stage"), sa.column("iteration"), sa.column("state"),
                      sa.column("config", sa.JSON()), sa.column("resolved", sa.JSON()),
                      sa.column("created_at", sa.DateTime(timezone=True)))
    base = {"task": "gsm8k", "student_id": 1, "baseline_id": 1, "lineage_root_id": 1, "eval_id": 1}
    sft = {**base, "weak_id": 1, "strong_id": 2, "pool_id": 1, "question_ids": [13, 11, 12], "demonstration_ids": [4]}
    weak_sft = {**base, "train_id": 1}
    empty = {**base, "weak_id": 1, "strong_id": 2, "pool_id": 1, "question_ids": []}
    with get_engine(url).begin() as connection:
        connection.execute(datasets.insert().values(id=1, name="pool", task="gsm8k", labelled=True, source="x", size=3,
                                                    created_at=now))
        connection.execute(questions.insert(), [{"id": 10 + i, "dataset_id": 1, "index": i, "text": f"q{i}"} for i in (1, 2, 3)])
        connection.execute(rounds.insert(), [
            {"id": rid, "stage": stage, "iteration": 1, "state": "done", "config": {}, "resolved": resolved, "created_at": now}
            for rid, stage, resolved in ((1, "sft", sft), (2, "weak-sft", weak_sft), (3, "sft", empty))])

    def state() -> tuple[dict[int, dict], list[tuple[int, int, int]] | None]:
        with get_engine(url).connect() as connection:
            resolved = {rid: value for rid, value in connection.execute(sa.select(rounds.c.id, rounds.c.resolved))}
            if not sa.inspect(connection).has_table("round_questions"):
                return resolved, None
            rows = connection.execute(sa.text("SELECT round_id, position, question_id FROM round_questions "
                                              "ORDER BY round_id, position")).all()
            return resolved, [tuple(row) for row in rows]

    upgrade(url, "0010")
    resolved, rows = state()
    assert rows == [(1, 0, 13), (1, 1, 11), (1, 2, 12)]
    assert resolved[1] == {**{k: v for k, v in sft.items() if k != "question_ids"}, "question_count": 3}
    assert resolved[2] == weak_sft
    assert resolved[3] == {**{k: v for k, v in empty.items() if k != "question_ids"}, "question_count": 0}

    command.downgrade(alembic_config(url), "0009")
    assert current_revision(url) == "0009"
    resolved, rows = state()
    assert rows is None, "the downgrade left the round_questions table"
    assert resolved == {1: sft, 2: weak_sft, 3: empty}

    upgrade(url)
    assert state()[1] == [(1, 0, 13), (1, 1, 11), (1, 2, 12)]


# --- the heartbeat while a long job transaction is open ---------------------------------------------


def check_heartbeat_during_vote(url: str, tmp_path: Path, monkeypatch, deadline_s: float = 10.0) -> None:
    """The vote writes every page in one transaction, which commits with its done mark. Held open
    after its first page (examples inserted, progress recorded), the job's heartbeat from another
    connection must still get through: a heartbeat that waits for the vote's transaction gets
    nothing through for a vote longer than its lease, and the job stops itself. On PostgreSQL the
    planner (run when any other job of the round ends) must get the round's row lock too."""
    import functools
    import threading

    from services.rounds import advance
    from services.voting import voted_pages
    from workers import steps
    from workers.runner import JobContext, claim, run_job

    # Pages of 4, as in check_bulk_paths.
    monkeypatch.setattr(steps, "voted_pages", functools.partial(voted_pages, page=4))
    settings = _settings(url, tmp_path)
    round_id = make_round(url, tmp_path)
    for job_id in _jobs(url, round_id, "generate"):
        assert run_job(job_id, steps.run_generate, settings=settings, enqueue=lambda *a, **k: None) == "done"
    (vote,) = _jobs(url, round_id, "vote")

    paused, resume = threading.Event(), threading.Event()
    real_insert = steps.insert_ignore
    calls = 0

    def insert_then_pause(session, model, rows):
        nonlocal calls
        calls += 1
        if calls == 2:  # page 1's examples and progress are in the open transaction
            paused.set()
            assert resume.wait(120), "the test never let the vote go on"
        return real_insert(session, model, rows)

    monkeypatch.setattr(steps, "insert_ignore", insert_then_pause)
    with session_scope(url) as session:
        job = claim(session, vote, timedelta(seconds=300), owner="voter@host:1")
        ctx = JobContext(settings, job.id, job.round_id, job.attempts, dict(job.payload or {}), kind=job.kind)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            steps.run_vote(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    voter = threading.Thread(target=run, daemon=True)
    voter.start()
    beat_done = threading.Event()
    beater = threading.Thread(target=lambda: (ctx.beat(), beat_done.set()), daemon=True)
    planned: list[object] = []

    def plan() -> None:
        # Another job of the round ending now calls the planner, which locks the round's row.
        with session_scope(url) as session:
            if session.bind.dialect.name == "postgresql":
                # Fail fast instead of hanging when the lock waits for the vote's transaction.
                session.execute(text(f"SET LOCAL lock_timeout = '{int(deadline_s * 1000)}ms'"))
            try:
                planned.append(advance(session, round_id, settings.delivery))
            except Exception as exc:  # noqa: BLE001 - reported by the test
                planned.append(exc)

    planner = threading.Thread(target=plan, daemon=True)
    try:
        assert paused.wait(60), f"the vote did not reach its second page within 60 s: {failure}"
        beater.start()
        got_through = beat_done.wait(deadline_s)
        if url.startswith("postgresql"):
            planner.start()
            planner.join(deadline_s + 5)
    finally:
        resume.set()
        voter.join(60)
        if beater.is_alive():
            beater.join(60)
        if planner.is_alive():
            planner.join(60)
    assert got_through, (f"the heartbeat's UPDATE of job {vote} did not complete within {deadline_s:.0f} s while the "
                         "vote's transaction was open after its first page: the vote holds the job's row lock")
    if url.startswith("postgresql"):
        # The vote's inserts hold FOR KEY SHARE on the round's row (the foreign key); a planner
        # that locked it FOR UPDATE would wait for the whole vote.
        assert planned and not isinstance(planned[0], Exception), (
            f"the planner (advance) did not get the round's row lock within {deadline_s:.0f} s while the vote's "
            f"transaction was open: {planned[0] if planned else 'still waiting'}")
    assert not voter.is_alive() and not failure, f"the vote did not finish: {failure}"
    with session_scope(url) as session:
        done = session.get(Job, vote)
        assert (done.state, done.progress) == ("done", 1.0)
    assert _count(url, TrainingExample, round_id) == 2 * POOL
