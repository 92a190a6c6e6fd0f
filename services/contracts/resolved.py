"""What a round's config resolved to when it started (names → ids, checked against the database),
one model per stage, and the one accessor every reader goes through.

Stored in `rounds.resolved` as the same JSON object as before these models existed (no `stage`
field: the round row has it), so rounds of an existing database read back unchanged. The pool's
question ids are not here: they are rows of `round_questions` (migration 0010; read them with
`services.round_questions.round_question_ids`); the JSON keeps their count.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, Union, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts.states import Stage
from services.errors import InputError


class _Resolved(BaseModel):
    # Frozen: a resolved round is a fact; the one thing fixed later (demonstrations) makes a copy.
    # Unknown keys are kept, so writing a round back never drops what a newer version stored.
    model_config = ConfigDict(frozen=True, extra="allow")

    task: str  # the answer format: gsm8k | math
    student_id: int  # the checkpoint the round fine-tunes
    baseline_id: int  # the newest promoted checkpoint of the student's lineage: what the gate compares with
    lineage_root_id: int
    eval_id: int  # the labelled eval dataset: the dev split, which decides promotion
    report_on_id: int | None = None  # a held-out labelled split, evaluated and reported, never deciding

    def stored(self) -> dict[str, Any]:
        """The JSON object `rounds.resolved` holds."""
        return self.model_dump(mode="json", exclude_none=True)

    def voters(self) -> dict[str, int]:
        """voter name → the checkpoint that answers as it (generate jobs)."""
        return {}


class ResolvedSFT(_Resolved):
    """Stage I: two voters answer the pool's questions."""

    weak_id: int
    strong_id: int
    pool_id: int
    question_count: int = Field(ge=0)  # the pool questions the round answers: rows of `round_questions`
    # The weak generations shown to the strong voter; chosen once every weak answer is in.
    demonstration_ids: list[int] | None = None

    def voters(self) -> dict[str, int]:
        return {"weak": self.weak_id, "strong": self.strong_id}


class ResolvedWeakSFT(_Resolved):
    """Weak fine-tuning on a labelled set's gold solutions; the student is the weak model."""

    train_id: int


class ResolvedPreference(_Resolved):
    """Stage II: the student samples the pool; the weak side of each pair comes from a stage I round."""

    weak_id: int
    weak_round_id: int  # the stage I round whose weak answers form one side of every pair
    pool_id: int
    question_count: int = Field(ge=0)  # the pool questions the round samples: rows of `round_questions`

    def voters(self) -> dict[str, int]:
        return {"student": self.student_id}


AnyResolved = Union[ResolvedSFT, ResolvedWeakSFT, ResolvedPreference]

RESOLVED_BY_STAGE: dict[Stage, type[_Resolved]] = {
    Stage.SFT: ResolvedSFT,
    Stage.WEAK_SFT: ResolvedWeakSFT,
    Stage.PREFERENCE: ResolvedPreference,
}


def parse_resolved(stage: str, data: dict[str, Any], source: str = "round") -> AnyResolved:
    """`rounds.resolved` of a round of this stage → its model; a bad row fails naming the round and field."""
    try:
        model = RESOLVED_BY_STAGE[Stage(stage)]
    except ValueError:
        raise InputError(f"{source}: unknown stage {stage!r} (one of {', '.join(Stage)})") from None
    if "question_ids" in data:  # the ids moved to `round_questions`; extra keys are otherwise kept
        raise InputError(f"{source}: its resolved ids still hold the pool's question_ids: the database predates "
                         "migration 0010 (run `w2sctl db upgrade`)")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'resolved'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"{source}: resolved ids are not a {stage} round's: {fields}") from None
    assert isinstance(parsed, (ResolvedSFT, ResolvedWeakSFT, ResolvedPreference))
    return parsed


class RoundRow(Protocol):
    """What the accessor needs of a `db.schema.Round`."""

    id: int
    stage: str
    resolved: dict[str, Any]


_R = TypeVar("_R", ResolvedSFT, ResolvedWeakSFT, ResolvedPreference)


@overload
def resolved_of(round_: RoundRow) -> AnyResolved: ...
@overload
def resolved_of(round_: RoundRow, expect: type[_R]) -> _R: ...
def resolved_of(round_: RoundRow, expect: type[_R] | None = None) -> AnyResolved | _R:
    """The one way to read a round's resolved ids. With `expect`, a round of another stage is an error."""
    parsed = parse_resolved(round_.stage, round_.resolved, source=f"round {round_.id}")
    if expect is not None and not isinstance(parsed, expect):
        raise InputError(f"round {round_.id} is a {round_.stage} round, not the stage this step needs "
                         f"({expect.__name__})")
    return parsed
