"""Experiment tracking without a model: the round's figures (pure), the nesting pipeline → round →
training job read back with TensorBoard's own reader, an unreachable MLflow server, lazy imports.

The rounds logged to MLflow (stage I and DPO, on the tiny demo models) are checked in
tests/embedded/test_round_embedded.py, which runs those rounds anyway."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest

from models import tracking
from models.tracking import TrackingTarget, open_run
from services.config import ConfigError, TrackingConfig
from services.settings import load_settings
from services.tracking import round_metrics, target_for
from tests.conftest import REPO


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_round_metrics_of_a_stage1_report():
    report = {"pool": 120, "kept": 30, "kept_share": 0.25, "kept_accuracy": 0.8, "weak_accuracy": 0.3,
              "strong_accuracy": 0.4, "variants": {"hybrid": {"examples": 60, "checkpoint": "round1-hybrid",
                                                              "status": "promoted", "accuracy": 0.5,
                                                              "train_loss": 1.25}},
              "student_before": {"name": "strong", "accuracy": 0.45}, "outcome": "promoted",
              "promoted": "round1-hybrid", "reason": "beats strong by 5.0 points"}
    metrics, tags = round_metrics(report)
    assert metrics == {"pool": 120, "kept": 30, "kept_share": 0.25, "pseudo_label_accuracy": 0.8, "weak_accuracy": 0.3,
                       "strong_accuracy": 0.4, "candidate.hybrid.accuracy": 0.5, "candidate.hybrid.examples": 60,
                       "candidate.hybrid.train_loss": 1.25, "student_before.accuracy": 0.45, "promoted": 1.0}
    assert tags == {"w2s.candidate.hybrid": "round1-hybrid", "w2s.candidate.hybrid.status": "promoted",
                    "w2s.decision": "promoted", "w2s.promoted": "round1-hybrid",
                    "w2s.reason": "beats strong by 5.0 points", "w2s.student_before": "strong"}


def test_round_metrics_of_a_stage2_report():
    report = {"sampled_questions": 40, "pairs": 12, "pairs_by_case": {"weak_chosen": 2, "weak_rejected": 10},
              "skipped": {"below_floor": 28}, "chosen_accuracy": 0.7, "rejected_accuracy": 0.1,
              "pass_at_k": {"k": 4, "student": 0.6, "dpo": 0.65}, "variants": {"dpo": {"examples": 12}},
              "outcome": "rejected", "promoted": None, "reason": "no gain", "student_before": {"name": "s", "accuracy": 0.5}}
    metrics, tags = round_metrics(report)
    assert metrics["pairs"] == 12 and metrics["pairs.weak_chosen"] == 2 and metrics["pairs.weak_rejected"] == 10
    assert metrics["skipped.below_floor"] == 28 and metrics["pass_at_k.dpo"] == 0.65 and "pass_at_k.k" not in metrics
    assert metrics["promoted"] == 0.0 and tags["w2s.decision"] == "rejected"


def test_target_defaults_to_the_embedded_store(tmp_path):
    settings = load_settings({"W2S_HOME": str(tmp_path)})
    assert target_for(None, settings) is None  # off unless asked for
    assert target_for({"backend": "mlflow"}, settings) == TrackingTarget("mlflow", f"sqlite:///{tmp_path}/mlflow.db")
    on = load_settings({"W2S_HOME": str(tmp_path), "W2S_TRACKING_BACKEND": "tensorboard"})
    assert target_for(None, on) == TrackingTarget("tensorboard", str(tmp_path / "tensorboard"))
    assert target_for(TrackingConfig(backend="none"), on) is None  # a round's own `tracking:` wins
    with pytest.raises(ConfigError, match="W2S_TRACKING_BACKEND=.wandb."):
        load_settings({"W2S_HOME": str(tmp_path), "W2S_TRACKING_BACKEND": "wandb"})


def test_pipeline_round_and_training_runs_nest(w2s_home, tmp_path):
    """Runs are opened as the work needs them, kept in the database, and nest; the round's end
    closes its run and, once the pipeline has ended, the pipeline's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from db.schema import Pipeline, Round, TrackingRun
    from db.session import ensure_schema, session_scope
    from services.tracking import record_round_end, round_run, training_run_spec

    settings = load_settings()
    ensure_schema(settings.database_url)
    logdir = tmp_path / "tb"
    config = {"stage": "weak-sft", "tracking": {"backend": "tensorboard", "uri": str(logdir)},
              "training": {"learning_rate": 0.001}}
    with session_scope(settings.database_url) as session:
        pipeline = Pipeline(config={"weak": "w", "seed": 3}, state="running")
        session.add(pipeline)
        session.flush()
        round_ = Round(stage="weak-sft", iteration=1, state="running", config=config,
                       resolved={"task": "gsm8k", "student_id": 1, "baseline_id": 1, "lineage_root_id": 1, "eval_id": 1,
                                 "train_id": 1}, pipeline_id=pipeline.id, pipeline_step="weak-sft")
        session.add(round_)
        session.flush()
        ids = pipeline.id, round_.id
        spec = training_run_spec(session, settings, round_.id, variant="gold", job_id=7, attempt=1,
                                 checkpoint="round1-gold")
    with session_scope(settings.database_url) as session:  # a second job of the round: the same run
        assert round_run(session, settings, ids[1]).run_id == spec["parent_run_id"]

    assert spec["parent_run_id"] == f"pipeline-{ids[0]}/round-{ids[1]}-weak-sft"
    job_run = open_run(TrackingTarget("tensorboard", spec["uri"]), name=spec["run_name"],
                       parent_run_id=spec["parent_run_id"], tags=spec["tags"])
    job_run.log_metrics({"loss": 2.0, "lr": 0.001}, step=1)
    job_run.end()
    assert job_run.run_id.startswith(spec["parent_run_id"] + "/train-gold")

    with session_scope(settings.database_url) as session:
        session.get(Round, ids[1]).state = "done"
        session.get(Pipeline, ids[0]).state = "stopped"
    record_round_end(settings, ids[1])
    record_round_end(settings, ids[1])  # a second caller logs nothing more
    with session_scope(settings.database_url) as session:
        runs = session.query(TrackingRun).order_by(TrackingRun.id).all()
        assert [(r.owner, r.ended_at is not None) for r in runs] == [("pipeline", True), ("round", True)]

    def texts(run_dir):
        events = EventAccumulator(str(logdir / run_dir), size_guidance={"tensors": 0})
        events.Reload()
        return {tag.rsplit("/text_summary", 1)[0]: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
                for tag in events.Tags()["tensors"]}, events

    pipeline_texts, _ = texts(f"pipeline-{ids[0]}")
    assert pipeline_texts["params/seed"] == ["3"] and pipeline_texts["tags/w2s.state"] == ["stopped"]
    round_texts, _ = texts(spec["parent_run_id"])
    assert round_texts["params/training.learning_rate"] == ["0.001"]
    assert round_texts["tags/w2s.pipeline_id"] == [str(ids[0])] and round_texts["status"] == ["FINISHED"]
    job_texts, job_events = texts(job_run.run_id)
    assert job_texts["tags/w2s.checkpoint"] == ["round1-gold"] and job_texts["tags/w2s.job_id"] == ["7"]
    assert [(e.step, e.value) for e in job_events.Scalars("loss")] == [(1, 2.0)]


def test_an_unreachable_server_is_a_warning_and_a_count(caplog):
    """A closed port with MLflow's retries as w2s sets them: the run is off at once, the worker's
    counter goes up, nothing raises."""
    import time

    from prometheus_client import REGISTRY

    import workers.telemetry  # noqa: F401  (registers the counter)

    def counted() -> float:
        return REGISTRY.get_sample_value("w2s_worker_tracking_failures_total", {"backend": "mlflow"}) or 0.0

    before, failures = counted(), tracking.FAILURES["mlflow"]
    target = TrackingTarget("mlflow", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="w2s.tracking"):
        run = open_run(target, name="train:weak", tags={"w2s.job_id": 1})
        run.log_metrics({"loss": 1.0}, step=1)
        run.end()
    assert time.monotonic() - started < 60, "an unreachable server held the job up"
    assert not run.active and run.run_id is None
    assert tracking.FAILURES["mlflow"] == failures + 1 and counted() == before + 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "w2s.tracking"]
    assert len(warnings) == 1 and "tracking (mlflow at http://127.0.0.1:" in warnings[0]
    assert "the job goes on without it" in warnings[0]


def test_tracking_libraries_load_only_when_tracking_is_on():
    """With tracking off, a worker and a training rank import neither MLflow nor TensorBoard."""
    code = ("import sys, cli.main, services.tracking, workers.runner, workers.steps, workers.telemetry, "
            "models.train.sft, models.train.preference\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard') "
            "or m.startswith('torch.utils.tensorboard'))\n"
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
