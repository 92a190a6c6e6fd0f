"""Monitoring without a live round: the progress rules, the report figure, structured logs, job
retry on an embedded database, and the operator commands' errors."""

from __future__ import annotations

import io
import json
import logging
import math

import pytest
from sqlalchemy import select

from db.schema import Job, Pipeline, Round
from db.session import session_scope
from services.config import ConfigError, parse_round_config
from services.contracts import JobKey
from services.errors import StateError
from services.monitor import StepProgress, estimate, expected_steps, overall_progress, report_figure, step_state
from services.settings import load_settings

# --- progress rules ------------------------------------------------------------------------------


def test_step_state_from_job_states():
    assert step_state([]) == "waiting"
    assert step_state(["queued", "queued"]) == "queued"
    assert step_state(["done", "queued"]) == "running"  # part of the step is done
    assert step_state(["done", "running", "queued"]) == "running"
    assert step_state(["done", "failed", "running"]) == "failed"
    assert step_state(["done", "done"]) == "done"
    assert step_state(["done", "cancelled"]) == "cancelled"


def test_estimate_rate_and_eta():
    assert estimate(0, 100, 10.0) == (None, None)  # nothing done: no pace yet
    assert estimate(5, 100, 0.0) == (None, None)
    rate, eta = estimate(25, 100, 50.0)
    assert rate == pytest.approx(0.5) and eta == pytest.approx(150.0)
    assert estimate(10, None, 5.0) == (2.0, None)  # total unknown: a rate, no ETA


def test_expected_steps_per_stage():
    assert expected_steps("sft", {"variants": ["weak", "hybrid"]}) == [
        "evaluate:baseline", "generate:weak", "generate:strong", "vote", "train:weak", "train:hybrid",
        "evaluate:weak", "evaluate:hybrid", "promote"]
    assert expected_steps("preference", {"training": {"loss": "orpo"}})[-4:] == [
        "train:orpo", "evaluate:orpo", "evaluate:pass-at-k:orpo", "promote"]
    # A sweep turns pass@k off: its steps are not waited for.
    assert not any("pass-at-k" in step for step in expected_steps("preference", {"training": {"loss": "dpo"}, "sampling": {"pass_at_k": False}}))
    assert expected_steps("weak-sft", {}) == ["evaluate:baseline", "train:gold", "evaluate:gold", "promote"]


def test_overall_progress_is_the_mean_of_the_steps():
    steps = [StepProgress("generate:weak", "questions", 30, 40, "running"),  # 0.75
             StepProgress("vote", "jobs", 0, None, "waiting"),  # 0
             StepProgress("train:weak", "steps", 0, 0, "skipped"),  # nothing to train counts as complete
             StepProgress("evaluate:baseline", "questions", 20, 20, "done")]
    assert steps[0].fraction == 0.75 and steps[2].fraction == 1.0
    assert overall_progress("running", steps) == pytest.approx((0.75 + 0 + 1 + 1) / 4)
    assert overall_progress("done", steps) == 1.0


# --- the report figure ---------------------------------------------------------------------------


def test_report_figure_plots_the_lineage_and_the_votes(tmp_path):
    from services.monitor import save_report_plot

    report = {
        "round": 3, "pipeline": 1,
        "lineage": [{"checkpoint": "strong", "round": None, "status": "base", "accuracy": 0.40},
                    {"checkpoint": "round1-hybrid", "round": 1, "status": "promoted", "accuracy": 0.448},
                    {"checkpoint": "round2-hybrid", "round": 2, "status": "rejected", "accuracy": 0.444},
                    {"checkpoint": "round3-dpo", "round": 3, "status": "candidate", "accuracy": None}],
        "rounds": [{"round": 1, "step": "iteration1", "kept_share": 0.117, "kept_accuracy": 0.908},
                   {"round": 2, "step": "iteration2", "kept_share": 0.2, "kept_accuracy": 0.85},
                   {"round": 3, "step": "preference", "kept_share": None, "kept_accuracy": None}],
    }
    figure = report_figure(report)
    top, bottom = figure.axes[:2]
    accuracy = list(top.lines[0].get_ydata())
    assert accuracy[:3] == [0.40, 0.448, 0.444] and math.isnan(accuracy[3])  # not evaluated yet: a gap
    assert [t.get_text() for t in top.get_xticklabels()] == ["strong", "round1-hybrid", "round2-hybrid", "round3-dpo"]
    kept_share, kept_accuracy = bottom.lines[0], bottom.lines[1]
    assert list(kept_share.get_ydata()) == [0.117, 0.2]  # the stage II round has no vote
    assert list(kept_accuracy.get_ydata()) == [0.908, 0.85]
    assert kept_share.get_label() == "kept share" and "pseudo-label" in kept_accuracy.get_label()

    path = save_report_plot(report, tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left
    from services.errors import InputError

    with pytest.raises(InputError, match="ending in .png"):
        save_report_plot(report, tmp_path / "report.jpg")
    with pytest.raises(InputError, match="does not exist"):
        save_report_plot(report, tmp_path / "missing" / "report.png")


# --- structured logs -----------------------------------------------------------------------------


def test_json_logs_carry_round_and_job_ids():
    from services.logs import bind_job, clear_job, configure_logging

    stream = io.StringIO()
    handler = configure_logging(logging.INFO, "json", stream=stream)
    try:
        bind_job(round_id=7, job_id=42, attempt=2)
        logging.getLogger("w2s.worker").info("generating %d questions", 3)
        logging.getLogger("some.library").warning("a library's line")
        logging.getLogger("w2s.worker").info("explicit ids win", extra={"job_id": 43})
        clear_job()
        logging.getLogger("w2s.worker").info("between jobs")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("w2s.worker").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
        clear_job()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["round_id"], line["job_id"], line["attempt"]) for line in lines[:2]] == [(7, 42, 2), (7, 42, 2)]
    assert lines[0]["message"] == "generating 3 questions" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "some.library"
    assert lines[2]["job_id"] == 43
    assert lines[3]["round_id"] is None and lines[3]["job_id"] is None
    assert "RuntimeError: boom" in lines[4]["exception"]


def test_text_logs_and_a_bad_format(monkeypatch):
    from services.logs import bind_job, clear_job, configure_logging

    stream = io.StringIO()
    handler = configure_logging(logging.INFO, "text", stream=stream)
    try:
        bind_job(round_id=3, job_id=9)
        logging.getLogger("w2s.worker").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
        clear_job()
    assert "[round=3 job=9] hello" in stream.getvalue()
    with pytest.raises(ConfigError, match="W2S_LOG_FORMAT='xml': Input should be 'text' or 'json'"):
        load_settings({"W2S_LOG_FORMAT": "xml"})
    assert load_settings({"W2S_LOG_FORMAT": " JSON"}).log_format == "json"


# --- retry, on an embedded database --------------------------------------------------------------


def _round_with_jobs(session, jobs: list[tuple[str, str, int]], *, round_state="failed", pipeline=False) -> Round:
    """A stage I round with no questions (nothing to plan beyond the baseline evaluation) and the given jobs."""
    config = parse_round_config({"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "t"},
                                 "demonstrations": 0}, "test")
    pipe = None
    if pipeline:
        pipe = Pipeline(config={}, state="stopped", reason="iteration1 round failed")
        session.add(pipe)
        session.flush()
    round_ = Round(stage="sft", iteration=1, state=round_state, config=config.model_dump(mode="json"),
                   resolved={"task": "gsm8k", "weak_id": 1, "strong_id": 1, "student_id": 1, "baseline_id": 1,
                             "lineage_root_id": 1, "pool_id": 1, "eval_id": 1, "question_count": 0},
                   error="job 1 (evaluate:baseline) failed: boom" if round_state == "failed" else None,
                   pipeline_id=pipe.id if pipe else None, pipeline_step="iteration1" if pipe else None)
    session.add(round_)
    session.flush()
    for key, state, attempts in jobs:
        parsed = JobKey.parse(key)
        session.add(Job(round_id=round_.id, key=key, step=parsed.step, kind=parsed.kind, queue="strong", state=state, attempts=attempts, max_attempts=3,
                        payload={"checkpoint_id": 1, "dataset_id": 1, "limit": None}, error="boom" if state == "failed" else None))
    session.flush()
    return round_


def test_retry_reopens_the_failed_round_and_its_cancelled_jobs(w2s_home, cli_runner):
    from services.operations import retry_job

    cli_runner("round", "list")  # migrates the embedded database
    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = _round_with_jobs(session, [("evaluate:baseline", "failed", 3), ("generate:weak:0000", "cancelled", 0)],
                                  pipeline=True)
        round_id, pipeline_id = round_.id, round_.pipeline_id
        failed_id = session.scalar(select(Job.id).where(Job.key == "evaluate:baseline"))
    with session_scope(url) as session:
        to_send = retry_job(session, failed_id, load_settings().delivery)
    with session_scope(url) as session:
        jobs = {j.key: j for j in session.scalars(select(Job).where(Job.round_id == round_id))}
        assert sorted(to_send) == sorted(j.id for j in jobs.values())
        retried = jobs["evaluate:baseline"]
        # The attempt count goes on (it fences writes); the budget grows by one.
        assert (retried.state, retried.attempts, retried.max_attempts) == ("queued", 3, 4)
        assert retried.started_at is None and retried.owner is None
        assert jobs["generate:weak:0000"].state == "queued"
        round_ = session.get(Round, round_id)
        assert (round_.state, round_.error) == ("running", None)
        assert session.get(Pipeline, pipeline_id).state == "running"

    with session_scope(url) as session:  # a second retry: the job is no longer failed
        with pytest.raises(StateError, match=r"is queued: it is already waiting for a worker; only a failed job"):
            retry_job(session, failed_id, load_settings().delivery)


def test_jobs_retry_and_show_refuse_clearly(w2s_home, cli_runner):
    cli_runner("round", "list")
    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = _round_with_jobs(session, [("evaluate:baseline", "done", 1)], round_state="running")
        done_id = session.scalar(select(Job.id).where(Job.round_id == round_.id))
    result = cli_runner("jobs", "retry", done_id, ok=False)
    assert result.exit_code == 1
    assert f"job {done_id} (evaluate:baseline, round {round_.id}) is done: it finished; only a failed job can be retried" \
        in result.output
    with session_scope(url) as session:
        assert session.get(Job, done_id).state == "done"  # nothing changed
    for command in (["jobs", "retry", 999], ["jobs", "show", 999]):
        result = cli_runner(*command, ok=False)
        assert result.exit_code == 1 and "job 999 does not exist" in result.output
    result = cli_runner("jobs", "retry", done_id, "--attempts", 0, ok=False)
    assert result.exit_code == 1 and "--attempts: 0 must be at least 1" in result.output
    result = cli_runner("round", "report", 999, ok=False)
    assert result.exit_code == 1 and "round 999 does not exist" in result.output
    shown = cli_runner("jobs", "show", done_id).output
    assert "evaluate:baseline" in shown and "attempts" in shown and "1 of 3" in shown


def test_queues_without_a_broker(w2s_home, cli_runner):
    result = cli_runner("queues")
    assert "no broker" in result.output and "W2S_BROKER_URL is not set" in result.output
    status = json.loads(cli_runner("queues", "--json").output)
    assert status["broker"] is None and status["workers"] == []
    assert [q["queue"] for q in status["queues"]] == ["weak", "strong", "train", "control"]
    assert all(q["depth"] is None and q["queued_jobs"] == 0 for q in status["queues"])


# --- a pipeline's report: the rounds and the lineage ---------------------------------------------


def test_pipeline_report_follows_the_lineage(w2s_home, cli_runner, tmp_path):
    """Two rounds of a pipeline, written as rows: iteration 1 trains weak and icl candidates from
    the base strong model (icl promoted), iteration 2 trains hybrid and compares it with icl."""
    from db.schema import Checkpoint, Dataset, Evaluation
    from services.monitor import full_report

    cli_runner("round", "list")
    url = load_settings().database_url
    with session_scope(url) as session:
        test_set = Dataset(name="test", task="gsm8k", labelled=True, source="x", size=50)
        session.add(test_set)
        pipe = Pipeline(config={}, state="done")
        session.add_all([pipe])
        session.flush()
        ckpt = {}
        for name, status, _parent in (("weak", "base", None), ("strong", "base", None)):
            ckpt[name] = Checkpoint(name=name, path=f"/m/{name}", role="strong", status=status, metrics={})
            session.add(ckpt[name])
        session.flush()
        config = parse_round_config({"stage": "sft", "weak": "weak", "strong": "strong", "pool": "p",
                                     "eval": {"dataset": "test"}}, "test").model_dump(mode="json")
        rounds = []
        for index, (step, baseline, report) in enumerate((
                ("iteration1", "strong", {"kept_share": 0.12, "kept_accuracy": 0.9}),
                ("iteration2", "round1-icl", {"kept_share": 0.3, "kept_accuracy": 0.8}))):
            r = Round(stage="sft", iteration=index + 1, state="done", config=config, pipeline_id=pipe.id,
                      pipeline_step=step, outcome="promoted", report=report,
                      resolved={"task": "gsm8k", "weak_id": ckpt["weak"].id, "strong_id": ckpt["strong"].id,
                                "student_id": ckpt[baseline].id, "baseline_id": ckpt[baseline].id,
                                "lineage_root_id": ckpt["strong"].id, "pool_id": test_set.id, "eval_id": test_set.id,
                                "question_count": 0})
            session.add(r)
            session.flush()
            rounds.append(r)
            variants = ("weak", "icl") if index == 0 else ("hybrid",)
            for variant in variants:
                name = f"round{r.id}-{variant}"
                ckpt[name] = Checkpoint(name=name, path=f"/c/{name}", role="strong", round_id=r.id, variant=variant,
                                        parent_id=ckpt["strong"].id,
                                        status="promoted" if variant in ("icl", "hybrid") else "rejected", metrics={})
                session.add(ckpt[name])
                session.flush()
        accuracy = {"strong": 0.40, "round1-weak": 0.42, "round1-icl": 0.45, "round2-hybrid": 0.47}
        evaluation = {}
        for name, value in accuracy.items():
            evaluation[name] = Evaluation(checkpoint_id=ckpt[name].id, dataset_id=test_set.id, strategy="cot/0-shot",
                                          n_questions=50, correct=int(value * 50), accuracy=value, input_tokens=0,
                                          output_tokens=0, wall_s=1.0)
            session.add(evaluation[name])
        session.flush()
        for r, keys in ((rounds[0], {"baseline": "strong", "weak": "round1-weak", "icl": "round1-icl"}),
                        (rounds[1], {"baseline": "round1-icl", "hybrid": "round2-hybrid"})):
            for key, name in keys.items():
                session.add(Job(round_id=r.id, key=f"evaluate:{key}", step="evaluate", kind="evaluate", queue="strong",
                                state="done", payload={"checkpoint_id": ckpt[name].id, "dataset_id": test_set.id},
                                result={"evaluation_id": evaluation[name].id, "accuracy": accuracy[name]}))
        second = rounds[1].id

    with session_scope(url) as session:
        report = full_report(session, second)
    assert [r["round"] for r in report["rounds"]] == [second - 1, second]
    assert [(c["checkpoint"], c["status"], c["accuracy"]) for c in report["lineage"]] == [
        ("strong", "base", 0.40), ("round1-weak", "rejected", 0.42), ("round1-icl", "promoted", 0.45),
        ("round2-hybrid", "promoted", 0.47)]
    assert report["rounds"][1]["baseline"] == {"checkpoint": "round1-icl", "status": "promoted", "accuracy": 0.45,
                                               "eval_questions": 50}

    figure = report_figure(report)
    assert list(figure.axes[0].lines[0].get_ydata()) == [0.40, 0.42, 0.45, 0.47]
    assert list(figure.axes[1].lines[0].get_ydata()) == [0.12, 0.3]
    assert list(figure.axes[1].lines[1].get_ydata()) == [0.9, 0.8]

    out = tmp_path / "pipeline.png"
    text = cli_runner("round", "report", second, "--plot", out).output
    assert out.read_bytes()[:4] == b"\x89PNG" and f"pipeline {report['pipeline']}" in text and "plot written" in text


def test_queues_with_an_unreachable_broker(w2s_home, cli_runner, monkeypatch):
    monkeypatch.setenv("W2S_BROKER_URL", "redis://:secret@127.0.0.1:1/0")  # nothing listens on port 1
    result = cli_runner("queues", ok=False)
    assert result.exit_code == 1
    assert "the broker at redis://:***@127.0.0.1:1/0 (W2S_BROKER_URL) is unreachable" in result.output
    assert "secret" not in result.output


def test_heartbeat_log_lines_carry_the_job_ids():
    """The runner's heartbeat thread logs in the job's context (a new thread starts with none)."""
    import time
    from types import SimpleNamespace

    from services.logs import bind_job, clear_job, configure_logging
    from workers.runner import Heartbeat

    def unreachable() -> None:
        raise ConnectionError("database unreachable")

    stream = io.StringIO()
    handler = configure_logging(logging.INFO, "json", stream=stream)

    def failed_beats() -> list[dict]:
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [line for line in lines if "heartbeat failed" in line["message"]]

    try:
        bind_job(round_id=5, job_id=11, attempt=1)
        with Heartbeat(SimpleNamespace(job_id=11, beat=unreachable), 0.05, lease=60.0):
            # Until two beats have failed (a starved thread on a loaded machine may take a while).
            deadline = time.monotonic() + 60
            while len(failed_beats()) < 2:
                assert time.monotonic() < deadline, f"two failed heartbeats logged within 60 s: {stream.getvalue()!r}"
                time.sleep(0.05)
    finally:
        logging.getLogger().removeHandler(handler)
        clear_job()
    beats = failed_beats()
    assert beats and all((line["round_id"], line["job_id"]) == (5, 11) for line in beats)


def test_watch_into_a_pipe_shows_an_ended_round_in_full(w2s_home, cli_runner):
    """`round status --watch` into a pipe prints only what is under way as it goes; once the round has
    ended it prints the round in full (every step), as the live view does, and exits 1 for a failed round."""
    cli_runner("round", "list")  # migrates the embedded database
    with session_scope(load_settings().database_url) as session:
        done = _round_with_jobs(session, [("evaluate:baseline", "done", 1), ("generate:weak:0000", "done", 1)],
                                round_state="done").id
        failed = _round_with_jobs(session, [("evaluate:baseline", "failed", 3)]).id
    view = cli_runner("round", "status", done, "--watch", "--interval", "0.2").output
    assert "evaluate:baseline" in view and "generate:weak" in view, view
    result = cli_runner("round", "status", failed, "--watch", "--interval", "0.2", ok=False)
    assert result.exit_code == 1 and f"round {failed} failed: job 1 (evaluate:baseline) failed: boom" in result.output
