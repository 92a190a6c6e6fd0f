"""Round reports: the columns of the reference table, computed from the database alone.

Pool gold answers appear here and nowhere else: they grade, they never vote or train.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Job, PreferencePair, Question, Round, TrainingExample
from models.answers import answers_match, extract_answer
from services.contracts import (
    EvaluatePayload,
    EvaluateResult,
    GeneratePayload,
    GenerateResult,
    JobKey,
    JobKind,
    JobState,
    PairsResult,
    PromoteResult,
    ResolvedPreference,
    ResolvedSFT,
    TrainPayload,
    TrainResult,
    payload_of,
    resolved_of,
    result_of,
)
from services.contracts.graph import JOB_STEP_ORDER
from services.lookup import get_by_id
from services.round_questions import round_question_ids
from services.selection import accuracy
from services.voting import round_vote

STEP_ORDER = JOB_STEP_ORDER


def job_counts(session: Session, round_id: int) -> dict[str, dict[str, int]]:
    """step → state → count, in the order the steps run."""
    counts: dict[str, Counter] = {}
    for step, state in session.execute(select(Job.step, Job.state).where(Job.round_id == round_id)):
        counts.setdefault(step, Counter())[state] += 1
    ordered = sorted(counts, key=lambda s: STEP_ORDER.index(s) if s in STEP_ORDER else len(STEP_ORDER))
    return {step: dict(counts[step]) for step in ordered}


def round_report(session: Session, round_: Round, promotion: PromoteResult | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"round": round_.id, "stage": round_.stage, "iteration": round_.iteration}
    task = resolved_of(round_).task
    if round_.stage == "sft":
        report.update(_vote_figures(session, round_, task))
    elif round_.stage == "preference":
        report.update(_pair_figures(session, round_, task))
    report.update(prompt_fit(session, round_.id))
    report["variants"] = _variants(session, round_)
    if promotion is None:
        promote = session.scalar(select(Job).where(Job.round_id == round_.id, Job.key == str(JobKey.single(JobKind.PROMOTE))))
        promotion = result_of(promote, PromoteResult) if promote is not None and promote.state == JobState.DONE else None
    config_eval = round_.config.get("eval") or {}
    report["decided_on"] = config_eval.get("dataset")
    if config_eval.get("report_on"):
        report["report_on"] = config_eval["report_on"]
    if promotion:
        report["student_before"] = {"name": promotion.baseline, "accuracy": promotion.baseline_accuracy}
        if promotion.baseline_report_accuracy is not None:
            report["student_before"]["report_accuracy"] = promotion.baseline_report_accuracy
        report["outcome"] = promotion.outcome
        report["promoted"] = promotion.promoted
        report["reason"] = promotion.reason
    return report


def prompt_fit(session: Session, round_id: int) -> dict[str, Any]:
    """From the round's generate jobs: how many questions were answered with fewer demonstrations
    than configured (their prompt would not fit the model's context with room for max_new_tokens),
    and, per voter, how many were skipped because even the zero-shot prompt does not fit."""
    fewer: set[int] = set()
    skipped: dict[str, set[int]] = {}
    for job in session.scalars(select(Job).where(Job.round_id == round_id, Job.kind == JobKind.GENERATE,
                                                 Job.state == JobState.DONE)):
        result = result_of(job, GenerateResult)
        if result is None:
            continue
        fewer.update(result.fewer_demonstrations)
        if result.skipped:
            skipped.setdefault(payload_of(job, GeneratePayload).voter, set()).update(result.skipped)
    return {"fewer_demonstrations": len(fewer),
            "skipped_prompt_too_long": {voter: len(ids) for voter, ids in sorted(skipped.items())}}


def _vote_figures(session: Session, round_: Round, task: str) -> dict[str, Any]:
    resolved = resolved_of(round_, ResolvedSFT)
    question_ids = round_question_ids(session, round_.id)
    gold = _pool_gold(session, resolved.pool_id, question_ids)
    vote = round_vote(session, round_.id, question_ids, task, (round_.config.get("vote") or {}).get("min_step_score"))
    answers = {"weak": {q: g.answer for q, g in vote.first.items()}, "strong": {q: g.answer for q, g in vote.second.items()}}
    kept = vote.kept
    kept_weak = {q: answers["weak"][q] for q in kept}
    figures: dict[str, Any] = {
        "pool": len(question_ids),
        "weak_answered": sum(1 for a in answers["weak"].values() if a),
        "strong_answered": sum(1 for a in answers["strong"].values() if a),
        "kept": len(kept),
        "dropped_by_step_score": len(vote.dropped_by_step_score),
        "kept_share": len(kept) / len(question_ids) if question_ids else 0.0,
        "has_gold": any(gold.values()),
    }
    if figures["has_gold"]:
        figures["weak_accuracy"] = accuracy(answers["weak"], gold, task)
        figures["strong_accuracy"] = accuracy(answers["strong"], gold, task)
        figures["kept_accuracy"] = accuracy(kept_weak, gold, task)
        figures["kept_by_gold_steps"] = _difficulty_mix(session, kept)
    return figures


def _pair_figures(session: Session, round_: Round, task: str) -> dict[str, Any]:
    resolved = resolved_of(round_, ResolvedPreference)
    question_ids = round_question_ids(session, round_.id)
    gold = _pool_gold(session, resolved.pool_id, question_ids)
    pairs = session.scalars(select(PreferencePair).where(PreferencePair.round_id == round_.id)).all()
    pairs_job = session.scalar(select(Job).where(Job.round_id == round_.id, Job.key == str(JobKey.single(JobKind.PAIRS))))
    result = result_of(pairs_job, PairsResult) if pairs_job is not None else None
    figures: dict[str, Any] = {
        "sampled_questions": len(question_ids),
        "skipped": result.skipped if result is not None else {},
        "pairs": len(pairs),
        "pairs_by_case": dict(Counter(p.case for p in pairs)),
        "has_gold": any(gold.values()),
    }
    for job in session.scalars(select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.EVALUATE).order_by(Job.id)):
        key = JobKey.parse(job.key)
        evaluated = result_of(job, EvaluateResult)
        if key.pass_at_k and job.state == JobState.DONE and evaluated is not None:
            figures.setdefault("pass_at_k", {"k": payload_of(job, EvaluatePayload).pass_at})[key.subject] = evaluated.accuracy
    if figures["has_gold"] and pairs:
        def correct(text: str, qid: int) -> bool:
            expected = gold.get(qid)
            if not expected:
                return False
            return answers_match(extract_answer(text, task), expected, task)

        figures["chosen_accuracy"] = sum(correct(p.chosen, p.question_id) for p in pairs) / len(pairs)
        figures["rejected_accuracy"] = sum(correct(p.rejected, p.question_id) for p in pairs) / len(pairs)
    return figures


def _pool_gold(session: Session, pool_id: int, question_ids: list[int]) -> dict[int, str | None]:
    """The round's questions' gold answers, read by the pool's dataset: an `IN` of the round's
    question ids would pass one parameter per question (PostgreSQL refuses more than 65,535)."""
    wanted = set(question_ids)
    return {qid: gold for qid, gold in session.execute(
        select(Question.id, Question.gold_answer).where(Question.dataset_id == pool_id)) if qid in wanted}


def _difficulty_mix(session: Session, kept: list[int]) -> dict[str, int]:
    """How many solution lines the kept questions' gold solutions have: agreement tends to keep
    the easy questions, and a kept set of one-step problems teaches a student to stop early."""
    mix: Counter = Counter()
    for start in range(0, len(kept), 10_000):  # pages: PostgreSQL takes at most 65,535 parameters
        for (solution,) in session.execute(select(Question.gold_solution).where(Question.id.in_(kept[start : start + 10_000]))):
            if solution:
                mix[str(sum(1 for line in solution.splitlines() if line.strip() and not line.startswith("####")))] += 1
    return dict(sorted(mix.items()))


def _variants(session: Session, round_: Round) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Counted in SQL: a round of N kept questions has N examples per variant.
    examples = Counter(dict(session.execute(select(TrainingExample.variant, func.count())
                                            .where(TrainingExample.round_id == round_.id)
                                            .group_by(TrainingExample.variant)).tuples().all()))
    if round_.stage == "preference":  # one training set: the pairs, named after the loss
        examples = Counter({round_.config["training"]["loss"]: len(session.scalars(
            select(PreferencePair.id).where(PreferencePair.round_id == round_.id)).all())})
    evaluations = {job.key: result_of(job, EvaluateResult) for job in session.scalars(
        select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.EVALUATE, Job.state == JobState.DONE))}
    for job in session.scalars(select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.TRAIN).order_by(Job.id)):
        payload = payload_of(job, TrainPayload)
        variant, candidate = payload.variant, payload.candidate
        entry: dict[str, Any] = {"examples": examples.get(variant, 0), "state": job.state}
        if payload.setting:
            entry.update(training_set=variant, setting=payload.setting)
        result = result_of(job, TrainResult) or TrainResult()
        if result.checkpoint_id:
            checkpoint = get_by_id(session, Checkpoint, result.checkpoint_id, "checkpoint")
            entry.update(checkpoint=checkpoint.name, status=checkpoint.status,
                         accuracy=(checkpoint.metrics or {}).get("eval_accuracy"),
                         train_loss=(result.train or {}).get("final_loss"))
            # accuracy: on the eval (dev) split, which decided; report_accuracy: on the report_on split.
            for field, key in (("accuracy", JobKey.evaluate(candidate)),
                               ("report_accuracy", JobKey.evaluate(candidate, report_on=True))):
                evaluated = evaluations.get(str(key))
                if evaluated is not None:
                    entry[field] = evaluated.accuracy
        elif result.skipped:
            entry["skipped"] = result.skipped
        out[candidate] = entry
    return out
