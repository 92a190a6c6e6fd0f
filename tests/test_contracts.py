"""The typed contracts: job keys parsed and formatted in one place, states stored as their strings."""

from __future__ import annotations

import json

import pytest

from services.contracts import (CheckpointStatus, JobKey, JobKeyError, JobKind, JobState, ResolvedPreference,
                                ResolvedSFT, ResolvedWeakSFT, RoundState, StepName, parse_resolved, resolved_of)
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
    ("evaluate:x:icl", "expected evaluate:<subject> or evaluate:pass-at-k:<subject>"),
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

# The JSON objects rounds of each stage stored before the models existed (from a test database).
STORED = {
    "sft": {"task": "gsm8k", "weak_id": 1, "strong_id": 2, "student_id": 2, "baseline_id": 2, "lineage_root_id": 2,
            "pool_id": 1, "eval_id": 2, "question_ids": [1, 2, 3], "demonstration_ids": [7, 9]},
    "weak-sft": {"task": "gsm8k", "student_id": 1, "baseline_id": 1, "lineage_root_id": 1, "train_id": 3, "eval_id": 2},
    "preference": {"task": "math", "student_id": 5, "weak_id": 1, "weak_round_id": 4, "baseline_id": 5,
                   "lineage_root_id": 2, "pool_id": 1, "eval_id": 2, "question_ids": [1, 3]},
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
    Row.stage, Row.resolved = "sft", {**STORED["sft"], "question_ids": "many"}
    with pytest.raises(InputError, match=r"round 12: resolved ids are not a sft round's: question_ids: "):
        resolved_of(Row())
    Row.stage = "stage-iv"
    with pytest.raises(InputError, match="round 12: unknown stage 'stage-iv'"):
        resolved_of(Row())
