"""The progressive chain: (weak-sft) → stage I iteration 1 → iteration 2 → stage II, each round gated.

`next_step` is the rule, a pure function over the outcomes so far; `services.rounds.advance_pipeline`
applies it when a round of the pipeline ends (called from `rounds.advance`, so it runs wherever the
last job of a round finished, embedded or on a worker), and `services.rounds.start_pipeline` starts
one. They live there because ending a round and starting the next call each other; this module
imports nothing of rounds. A rejected or failed round stops the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Pipeline, Round
from services.config import ConfigError, EvalConfig, TrackingConfig, _merge, _Strict, parse_round_config
from services.contracts import CheckpointStatus, RoundState
from services.lookup import get_by_id

STEPS = ("weak-sft", "iteration1", "iteration2", "preference")


class PipelineConfig(_Strict):
    """Shared fields once; each step's own fields (any round-config field) under its name."""

    weak: str = Field(description="the base weak model")
    strong: str = Field(description="the base strong model")
    pool: str
    eval: EvalConfig
    seed: int = 0
    tracking: TrackingConfig | None = Field(None, description="experiment tracking of the pipeline and its rounds")
    weak_sft: dict[str, Any] | None = Field(None, description="fine-tune the weak model first; needs `train`")
    iteration1: dict[str, Any] = Field(default_factory=dict)
    iteration2: dict[str, Any] | None = Field(default_factory=dict, description="null: skip iteration 2")
    preference: dict[str, Any] | None = Field(default_factory=dict, description="null: skip stage II")
    # ref: the students fine-tuned on the weak set and on the icl set vote in iteration 2; a chain
    # that trains other variants in iteration 1 (the demo's models cannot learn in context: hybrid)
    # names its two here.
    iteration2_voters: tuple[str, str] = Field(
        ("weak", "icl"), description="the iteration-1 variants whose candidates vote in iteration 2 (weak, strong)")
    # stop: a step starts only from promoted checkpoints, so a rejected round ends the chain.
    # continue: iteration 2 runs whatever iteration 1's gate decided (its voters are candidates
    # either way), and stage II starts from the newest promoted stage I student, if any.
    after_rejection: Literal["stop", "continue"] = Field("stop", description="a rejected round: stop or continue")

    @model_validator(mode="after")
    def _iteration2_needs_two_students(self) -> PipelineConfig:
        variants = self.iteration1.get("variants", ["weak", "icl"])
        if self.iteration2 is not None and not set(self.iteration2_voters) <= set(variants):
            first, second = self.iteration2_voters
            raise ValueError(f"iteration2: the two fine-tuned students come from iteration1's {first} and {second} "
                             f"variants (iteration2_voters), but iteration1.variants is {variants}")
        return self

    def steps(self) -> list[str]:
        wanted = {"weak-sft": self.weak_sft is not None, "iteration1": True,
                  "iteration2": self.iteration2 is not None, "preference": self.preference is not None}
        return [step for step in STEPS if wanted[step]]


@dataclass(frozen=True)
class StepOutcome:
    step: str
    state: str  # done | failed | cancelled
    outcome: str | None  # promoted | rejected
    candidates: dict[str, str]  # variant → checkpoint name
    promoted: str | None


ALL_PROMOTED = "every step promoted a checkpoint"
ALL_RAN = "every step ran"  # after_rejection: continue, and some step was rejected


def next_step(config: PipelineConfig, finished: list[StepOutcome]) -> tuple[str, dict[str, Any]] | str:
    """The next round's (step, round config), or the reason the chain ends."""
    for outcome in finished:
        if outcome.state != RoundState.DONE:
            return f"{outcome.step} round {outcome.state}"
        if outcome.outcome != CheckpointStatus.PROMOTED and config.after_rejection == "stop":
            return f"{outcome.step} round rejected: its candidate did not beat the student"
    steps = config.steps()
    if len(finished) == len(steps):
        rejected = [o.step for o in finished if o.outcome != CheckpointStatus.PROMOTED]
        return f"{ALL_RAN}; rejected: {', '.join(rejected)}" if rejected else ALL_PROMOTED
    step = steps[len(finished)]
    by_step = {o.step: o for o in finished}
    weak = (by_step["weak-sft"].promoted if "weak-sft" in by_step else None) or config.weak
    tracking = {"tracking": config.tracking.model_dump()} if config.tracking else {}
    shared = {"pool": config.pool, "eval": config.eval.model_dump(), "seed": config.seed, **tracking}
    if step == "weak-sft":
        base = {"stage": "weak-sft", "weak": config.weak, "eval": config.eval.model_dump(), "seed": config.seed,
                **tracking}
        return step, _merge(base, config.weak_sft or {})
    if step == "iteration1":
        return step, _merge({"stage": "sft", "iteration": 1, "weak": weak, "strong": config.strong, **shared},
                            config.iteration1)
    if step == "iteration2":
        first = by_step["iteration1"].candidates
        missing = [variant for variant in config.iteration2_voters if variant not in first]
        if missing:
            return f"iteration2: iteration1 trained no {' and no '.join(missing)} candidate to vote"
        weak_voter, strong_voter = (first[variant] for variant in config.iteration2_voters)
        # The two fine-tuned students vote zero-shot; training restarts from the base strong model.
        return step, _merge({"stage": "sft", "iteration": 2, "weak": weak_voter, "strong": strong_voter,
                             "student": config.strong, "demonstrations": 0, "variants": ["hybrid"], **shared},
                            config.iteration2 or {})
    # Stage II starts from M_plus, the newest promoted stage I student.
    m_plus = next((o.promoted for o in reversed(finished) if o.step.startswith("iteration") and o.promoted), None)
    if m_plus is None:
        return "no stage I candidate was promoted: stage II needs a promoted student"
    return step, _merge({"stage": "preference", "student": m_plus, "weak": weak, **shared}, config.preference or {})


def first_round(config: PipelineConfig, finished: list[StepOutcome]) -> tuple[str, dict[str, Any]]:
    """The step a chain starts with (after weak-sft, when it has one): there always is one."""
    decision = next_step(config, finished)
    if isinstance(decision, str):
        raise AssertionError(f"a pipeline's first steps always run, next_step said: {decision}")
    return decision


def parse_pipeline_config(data: dict[str, Any], source: str = "pipeline config") -> PipelineConfig:
    from pydantic import ValidationError

    from services.config import _describe

    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + _describe(exc)) from None
    # The first steps' fields must make valid round configs now; iteration 2 and stage II name
    # checkpoints that exist only once the earlier steps have run, so they are checked then.
    finished: list[StepOutcome] = []
    if config.weak_sft is not None:
        parse_round_config(first_round(config, [])[1], f"{source}: weak_sft")
        finished = [StepOutcome("weak-sft", RoundState.DONE, CheckpointStatus.PROMOTED, {}, config.weak)]
    parse_round_config(first_round(config, finished)[1], f"{source}: iteration1")
    return config


def get_pipeline(session: Session, pipeline_id: int) -> Pipeline:
    return get_by_id(session, Pipeline, pipeline_id, "pipeline")


def pipeline_rounds(session: Session, pipeline_id: int) -> list[Round]:
    return list(session.scalars(select(Round).where(Round.pipeline_id == pipeline_id).order_by(Round.id)))
