"""Checks of a finished stage I round against the database, shared by the embedded and the
distributed end-to-end tests: the same invariants must hold on both paths."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from db.schema import Checkpoint, Evaluation, Generation, Job, Question, Round, TrainingExample
from db.session import session_scope
from services.promotion import gate
from services.selection import Vote, stage1_vote


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
        assert set(weak) == set(strong) == set(round_.resolved["question_ids"])

        # The vote, recomputed from the stored answers with the pure rule, matches what was kept.
        kept = stage1_vote([Vote(q, weak[q], strong[q]) for q in round_.resolved["question_ids"]], "gsm8k")
        vote_job = next(job for job in jobs if job.key == "vote")
        assert vote_job.result["kept"] == len(kept)
        for variant in variants:
            rows = session.execute(select(TrainingExample.question_id, TrainingExample.generation_id)
                                   .where(TrainingExample.round_id == round_id, TrainingExample.variant == variant)).all()
            per_question = 2 if variant == "hybrid" else 1
            assert len(rows) == per_question * len(kept)
            assert {r.question_id for r in rows} == set(kept)

        # No gold answer of the pool reached a training target.
        pool_gold = dict(session.execute(select(Question.id, Question.gold_solution)
                                         .where(Question.id.in_(round_.resolved["question_ids"]))).all())
        for question_id, response in session.execute(select(TrainingExample.question_id, TrainingExample.response)
                                                     .where(TrainingExample.round_id == round_id)):
            assert response != pool_gold[question_id]

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
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 1 + len(candidates)
        return report
