"""The step graph, defined once: per job kind its queue, display order and delivery defaults; per
stage of round the steps it goes through, in order. Planning (services.rounds), the progress view
(services.monitor), job counts (services.report), the CLI's one-line job summaries and the
delivery defaults (services.settings) all read it.

Adding a job kind: a member of JobKind, a row in KINDS (and its steps in STAGE_STEPS), its handler
in workers.steps.HANDLERS, and the plan_* function that decides when it is ready.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.contracts.keys import JobKey, JobKeyError, StepName
from services.contracts.states import JobKind, Queue, Stage

HOUR = 3600.0


@dataclass(frozen=True)
class KindSpec:
    """What every job of one kind shares."""

    queue: Queue | None  # None: the voter decides (generate: VOTER_QUEUES)
    # How long a job may run before Celery's soft limit stops it (then retried or failed).
    time_limit_s: float
    # How long its lease lasts without a heartbeat. Heartbeats come from a thread, not from the job's
    # own progress, so a lease only has to outlive a few missed beats (a database fail-over, a long
    # GC pause), whatever the job's length.
    lease_s: float
    # The result fields the CLI shows on a job's one line as it finishes.
    summary: tuple[str, ...]
    # Acknowledge the broker's message when the job starts rather than when it ends: for jobs that
    # can outlast the broker's visibility timeout (workers.tasks says why).
    ack_on_start: bool = False


# In display order (job counts list the steps in this order).
KINDS: dict[JobKind, KindSpec] = {
    JobKind.GENERATE: KindSpec(None, 6 * HOUR, 300.0, ("generated",)),
    JobKind.VOTE: KindSpec(Queue.CONTROL, 1 * HOUR, 300.0, ("kept", "examples")),
    JobKind.PAIRS: KindSpec(Queue.CONTROL, 1 * HOUR, 300.0, ("skipped",)),
    JobKind.TRAIN: KindSpec(Queue.TRAIN, 24 * HOUR, 600.0, ("examples", "skipped"), ack_on_start=True),
    JobKind.EVALUATE: KindSpec(Queue.STRONG, 6 * HOUR, 300.0, ("accuracy",)),
    JobKind.PROMOTE: KindSpec(Queue.CONTROL, 1 * HOUR, 300.0, ("outcome",)),
}

# A generate job runs on its voter's role: the student of stage II is a strong model.
VOTER_QUEUES: dict[str, Queue] = {"weak": Queue.WEAK, "strong": Queue.STRONG, "student": Queue.STRONG}

VARIANT = "{variant}"  # a step repeated for each of the round's candidates (variant × grid setting)
REPORT_ON = "evaluate:report-on:"  # the steps of a round with an eval.report_on split only
PASS_AT_K = "evaluate:pass-at-k:"  # the steps of a stage II round with sampling.pass_at_k on

# Per stage, the steps of a round in display order; planning emits them in this order.
STAGE_STEPS: dict[Stage, tuple[str, ...]] = {
    Stage.SFT: ("evaluate:baseline", "evaluate:report-on:baseline", "generate:weak", "generate:strong", "vote",
                f"train:{VARIANT}", f"evaluate:{VARIANT}", f"evaluate:report-on:{VARIANT}", "promote"),
    Stage.WEAK_SFT: ("evaluate:baseline", "evaluate:report-on:baseline", f"train:{VARIANT}", f"evaluate:{VARIANT}",
                     f"evaluate:report-on:{VARIANT}", "promote"),
    Stage.PREFERENCE: ("evaluate:baseline", "evaluate:report-on:baseline", "evaluate:pass-at-k:student",
                       "generate:student", "pairs", f"train:{VARIANT}", f"evaluate:{VARIANT}",
                       f"evaluate:report-on:{VARIANT}", f"evaluate:pass-at-k:{VARIANT}", "promote"),
}

# --- training grids: which hyper-parameters a grid may vary, and the candidates it makes ---------

# The short names in a candidate's name: round1-hybrid-lr1e-4-ep2.
GRID_FIELDS: dict[str, str] = {"learning_rate": "lr", "epochs": "ep", "beta": "beta", "warmup_ratio": "warmup",
                               "weight_decay": "wd", "micro_batch_size": "mb", "gradient_accumulation_steps": "ga"}


def expand_grid(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a fixed order (the grid's keys as given, each
    key's values as listed): the candidates' order, which also breaks ties at the gate."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[name] for name in names))]


def _short(value: Any) -> str:
    """1e-4 → 1e-4, 0.0003 → 3e-4, 0.1 → 0.1, 2 → 2: short, and free of ':' (a job key's separator)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def candidate_subject(variant: str, setting: Mapping[str, Any]) -> str:
    """A candidate's name within its round: the variant, then each grid value (hybrid-lr1e-4-ep2)."""
    return "-".join([variant, *(f"{GRID_FIELDS.get(name, name)}{_short(value)}" for name, value in setting.items())])


def grid_candidates(variants: list[str], grid: Mapping[str, list[Any]] | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """candidate subject → (variant, its setting), variant by variant, each in the grid's order."""
    settings = expand_grid(grid) if grid else [{}]
    return {candidate_subject(variant, setting): (variant, setting) for variant in variants for setting in settings}


class StepGraphError(JobKeyError):
    """A job that the step graph does not know for its stage."""


def queue_of(key: JobKey) -> Queue:
    """The queue a job goes to."""
    spec = KINDS[key.kind]
    if spec.queue is not None:
        return spec.queue
    if key.subject not in VOTER_QUEUES:
        raise StepGraphError(f"job key {str(key)!r}: unknown voter {key.subject!r} (one of {', '.join(VOTER_QUEUES)})")
    return VOTER_QUEUES[key.subject]


def training_sets_of(stage: str, config: Mapping[str, Any]) -> list[str]:
    """The training sets (variants) a round of this stage trains on, from its stored config."""
    if stage == Stage.PREFERENCE:
        return [str(config["training"]["loss"])]  # one training set: the pairs, named after the loss
    if stage == Stage.WEAK_SFT:
        return ["gold"]
    return [str(v) for v in config.get("variants") or []]


def variants_of(stage: str, config: Mapping[str, Any]) -> list[str]:
    """The candidates a round of this stage trains, from its stored config: one per training set,
    or, with a training grid, one per training set and setting (hybrid-lr1e-4)."""
    return list(grid_candidates(training_sets_of(stage, config), (config.get("training") or {}).get("grid")))


def reports_on(config: Mapping[str, Any]) -> bool:
    """Whether a round (its stored config) evaluates on a held-out report_on split as well."""
    return bool((config.get("eval") or {}).get("report_on"))


def reports_pass_at_k(config: Mapping[str, Any]) -> bool:
    """Whether a stage II round (its stored config) evaluates pass@k (sampling.pass_at_k, on by default)."""
    return bool((config.get("sampling") or {}).get("pass_at_k", True))


def stage_steps(stage: str, variants: list[str], *, report_on: bool = False, pass_at_k: bool = True) -> list[StepName]:
    """The steps a round of this stage goes through, in display order."""
    steps = []
    for template in STAGE_STEPS[Stage(stage)]:
        if (template.startswith(REPORT_ON) and not report_on) or (template.startswith(PASS_AT_K) and not pass_at_k):
            continue
        names = [template.replace(VARIANT, v) for v in variants] if VARIANT in template else [template]
        steps += [StepName.parse(name) for name in names]
    return steps


def order_plan(stage: str, variants: list[str], keys: list[JobKey], *, report_on: bool = False) -> list[JobKey]:
    """The keys in the graph's order (chunks of one step in their own order); a key whose step the
    stage does not have raises StepGraphError."""
    rank = {step: index for index, step in enumerate(stage_steps(stage, variants, report_on=report_on))}
    missing = sorted({str(key) for key in keys if key.display_step not in rank})
    if missing:
        raise StepGraphError(f"step graph of a {stage} round has no step for job {', '.join(missing)} "
                             f"(its steps: {', '.join(str(s) for s in rank)})")
    return sorted(keys, key=lambda key: rank[key.display_step])


# The `jobs.step` values (a generate job's voter, otherwise the kind), in display order.
JOB_STEP_ORDER: tuple[str, ...] = tuple(
    step for kind in KINDS for step in ([f"{kind}:{voter}" for voter in VOTER_QUEUES] if kind == JobKind.GENERATE
                                        else [str(kind)]))


def job_summary(kind: str, result: Mapping[str, Any] | None) -> str:
    """A finished job's one-line summary: `kept=12`, `accuracy=41.0%`, ..."""
    if not result:
        return ""
    try:
        fields = KINDS[JobKind(kind)].summary
    except ValueError:
        return ""
    parts = []
    for field in fields:
        value = result.get(field)
        if value is not None:
            parts.append(f"{field}={value:.1%}" if field == "accuracy" else f"{field}={value}")
    return " ".join(parts)
