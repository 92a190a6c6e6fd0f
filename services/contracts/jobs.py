"""What each kind of job is given (`jobs.payload`) and what it records (`jobs.result`), one model
per kind. Stored as the same JSON objects as before these models existed: a model writes only
the fields it was given (`stored()`), and reads keep any field it does not know."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, Union, overload

from pydantic import BaseModel, ConfigDict, ValidationError

from services.contracts.graph import candidate_subject
from services.contracts.states import JobKind
from services.errors import InputError


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    def stored(self) -> dict[str, Any]:
        """The JSON object the row holds: the fields given, no defaults added."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- payloads ------------------------------------------------------------------------------------


class GeneratePayload(Contract):
    voter: str  # weak | strong (stage I) | student (stage II)
    question_ids: list[int]  # the chunk; never the texts


class VotePayload(Contract):
    pass


class PairsPayload(Contract):
    pass


class TrainPayload(Contract):
    variant: str  # the training set: weak | icl | hybrid | gold | dpo | orpo
    # A training grid's setting (hyper-parameter → value) over the round's training config; the
    # candidate is named after it (services.contracts.graph.candidate_subject). None: no grid.
    setting: dict[str, Any] | None = None

    @property
    def candidate(self) -> str:
        """The candidate's name within its round (the train job's subject): hybrid, hybrid-lr1e-4."""
        return candidate_subject(self.variant, self.setting or {})


class EvaluatePayload(Contract):
    checkpoint_id: int
    dataset_id: int
    limit: int | None = None  # the first N questions only
    # pass@k over k sampled answers instead of greedy accuracy
    pass_at: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    # A reasoning strategy (a StrategyConfig's fields) and few-shot count; None: the round's
    # eval.strategy and eval.shots (services.evaluation.round_eval_method).
    strategy: dict[str, Any] | None = None
    shots: int | None = None


class PromotePayload(Contract):
    candidates: dict[str, int]  # variant → candidate checkpoint id


Payload = Union[GeneratePayload, VotePayload, PairsPayload, TrainPayload, EvaluatePayload, PromotePayload]

PAYLOADS: dict[JobKind, type[Contract]] = {
    JobKind.GENERATE: GeneratePayload,
    JobKind.VOTE: VotePayload,
    JobKind.PAIRS: PairsPayload,
    JobKind.TRAIN: TrainPayload,
    JobKind.EVALUATE: EvaluatePayload,
    JobKind.PROMOTE: PromotePayload,
}


# --- results -------------------------------------------------------------------------------------


class GenerateResult(Contract):
    generated: int  # rows this attempt wrote (a retry skips what is in)
    questions: int
    samples_per_question: int
    engine: dict[str, Any] | None = None  # the backend that generated: {"name", "versions": {package: version}, "dtype"}
    # Output tokens of the samples this attempt generated: `round status` sums them per step from
    # the done jobs instead of reading every generation row (None in rows written before).
    output_tokens: int | None = None
    # Prompts cut to fit the model's context with room for max_new_tokens (models.prompts.fit_few_shot):
    # question id → demonstrations used, for those answered with fewer than the round's; question
    # id → why, for those not answered at all (their zero-shot prompt does not fit).
    fewer_demonstrations: dict[int, int] = {}
    skipped: dict[int, str] = {}


class VoteResult(Contract):
    pool: int
    voted: int  # questions both voters answered
    kept: int
    dropped_by_step_score: int
    examples: dict[str, int]  # variant → training examples


class PairsResult(Contract):
    questions: int
    pairs: int
    by_case: dict[str, int]
    skipped: dict[str, int]  # reason → questions


class TrainResult(Contract):
    # None with `skipped`: nothing to train on. While a failed attempt is retried, only `launch`.
    checkpoint_id: int | None = None
    examples: int | None = None
    train: dict[str, Any] | None = None  # the ranks' metrics (loss, steps, tokens/s)
    saved: Any = None
    launch: dict[str, Any] | None = None
    skipped: str | None = None


class EvaluateResult(Contract):
    evaluation_id: int
    accuracy: float
    reused: bool = False  # an earlier evaluation of the same checkpoint, dataset and strategy
    input_tokens: int | None = None
    output_tokens: int | None = None
    engine: dict[str, Any] | None = None  # the backend that answered (not set when reused)


class PromoteResult(Contract):
    outcome: str  # promoted | rejected
    promoted: str | None  # the promoted checkpoint's name
    reason: str
    baseline: str
    baseline_accuracy: float
    candidates: dict[str, float]  # checkpoint name → eval accuracy (the split that decided)
    decided_on: str | None = None  # the eval (dev) dataset's name
    # The held-out report_on split: figures shown next to the deciding ones, never used to decide.
    report_on: str | None = None
    baseline_report_accuracy: float | None = None
    candidates_report: dict[str, float] | None = None  # checkpoint name → report_on accuracy


RESULTS: dict[JobKind, type[Contract]] = {
    JobKind.GENERATE: GenerateResult,
    JobKind.VOTE: VoteResult,
    JobKind.PAIRS: PairsResult,
    JobKind.TRAIN: TrainResult,
    JobKind.EVALUATE: EvaluateResult,
    JobKind.PROMOTE: PromoteResult,
}


# --- accessors -----------------------------------------------------------------------------------


class JobRow(Protocol):
    """What the accessors need of a `db.schema.Job`."""

    id: int
    kind: str
    payload: dict[str, Any]
    result: dict[str, Any] | None


_P = TypeVar("_P", bound=Contract)


def parse_contract(model: type[_P], data: dict[str, Any], where: str) -> _P:
    """`data` as `model`; a mismatch fails naming `where` and each field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'object'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"{where} is not a {model.__name__}: {fields}") from None


def _check_kind(job: JobRow, model: type[Contract], table: dict[JobKind, type[Contract]]) -> None:
    if table[JobKind(job.kind)] is not model:
        raise InputError(f"job {job.id} is a {job.kind} job, not a {model.__name__}'s")


@overload
def payload_of(job: JobRow) -> Contract: ...
@overload
def payload_of(job: JobRow, expect: type[_P]) -> _P: ...
def payload_of(job: JobRow, expect: type[Contract] | None = None) -> Contract:
    """A job's payload as its kind's model; with `expect`, a job of another kind is an error."""
    model = expect or PAYLOADS[JobKind(job.kind)]
    if expect is not None:
        _check_kind(job, expect, PAYLOADS)
    return parse_contract(model, job.payload or {}, f"job {job.id} payload")


@overload
def result_of(job: JobRow) -> Contract | None: ...
@overload
def result_of(job: JobRow, expect: type[_P]) -> _P | None: ...
def result_of(job: JobRow, expect: type[Contract] | None = None) -> Contract | None:
    """A job's result as its kind's model; None while it has none."""
    if not job.result:
        return None
    model = expect or RESULTS[JobKind(job.kind)]
    if expect is not None:
        _check_kind(job, expect, RESULTS)
    return parse_contract(model, job.result, f"job {job.id} result")
