"""The typed contracts: job keys parsed and formatted in one place, states stored as their strings."""

from __future__ import annotations

import json

import pytest

from services.contracts import (
    CheckpointStatus,
    JobKey,
    JobKeyError,
    JobKind,
    JobState,
    ResolvedPreference,
    ResolvedSFT,
    ResolvedWeakSFT,
    RoundState,
    StepName,
    TrainPayload,
    TrainResult,
    parse_resolved,
    payload_of,
    resolved_of,
    result_of,
)
from services.errors import InputError

EVERY_FORM = ["generate:weak:0000", "generate:strong:0012", "generate:student:12345", "vote", "pairs", "promote",
              "train:icl", "train:gold", "train:dpo", "evaluate:baseline", "evaluate:hybrid",
              "evaluate:pass-at-k:student", "evaluate:pass-at-k:orpo"]


@pytest.mark.parametrize("key", EVERY_FORM)
def test_job_key_round_trips(key):
    parsed = JobKey.parse(key)
    assert str(parsed) == key
    assert JobKey.parse(str(parsed)) == parsed


def test_job_key_fields_and_steps():
    chunk = JobKey.parse("generate:strong:0012")
    assert (chunk.kind, chunk.subject, chunk.chunk) == (JobKind.GENERATE, "strong", 12)
    assert chunk.step == "generate:strong"  # the jobs.step column
    assert str(chunk.display_step) == "generate:strong"
    pass_at_k = JobKey.parse("evaluate:pass-at-k:icl")
    assert (pass_at_k.kind, pass_at_k.subject, pass_at_k.pass_at_k) == (JobKind.EVALUATE, "icl", True)
    assert pass_at_k.step == "evaluate"
    assert str(pass_at_k.display_step) == "evaluate:pass-at-k:icl" and pass_at_k.display_step.detail == "pass-at-k:icl"
    assert JobKey.parse("train:icl").step == "train" and JobKey.parse("vote").step == "vote"


def test_constructors_format_the_keys_planning_writes():
    assert str(JobKey.generate("weak", 3)) == "generate:weak:0003"
    assert str(JobKey.train("hybrid")) == "train:hybrid"
    assert str(JobKey.evaluate("baseline")) == "evaluate:baseline"
    assert str(JobKey.evaluate("dpo", pass_at_k=True)) == "evaluate:pass-at-k:dpo"
    assert str(JobKey.single(JobKind.PROMOTE)) == "promote"
    assert JobKey.evaluate("icl") != JobKey.evaluate("icl", pass_at_k=True)  # two jobs, two keys


@pytest.mark.parametrize("key, says", [
    ("", "unknown kind ''"),
    ("frobnicate:weak", "unknown kind 'frobnicate'"),
    ("generate:weak", "expected generate:<voter>:<chunk number>"),
    ("generate:weak:3", "not in its canonical form 'generate:weak:0003'"),
    ("generate:weak:abc", "expected generate:<voter>:<chunk number>"),
    ("generate::0001", "subject '' must be a non-empty name"),
    ("vote:weak", "expected vote"),
    ("train", "expected train:<variant>"),
    ("train:", "subject '' must be a non-empty name"),
    ("train:a:b", "expected train:<variant>"),
    ("evaluate:x:icl", "expected evaluate:<subject>, evaluate:pass-at-k:<subject> or evaluate:report-on:<subject>"),
    ("promote:", "expected promote"),
])
def test_malformed_keys_are_refused_naming_the_key(key, says):
    with pytest.raises(JobKeyError) as caught:
        JobKey.parse(key)
    message = str(caught.value)
    assert message.startswith(f"job key {key!r}: ") and says in message and "\n" not in message
    assert isinstance(caught.value, InputError)  # the CLI prints it as a one-line user error


def test_keys_cannot_be_built_wrong_either():
    with pytest.raises(JobKeyError, match="needs subject"):
        JobKey(JobKind.TRAIN)
    with pytest.raises(JobKeyError, match="only a generate key has a chunk"):
        JobKey(JobKind.TRAIN, "icl", chunk=1)
    with pytest.raises(JobKeyError, match="only an evaluate key can be pass@k"):
        JobKey(JobKind.TRAIN, "icl", pass_at_k=True)
    with pytest.raises(JobKeyError, match="unknown kind 'sing'"):
        JobKey("sing")  # type: ignore[arg-type]


@pytest.mark.parametrize("step", ["generate:weak", "generate:student", "vote", "train:icl", "evaluate:baseline",
                                  "evaluate:pass-at-k:student"])
def test_step_names_round_trip(step):
    assert str(StepName.parse(step)) == step


def test_a_job_key_is_not_a_step_name():
    with pytest.raises(JobKeyError, match="step 'generate:weak:0001'"):
        StepName.parse("generate:weak:0001")


def test_states_are_their_strings():
    """The database keeps storing the same text: rows written before the enums read back equal."""
    assert JobState.DONE == "done" and RoundState.CANCELLED == "cancelled" and CheckpointStatus.PROMOTED == "promoted"
    assert JobState("queued") is JobState.QUEUED
    assert f"{JobState.RUNNING:<8}|" == "running |" and str(JobKind.TRAIN) == "train"
    assert json.dumps({"outcome": CheckpointStatus.REJECTED}) == '{"outcome": "rejected"}'


# --- resolved rounds -----------------------------------------------------------------------------

# The JSON objects rounds of each stage stored before the models existed (from a test database),
# with the pool's question ids moved out by migration 0010 (their count stays).
STORED = {
    "sft": {"task": "gsm8k", "weak_id": 1, "strong_id": 2, "student_id": 2, "baseline_id": 2, "lineage_root_id": 2,
            "pool_id": 1, "eval_id": 2, "question_count": 3, "demonstration_ids": [7, 9]},
    "weak-sft": {"task": "gsm8k", "student_id": 1, "baseline_id": 1, "lineage_root_id": 1, "train_id": 3, "eval_id": 2},
    "preference": {"task": "math", "student_id": 5, "weak_id": 1, "weak_round_id": 4, "baseline_id": 5,
                   "lineage_root_id": 2, "pool_id": 1, "eval_id": 2, "question_count": 2},
}


@pytest.mark.parametrize("stage", sorted(STORED))
def test_resolved_rounds_read_and_write_the_stored_shape(stage):
    parsed = parse_resolved(stage, STORED[stage])
    assert type(parsed) is {"sft": ResolvedSFT, "weak-sft": ResolvedWeakSFT, "preference": ResolvedPreference}[stage]
    assert parsed.stored() == STORED[stage]


def test_demonstrations_are_absent_until_chosen():
    before = {k: v for k, v in STORED["sft"].items() if k != "demonstration_ids"}
    parsed = parse_resolved("sft", before)
    assert parsed.demonstration_ids is None and "demonstration_ids" not in parsed.stored()
    chosen = parsed.model_copy(update={"demonstration_ids": []})  # K = 0: chosen, and empty
    assert chosen.stored()["demonstration_ids"] == []


def test_accessor_checks_the_stage_and_names_the_round():
    class Row:
        id, stage, resolved = 12, "weak-sft", STORED["weak-sft"]

    assert resolved_of(Row()).train_id == 3
    assert resolved_of(Row()).voters() == {}
    with pytest.raises(InputError, match="round 12 is a weak-sft round"):
        resolved_of(Row(), ResolvedSFT)
    Row.stage, Row.resolved = "sft", {**STORED["sft"], "question_count": "many"}
    with pytest.raises(InputError, match=r"round 12: resolved ids are not a sft round's: question_count: "):
        resolved_of(Row())
    Row.resolved = {**STORED["sft"], "question_ids": [1, 2, 3]}  # a database not migrated past 0010
    with pytest.raises(InputError, match=r"round 12: .*question_ids.*predates migration 0010 \(run `w2sctl db upgrade`\)"):
        resolved_of(Row())
    Row.stage = "stage-iv"
    with pytest.raises(InputError, match="round 12: unknown stage 'stage-iv'"):
        resolved_of(Row())


# --- the step graph ------------------------------------------------------------------------------

def _round(stage: str, **fields):
    from db.schema import Round
    from services.config import parse_round_config

    config = parse_round_config({"stage": stage, "eval": {"dataset": "test"}, **fields}, "test")
    resolved = {**STORED[stage], **({"report_on_id": 99} if config.eval.report_on else {})}
    return Round(id=1, stage=stage, iteration=1, state="running", config=config.model_dump(mode="json"),
                 resolved=resolved), config


def _run_planning(stage: str, **fields) -> list[str]:
    """Plan a round to the end, every job finishing as soon as it is planned (each train job with a
    candidate); the steps in the order they were first planned."""
    from unittest import mock

    from db.schema import Job
    from services.rounds import plan_round

    round_, config = _round(stage, **fields)
    pool = list(range(1, STORED[stage].get("question_count", 0) + 1))
    jobs, seen = {}, []
    # No database here: the round's pool ids (rows of round_questions) come from a list.
    with mock.patch("services.rounds.round_question_ids", lambda session, round_id, start=0, stop=None: pool[start:stop]):
        return _plan_until_settled(plan_round, round_, config, jobs, seen, Job)


def _plan_until_settled(plan_round, round_, config, jobs, seen, Job) -> list[str]:
    for _ in range(20):
        new = [spec for spec in plan_round(None, round_, config, jobs) if spec.key not in jobs]
        if not new:
            return seen
        for spec in new:
            result = {"checkpoint_id": 100 + len(jobs)} if spec.kind == JobKind.TRAIN else {"accuracy": 0.5}
            jobs[spec.key] = Job(key=str(spec.key), kind=spec.kind, queue=spec.queue, state="done", result=result,
                                 payload=spec.payload)
            if str(spec.key.display_step) not in seen:
                seen.append(str(spec.key.display_step))
    raise AssertionError(f"planning did not settle: {seen}")


@pytest.mark.parametrize("stage, fields", [
    ("sft", {"weak": "w", "strong": "s", "pool": "p", "variants": ["hybrid", "icl"], "demonstrations": 0}),
    ("sft", {"weak": "w", "strong": "s", "pool": "p", "variants": ["hybrid", "icl"], "demonstrations": 0,
             "training": {"grid": {"learning_rate": [1e-4, 3e-4]}}, "eval": {"dataset": "dev", "report_on": "test"}}),
    ("weak-sft", {"weak": "w", "train": "t", "eval": {"dataset": "dev", "report_on": "test"}}),
    ("preference", {"student": "s", "weak": "w", "pool": "p", "training": {"loss": "dpo", "grid": {"beta": [0.1, 1]}},
                    "eval": {"dataset": "dev", "report_on": "test"}}),
    ("weak-sft", {"weak": "w", "train": "t"}),
    ("preference", {"student": "s", "weak": "w", "pool": "p", "training": {"loss": "orpo"}}),
    ("preference", {"student": "s", "weak": "w", "pool": "p", "sampling": {"pass_at_k": False},
                    "training": {"loss": "dpo", "grid": {"beta": [0.1, 1]}}}),
])
def test_each_stage_plans_its_steps_in_the_graphs_order(stage, fields):
    from services.contracts.graph import reports_on, reports_pass_at_k, stage_steps, variants_of
    from services.monitor import expected_steps

    round_, _ = _round(stage, **fields)
    graph = [str(step) for step in stage_steps(stage, variants_of(stage, round_.config),
                                               report_on=reports_on(round_.config),
                                               pass_at_k=reports_pass_at_k(round_.config))]
    assert any("pass-at-k" in step for step in graph) == (stage == "preference" and "sampling" not in fields)
    assert _run_planning(stage, **fields) == graph
    assert expected_steps(stage, round_.config) == graph  # the progress view shows the same steps


def test_a_planned_job_the_graph_does_not_have_is_an_error(monkeypatch):
    from services.contracts import graph

    without_vote = tuple(step for step in graph.STAGE_STEPS[graph.Stage.SFT] if step != "vote")
    monkeypatch.setitem(graph.STAGE_STEPS, graph.Stage.SFT, without_vote)
    with pytest.raises(graph.StepGraphError, match="step graph of a sft round has no step for job vote"):
        _run_planning("sft", weak="w", strong="s", pool="p", demonstrations=0)


def test_queues_and_delivery_defaults_come_from_the_graph():
    from services.contracts.graph import JOB_STEP_ORDER, KINDS, job_summary, queue_of
    from services.report import STEP_ORDER
    from services.settings import JOB_KINDS, load_settings

    assert set(KINDS) == set(JobKind)  # every kind has its row
    delivery = load_settings({}).delivery
    assert JOB_KINDS == tuple(KINDS) and delivery.lease("train") == 600.0 and delivery.time_limit("vote") == 3600.0
    assert [queue_of(JobKey.parse(k)) for k in ("generate:weak:0000", "generate:student:0001", "train:icl",
                                                "evaluate:baseline", "vote", "promote")] == \
        ["weak", "strong", "train", "strong", "control", "control"]
    with pytest.raises(JobKeyError, match="unknown voter 'judge'"):
        queue_of(JobKey.generate("judge", 0))
    assert STEP_ORDER == JOB_STEP_ORDER == ("generate:weak", "generate:strong", "generate:student", "vote", "pairs",
                                            "train", "evaluate", "promote")
    assert job_summary("evaluate", {"accuracy": 0.41, "reused": False}) == "accuracy=41.0%"
    assert job_summary("vote", {"kept": 3, "examples": {"icl": 3}, "pool": 9}) == "kept=3 examples={'icl': 3}"
    assert job_summary("train", {"checkpoint_id": None, "skipped": "no pairs"}) == "skipped=no pairs"


def test_every_kind_has_a_handler_and_its_contracts():
    from services.contracts.jobs import PAYLOADS, RESULTS
    from workers.steps import HANDLERS

    assert set(HANDLERS) == set(PAYLOADS) == set(RESULTS) == set(JobKind)


# --- payloads and results ------------------------------------------------------------------------

# JSON objects jobs stored before the models existed, per kind: (payload, result).
STORED_JOBS = {
    "generate": ({"voter": "weak", "question_ids": [1, 2]}, {"generated": 2, "questions": 2, "samples_per_question": 1}),
    "vote": ({}, {"pool": 3, "voted": 3, "kept": 2, "dropped_by_step_score": 0, "examples": {"weak": 2, "icl": 2}}),
    "pairs": ({}, {"questions": 2, "pairs": 1, "by_case": {"weak_chosen": 1}, "skipped": {"below_floor": 1}}),
    "train": ({"variant": "icl"}, {"checkpoint_id": 7, "examples": 2, "train": {"final_loss": 1.5, "steps": 2},
                                   "saved": {"tensors": 10}}),
    "evaluate": ({"checkpoint_id": 2, "dataset_id": 2, "limit": None, "pass_at": 4, "temperature": 1.0, "top_p": 1.0},
                 {"evaluation_id": 3, "accuracy": 0.25, "reused": False}),
    "promote": ({"candidates": {"icl": 7}}, {"outcome": "rejected", "promoted": None, "reason": "no gain",
                                             "baseline": "strong", "baseline_accuracy": 0.5, "candidates": {"r1-icl": 0.25}}),
}


class _JobRow:
    def __init__(self, kind, payload, result, id=5):
        self.id, self.kind, self.payload, self.result = id, kind, payload, result


@pytest.mark.parametrize("kind", sorted(STORED_JOBS))
def test_payloads_and_results_read_and_write_the_stored_shape(kind):
    payload, result = STORED_JOBS[kind]
    job = _JobRow(kind, payload, result)
    assert payload_of(job).stored() == payload
    assert result_of(job).stored() == result


def test_results_of_jobs_that_have_none_yet_and_train_records():
    assert result_of(_JobRow("train", {"variant": "icl"}, None)) is None
    skipped = result_of(_JobRow("train", {"variant": "icl"}, {"checkpoint_id": None, "skipped": "no examples"}), TrainResult)
    assert skipped.checkpoint_id is None and skipped.skipped == "no examples"
    launch_only = {"launch": {"failure": "rank 0 exited 1"}}  # a failed attempt's record, while it is retried
    assert result_of(_JobRow("train", {"variant": "icl"}, launch_only)).stored() == launch_only


def test_payload_and_result_errors_name_the_job():
    with pytest.raises(InputError, match="job 5 is a vote job, not a TrainPayload's"):
        payload_of(_JobRow("vote", {}, None), TrainPayload)
    with pytest.raises(InputError, match="job 5 payload is not a GeneratePayload: question_ids: "):
        payload_of(_JobRow("generate", {"voter": "weak", "question_ids": "all"}, None))
    with pytest.raises(InputError, match="job 5 result is not a EvaluateResult: accuracy: Field required"):
        result_of(_JobRow("evaluate", STORED_JOBS["evaluate"][0], {"evaluation_id": 3}))


def test_a_job_spec_carries_its_kinds_payload():
    from services.rounds import JobSpec

    assert JobSpec(JobKey.train("icl"), TrainPayload(variant="icl")).queue == "train"
    with pytest.raises(TypeError, match="job vote: a TrainPayload is not a vote job's payload"):
        JobSpec(JobKey.single(JobKind.VOTE), TrainPayload(variant="icl"))
