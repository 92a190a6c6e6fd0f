"""What a pipeline, a round and a training job log to experiment tracking (MLflow or TensorBoard).

Runs nest as the work does: pipeline → round → training job. A round's run is opened by the first
process that needs it (a training job needs its round's run id to nest under; the round's end
needs it to log the outcome) and its id is kept in the database (`tracking_runs`), so every worker
logs into the same run. The training job's run is opened by rank 0 of its DeepSpeed launch
(models.train.common) from the spec `training_run_spec` puts in the job file.

A round logs its config as parameters, its lineage as tags (student, parent, round, candidates),
and at its end the figures of its report (`round_metrics`: kept share, pseudo-label accuracy,
pair counts, each candidate's accuracy) and the decision. Tracking is off unless a round's config
or the settings (W2S_TRACKING_BACKEND) turn it on; then nothing here can fail a job: a tracking
failure is a warning and a count (models.tracking).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Pipeline, Round, TrackingRun, utcnow
from db.session import session_scope
from models.tracking import Run, TrackingTarget, flatten, numeric, open_run
from services.config import TrackingConfig
from services.lookup import get_by_id
from services.settings import Settings

log = logging.getLogger("w2s.tracking")

END_STATUS = {"done": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "stopped": "FINISHED"}


def target_for(tracking: TrackingConfig | dict[str, Any] | None, settings: Settings) -> TrackingTarget | None:
    """Where a round's runs go: its config's `tracking:`, else the settings' default; None when off.
    No URI: the embedded store under W2S_HOME (MLflow's SQLite store, or a TensorBoard directory)."""
    if isinstance(tracking, dict):
        tracking = TrackingConfig.model_validate(tracking)
    config = tracking or settings.tracking
    if config.backend == "none":
        return None
    if config.backend == "mlflow":
        uri = config.uri or f"sqlite:///{settings.home / 'mlflow.db'}"
    else:
        uri = str(Path(config.uri or settings.home / "tensorboard").absolute())
    return TrackingTarget(config.backend, uri, config.experiment)


def _key(target: TrackingTarget) -> str:
    return f"{target.backend} {target.uri} {target.experiment}"


# --- runs of pipelines and rounds ----------------------------------------------------------------


def round_run(session: Session, settings: Settings, round_id: int) -> Run:
    """The round's run, opened (with its pipeline's) on first use. Takes the round's row lock
    (PostgreSQL), so that two jobs of a round starting together open one run, not two; FOR NO KEY
    UPDATE, as the planner's (services.rounds.advance), so a long vote's inserts don't hold it up."""
    round_ = session.scalar(select(Round).where(Round.id == round_id).with_for_update(key_share=True))
    if round_ is None:
        return Run(None)
    target = target_for(round_.config.get("tracking"), settings)
    if target is None:
        return Run(None)
    existing = session.scalar(select(TrackingRun.run_id).where(
        TrackingRun.owner == "round", TrackingRun.owner_id == round_id, TrackingRun.target == _key(target)))
    if existing is not None:
        return open_run(target, run_id=existing)
    parent = _pipeline_run(session, target, round_.pipeline_id) if round_.pipeline_id else Run(None)
    student = _student(session, round_)
    name = f"round {round_id} {round_.stage}" + (f" iteration {round_.iteration}" if round_.stage == "sft" else "")
    run = open_run(target, name=name, parent_run_id=parent.run_id, tags={
        "w2s.round_id": round_id, "w2s.stage": round_.stage, "w2s.iteration": round_.iteration,
        "w2s.pipeline_id": round_.pipeline_id, "w2s.pipeline_step": round_.pipeline_step,
        "w2s.student": student.name if student else None, "w2s.student_path": student.path if student else None})
    if run.active:
        run.log_params(flatten(round_.config))
        session.add(TrackingRun(owner="round", owner_id=round_id, target=_key(target), run_id=run.run_id))
        session.flush()
    return run


def _student(session: Session, round_: Round) -> Checkpoint | None:
    student_id = round_.resolved.get("student_id")
    return session.get(Checkpoint, student_id) if student_id else None


def _pipeline_run(session: Session, target: TrackingTarget, pipeline_id: int) -> Run:
    pipeline = get_by_id(session, Pipeline, pipeline_id, "pipeline", lock=True)
    existing = session.scalar(select(TrackingRun.run_id).where(
        TrackingRun.owner == "pipeline", TrackingRun.owner_id == pipeline_id, TrackingRun.target == _key(target)))
    if existing is not None:
        return open_run(target, run_id=existing)
    run = open_run(target, name=f"pipeline {pipeline_id}", tags={"w2s.pipeline_id": pipeline_id})
    if run.active:
        run.log_params(flatten(pipeline.config))
        session.add(TrackingRun(owner="pipeline", owner_id=pipeline_id, target=_key(target), run_id=run.run_id))
        session.flush()
    return run


def training_run_spec(session: Session, settings: Settings, round_id: int, *, variant: str, job_id: int,
                      attempt: int, checkpoint: str) -> dict[str, Any] | None:
    """What the train job puts in its job file for rank 0 (models.train.common.TrainingRunSpec):
    the target, the round's run to nest under, and the job's lineage as tags. None when off."""
    run = round_run(session, settings, round_id)
    if run.target is None:
        return None
    round_ = get_by_id(session, Round, round_id, "round")  # round_run found it: it has a target
    student = _student(session, round_)
    tags = {"w2s.round_id": round_id, "w2s.job_id": job_id, "w2s.attempt": attempt, "w2s.variant": variant,
            "w2s.stage": round_.stage, "w2s.checkpoint": checkpoint,
            "w2s.parent_checkpoint": student.name if student else None}
    return {**run.target.as_dict(), "parent_run_id": run.run_id, "run_name": f"train:{variant} (job {job_id})",
            "tags": {k: str(v) for k, v in tags.items() if v is not None}}


def record_round_end(settings: Settings, round_id: int) -> None:
    """Once a round has ended: its figures, decision and lineage to its run, and the run closed;
    then the same for its pipeline once that has ended. Idempotent (the first caller logs), and
    never raises: called by the job runner after every job."""
    try:
        with session_scope(settings.database_url) as session:
            round_ = session.get(Round, round_id)
            if round_ is None or round_.state not in END_STATUS:
                return
            target = target_for(round_.config.get("tracking"), settings)
            if target is None:
                return
            run = round_run(session, settings, round_id)
            if not _claim_end(session, "round", round_id, run):
                return
            from services.report import round_report

            metrics, tags = round_metrics(round_report(session, round_))
            run.log_metrics(metrics)
            run.set_tags({**tags, "w2s.state": round_.state, "w2s.error": (round_.error or "")[:5000] or None})
            run.end(END_STATUS[round_.state])
            pipeline = session.get(Pipeline, round_.pipeline_id) if round_.pipeline_id else None
            if pipeline is not None and pipeline.state in END_STATUS:
                parent = _pipeline_run(session, target, pipeline.id)
                if _claim_end(session, "pipeline", pipeline.id, parent):
                    parent.set_tags({"w2s.state": pipeline.state, "w2s.reason": pipeline.reason})
                    parent.end(END_STATUS[pipeline.state])
    except Exception as exc:  # noqa: BLE001 - tracking never fails a job
        log.warning("tracking: could not record the end of round %s: %s: %s", round_id, type(exc).__name__, exc)


def _claim_end(session: Session, owner: str, owner_id: int, run: Run) -> bool:
    """Only one caller logs a run's end: the one whose update sets ended_at."""
    if not run.active:
        return False
    claimed = session.execute(update(TrackingRun).where(
        TrackingRun.owner == owner, TrackingRun.owner_id == owner_id, TrackingRun.run_id == run.run_id,
        TrackingRun.ended_at.is_(None)).values(ended_at=utcnow())).rowcount  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult
    return claimed == 1


def round_metrics(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A round report (services.report) → the run's metrics and tags. Pure.

    Stage I: pool, kept, kept_share, pseudo_label_accuracy (the kept answers' accuracy against
    the pool's gold answers, when it has them), each voter's accuracy. Stage II: pairs, pairs by
    case, chosen/rejected accuracy, pass@k. Every candidate: its accuracy, examples and final
    training loss, and its checkpoint as a tag; the starting student's accuracy; the decision.
    """
    metrics: dict[str, Any] = {key: report.get(key) for key in (
        "pool", "kept", "kept_share", "dropped_by_step_score", "weak_accuracy", "strong_accuracy",
        "sampled_questions", "pairs", "chosen_accuracy", "rejected_accuracy")}
    metrics["pseudo_label_accuracy"] = report.get("kept_accuracy")
    for case, count in (report.get("pairs_by_case") or {}).items():
        metrics[f"pairs.{case}"] = count
    for reason, count in (report.get("skipped") or {}).items():
        metrics[f"skipped.{reason}"] = count
    for name, value in (report.get("pass_at_k") or {}).items():
        if name != "k":
            metrics[f"pass_at_k.{name}"] = value
    tags: dict[str, str] = {}
    for variant, entry in (report.get("variants") or {}).items():
        metrics[f"candidate.{variant}.accuracy"] = entry.get("accuracy")
        metrics[f"candidate.{variant}.examples"] = entry.get("examples")
        metrics[f"candidate.{variant}.train_loss"] = entry.get("train_loss")
        if entry.get("checkpoint"):
            tags[f"w2s.candidate.{variant}"] = entry["checkpoint"]
            tags[f"w2s.candidate.{variant}.status"] = entry.get("status") or ""
    before = report.get("student_before") or {}
    metrics["student_before.accuracy"] = before.get("accuracy")
    if "outcome" in report:
        metrics["promoted"] = report["outcome"] == "promoted"
        tags.update({"w2s.decision": report["outcome"], "w2s.promoted": report.get("promoted") or "",
                     "w2s.reason": report.get("reason") or "", "w2s.student_before": before.get("name") or ""})
    return numeric({k: v for k, v in metrics.items() if v is not None}), tags
