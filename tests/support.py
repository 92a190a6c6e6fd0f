"""Shared test helpers: the CLI invoker, and the checks of a finished stage I round against the
database, used by the embedded and the distributed end-to-end tests: the same invariants must
hold on both paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from db.schema import Checkpoint, Evaluation, Generation, Job, Round, TrainingExample
from db.session import session_scope
from services.promotion import gate
from services.round_questions import round_question_ids
from services.selection import Vote, stage1_vote


def fresh_database(admin_url: str, prefix: str = "w2s_test") -> tuple[str, str]:
    """A new database on the real PostgreSQL server of `admin_url`: (SQLAlchemy URL, name).
    An unreachable server fails the test (it must not skip)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {admin_url}: {exc} (start it: see .ci/run)")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    host = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{host}/{name}", name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    from db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a process started with start_new_session=True, and its children: SIGTERM (a Celery
    worker's warm shutdown), then SIGKILL if it is still there after `timeout_s`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_reference(path: Path):
    """A JSON or JSONL file of ../shared/data; a missing file fails the test (it must not skip)."""
    if not path.is_file():
        pytest.fail(f"reference data missing: {path} (../shared/data beside the repo root)")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def invoke_cli(*args, ok: bool = True) -> Result:
    """Run `w2sctl ARGS` in this process; with ok, assert it succeeded and show its output if not."""
    from cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, f"w2sctl {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
    return result


def check_stage1_round(database_url: str, round_id: int, *, pool_size: int, variants: list[str]) -> dict:
    with session_scope(database_url) as session:
        round_ = session.get(Round, round_id)
        assert round_.state == "done", f"round {round_id} is {round_.state}: {round_.error}"
        jobs = session.scalars(select(Job).where(Job.round_id == round_id)).all()
        assert all(job.state == "done" for job in jobs), [(j.key, j.state, j.error) for j in jobs if j.state != "done"]

        # Every (question, voter) answered exactly once.
        generations = session.execute(select(Generation.voter, Generation.question_id, Generation.answer)
                                      .where(Generation.round_id == round_id)).all()
        assert len(generations) == 2 * pool_size
        assert len({(g.voter, g.question_id) for g in generations}) == 2 * pool_size
        weak = {g.question_id: g.answer for g in generations if g.voter == "weak"}
        strong = {g.question_id: g.answer for g in generations if g.voter == "strong"}
        question_ids = round_question_ids(session, round_id)
        assert set(weak) == set(strong) == set(question_ids)

        # The vote, recomputed from the stored answers with the pure rule, matches what was kept.
        kept = stage1_vote([Vote(q, weak[q], strong[q]) for q in question_ids], "gsm8k")
        vote_job = next(job for job in jobs if job.key == "vote")
        assert vote_job.result["kept"] == len(kept)
        for variant in variants:
            rows = session.execute(select(TrainingExample.question_id, TrainingExample.generation_id)
                                   .where(TrainingExample.round_id == round_id, TrainingExample.variant == variant)).all()
            per_question = 2 if variant == "hybrid" else 1
            assert len(rows) == per_question * len(kept)
            assert {r.question_id for r in rows} == set(kept)

        # Every training target is a model's own response (provenance), never the pool's gold.
        for example, text, voter in session.execute(
            select(TrainingExample, Generation.text, Generation.voter)
            .join(Generation, Generation.id == TrainingExample.generation_id)
            .where(TrainingExample.round_id == round_id)
        ):
            assert example.response == text and example.question_id in weak
            assert (voter == "weak") if example.variant == "weak" else True
        assert session.scalar(select(func.count()).select_from(TrainingExample).where(
            TrainingExample.round_id == round_id, TrainingExample.generation_id.is_(None))) == 0

        # Candidates: on disk, evaluated, and gated by the pure rule.
        candidates = session.scalars(select(Checkpoint).where(Checkpoint.round_id == round_id)).all()
        if kept:
            assert {c.variant for c in candidates} == set(variants)
        for candidate in candidates:
            path = Path(candidate.path)
            assert (path / "config.json").is_file() and list(path.glob("*.safetensors")), path
            assert not list(path.parent.glob(f"{path.name}.tmp*")), "a temporary checkpoint directory was left behind"
        baseline = session.get(Checkpoint, round_.resolved["baseline_id"])
        evaluation = {e.checkpoint_id: e.accuracy for e in session.scalars(select(Evaluation))}
        decision = gate(baseline.name, evaluation[baseline.id], {c.name: evaluation[c.id] for c in candidates})
        statuses = {c.name: c.status for c in candidates}
        assert statuses == {c.name: ("promoted" if c.name == decision.promoted else "rejected") for c in candidates}
        assert round_.outcome == ("promoted" if decision.promoted else "rejected")

        report = round_.report
        assert report["pool"] == pool_size and report["kept"] == len(kept)
        assert report["student_before"]["accuracy"] == evaluation[baseline.id]
        assert all(c.id in evaluation for c in candidates)
        return report
