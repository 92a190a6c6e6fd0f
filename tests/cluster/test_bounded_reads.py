"""A generation chunk and a vote page read their own generations only, whatever the round's size,
on the real PostgreSQL server, with the generations table never analysed (as a bench or a test
database is: the test server runs with autovacuum off; in production, a table grown since its last
analyse). Without statistics the planner used to test a chunk's `question_id IN (…)` as a filter
over every generation of the voter's round, and the vote hashed the whole round for every page:
per-question overhead grew with the pool (issue #15: 1.6x from 7,000 to 70,000 questions, a
70,000-question vote took 300 s). Each statement's plan is checked with EXPLAIN ANALYZE: the rows
it read from `generations` (returned and filtered out, every loop) stay within twice a chunk."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from sqlalchemy import event, select, text, update

from db.schema import Job
from db.session import get_engine, session_scope
from services.settings import load_settings
from tests.bulk_support import make_round
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import drop_database, fresh_database

POOL, CHUNK = 768, 128  # six chunks a voter: the last one runs with five times its size in the table


def _generation_rows_read(plan: dict) -> int:
    """Rows a plan read from `generations`: returned plus filtered out, times its loops, every node."""
    read = 0
    if plan.get("Relation Name") == "generations":
        read += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                 + plan.get("Rows Removed by Index Recheck", 0)) * plan.get("Actual Loops", 1)
    return read + sum(_generation_rows_read(child) for child in plan.get("Plans", []))


class _GenerationReads:
    """The SELECTs on `generations` a block of code runs, with their parameters, to EXPLAIN after."""

    def __init__(self, url: str) -> None:
        self.engine, self.statements = get_engine(url), []

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT") and re.search(r"\b(FROM|JOIN) generations\b", statement):
            self.statements.append((statement, parameters))

    def __enter__(self) -> _GenerationReads:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def rows_read(self) -> list[tuple[int, str]]:
        out = []
        with self.engine.connect() as conn:
            for statement, parameters in self.statements:
                plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).scalar()
                plan = json.loads(plan) if isinstance(plan, str) else plan
                out.append((_generation_rows_read(plan[0]["Plan"]), " ".join(statement.split())[:160]))
        return out


def test_a_chunk_and_a_vote_page_read_only_their_own_generations_on_postgresql(tmp_path: Path, monkeypatch):
    from services.voting import voted_pages
    from workers import steps
    from workers.runner import run_job

    url, name = fresh_database(POSTGRES_ADMIN_URL, prefix="w2s_test_bounds")
    try:
        settings = load_settings({"W2S_DATABASE_URL": url, "W2S_HOME": str(tmp_path / "home"),
                                  "W2S_CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
        round_id = make_round(url, tmp_path, POOL, {"chunk_size": CHUNK})
        with session_scope(url) as session:
            chunks = list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate")
                                          .order_by(Job.id)))
            # The premise: nothing has statistics on the table (what a fresh database or a bench sees).
            assert session.scalar(text("SELECT count(*) FROM pg_stats WHERE tablename = 'generations'")) == 0
        no_enqueue = lambda *a, **k: None  # noqa: E731 - the test runs every job itself
        assert len(chunks) == 2 * POOL // CHUNK
        for job_id in chunks:
            assert run_job(job_id, steps.run_generate, settings=settings, enqueue=no_enqueue) == "done"

        # The last chunk again (a redelivery: its answers are all in), with the whole pool answered.
        with session_scope(url) as session:
            session.execute(update(Job).where(Job.id == chunks[-1]).values(state="queued", attempts=0))
        with _GenerationReads(url) as reads:
            assert run_job(chunks[-1], steps.run_generate, settings=settings, enqueue=no_enqueue) == "done"
        read = reads.rows_read()
        assert read, "the chunk looks for the answers already in"
        for rows, statement in read:
            assert rows <= 2 * CHUNK, f"a chunk of {CHUNK} read {rows} generations ({2 * POOL} in the round): {statement}"

        # The vote, in pages of a chunk's size: each page reads its own questions' answers only.
        monkeypatch.setattr(steps, "voted_pages", functools.partial(voted_pages, page=CHUNK))
        with session_scope(url) as session:
            vote = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "vote"))
        with _GenerationReads(url) as reads:
            assert run_job(vote, steps.run_vote, settings=settings, enqueue=no_enqueue) == "done"
        read = reads.rows_read()
        assert len(read) >= POOL // CHUNK, "the vote reads page by page"
        for rows, statement in read:
            assert rows <= 2 * CHUNK, f"a vote page of {CHUNK} read {rows} generations ({2 * POOL} in the round): {statement}"
        with session_scope(url) as session:
            assert session.get(Job, vote).result["kept"] == POOL  # the voters agree: every question kept
    finally:
        from db.session import dispose_engines

        dispose_engines()
        drop_database(POSTGRES_ADMIN_URL, name)
