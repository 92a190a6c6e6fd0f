"""What a round is and how it moves: start, advance, resume.

A round is a small graph of steps. `advance` reads the round's jobs from the database and plans
whatever step has become ready; it is idempotent (job keys are unique per round) and safe to call
from anywhere, any number of times. The broker holds nothing that cannot be re-planned from here.

Stage I (`sft`)::

    evaluate:baseline ──────────────────────────────────────────────┐
    generate:weak ──► generate:strong (after weak when K > 0) ──► vote ──► train:<variant> ──► evaluate:<variant> ──► promote

Stage II (`preference`)::

    evaluate:baseline ────────────────────────────────────────────────────────┐
    generate:student (n samples per question) ──► pairs ──► train:<loss> ──► evaluate:<loss> ──► promote

Weak fine-tuning (`weak-sft`)::

    evaluate:baseline ─────────────────────┐
    train:gold ──► evaluate:gold ─────────► promote
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, overload

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from db.schema import Checkpoint, Generation, Job, Pipeline, Question, Round, utcnow
from db.session import insert_ignore
from services.config import AnyRoundConfig, PreferenceRoundConfig, SFTRoundConfig, WeakSFTRoundConfig, parse_round_config
from services.contracts import (
    TERMINAL_ROUND_STATES,
    AnyResolved,
    CheckpointStatus,
    JobKey,
    JobKind,
    JobState,
    PromoteResult,
    Queue,
    ResolvedPreference,
    ResolvedSFT,
    ResolvedWeakSFT,
    RoundState,
    Stage,
    TrainResult,
    resolved_of,
    result_of,
)
from services.contracts.graph import grid_candidates, order_plan, queue_of, reports_on, variants_of
from services.contracts.jobs import (
    PAYLOADS,
    EvaluatePayload,
    GeneratePayload,
    PairsPayload,
    Payload,
    PromotePayload,
    TrainPayload,
    VotePayload,
)
from services.errors import InputError, StateError
from services.lookup import get_by_id
from services.pipeline import ALL_PROMOTED, ALL_RAN, PipelineConfig, StepOutcome, first_round, next_step
from services.registry import current_student, get_checkpoint, get_dataset, lineage_root
from services.round_questions import round_question_ids, store_round_questions
from services.settings import DeliverySettings


@dataclass(frozen=True)
class JobSpec:
    key: JobKey
    payload: Payload

    def __post_init__(self) -> None:
        if type(self.payload) is not PAYLOADS[self.key.kind]:
            raise TypeError(f"job {self.key}: a {type(self.payload).__name__} is not a {self.key.kind} job's payload")

    @property
    def kind(self) -> JobKind:
        return self.key.kind

    @property
    def queue(self) -> Queue:
        return queue_of(self.key)


# --- start ---------------------------------------------------------------------------------------


def start_round(session: Session, config: AnyRoundConfig, delivery: DeliverySettings, *,
                name: str | None = None) -> tuple[Round, list[int]]:
    """Validate against the database, write the round and its first jobs. Returns (round, job ids to enqueue).

    The caller commits before enqueueing: nothing reaches the broker that is not in the database.
    With a `name` (an idempotency key) that a round already has, that round is returned with its
    queued jobs to send again, provided it was started with the same config: a start retried
    after an error (e.g. the broker was unreachable) never makes a second round.
    """
    if name is not None:
        existing = named_round(session, name)
        if existing is not None:
            if existing.config != config.model_dump(mode="json"):
                raise InputError(f"--name {name!r}: round {existing.id} already has that name, with another config; "
                                 "choose another name")
            return existing, resume_round(session, existing.id, delivery)
    resolved, question_ids = resolve(session, config)
    round_ = Round(
        stage=config.stage,
        iteration=getattr(config, "iteration", 1),
        state=RoundState.RUNNING,
        name=name,
        config=config.model_dump(mode="json"),
        resolved=resolved.stored(),
    )
    session.add(round_)
    try:
        session.flush()
    except IntegrityError:
        raise StateError(f"--name {name!r}: another `round start` with that name committed first; "
                         "run the command again to get its round") from None
    store_round_questions(session, round_.id, question_ids)
    return round_, advance(session, round_.id, delivery)


def fit_warnings(config: AnyRoundConfig, contexts: dict[str, tuple[str, int | None]]) -> list[str]:
    """One line per generating model whose context cannot hold the configured generation: role →
    (model name, context in tokens; None when unknown). ``max_new_tokens`` at or past the context
    leaves no room for any prompt (every question would be skipped); the strong voter's K
    demonstrations, each a weak response of up to ``max_new_tokens``, plus the answer's room past
    the context mean long questions will be answered with fewer demonstrations or skipped."""
    budget = config.generation.max_new_tokens
    demonstrations = getattr(config, "demonstrations", 0)
    lines = []
    for role, (name, context) in contexts.items():
        if context is None:
            continue
        if budget >= context:
            lines.append(f"warning: generation.max_new_tokens {budget} leaves no room for a prompt in {role} model "
                         f"{name!r}'s context of {context} tokens: every question it answers will be skipped")
        elif role == "strong" and demonstrations and (demonstrations + 1) * budget > context:
            lines.append(f"warning: {demonstrations} demonstrations of up to max_new_tokens {budget} each, plus "
                         f"{budget} for the answer, exceed strong model {name!r}'s context of {context} tokens: "
                         "questions whose prompt would not fit get fewer demonstrations, or are skipped")
    return lines


def round_fit_warnings(session: Session, config: AnyRoundConfig) -> list[str]:
    """``fit_warnings`` for the models a round generates with, their contexts read from their
    config files (nothing is loaded)."""
    from models.backends import declared_context_length

    roles = {"weak": config.weak, "strong": config.strong} if config.stage == "sft" else \
        {"student": config.student} if config.stage == "preference" else {"weak": config.weak}
    if config.stage == "sft" and config.student:
        roles["student"] = config.student
    contexts = {}
    for role, name in roles.items():
        checkpoint = get_checkpoint(session, name)
        contexts[role] = (checkpoint.name, declared_context_length(checkpoint.path))
    return fit_warnings(config, contexts)


def named_round(session: Session, name: str) -> Round | None:
    return session.scalar(select(Round).where(Round.name == name))


def resolve(session: Session, config: AnyRoundConfig) -> tuple[AnyResolved, list[int]]:
    """Names → ids, with every check that needs the database. Raises before anything is written.
    Returns the resolved ids and the pool's question ids in order (none for weak-sft), which the
    caller stores with `store_round_questions` once the round has its id."""
    resolved, question_ids = _resolve(session, config)
    if config.eval.report_on is None:
        return resolved, question_ids
    report_set = get_dataset(session, config.eval.report_on)
    if not report_set.labelled:
        raise InputError(f"eval.report_on {report_set.name!r} has no gold answers (it was imported with --unlabelled)")
    if report_set.task != resolved.task:
        raise InputError(f"eval.report_on is a {report_set.task} dataset but the round's task is {resolved.task}")
    if report_set.id in (resolved.eval_id, getattr(resolved, "pool_id", None), getattr(resolved, "train_id", None)):
        raise InputError(f"eval.report_on {report_set.name!r} is also the round's eval, pool or train set: "
                         "report on held-out questions")
    return resolved.model_copy(update={"report_on_id": report_set.id}), question_ids


def _resolve(session: Session, config: AnyRoundConfig) -> tuple[AnyResolved, list[int]]:
    eval_set = get_dataset(session, config.eval.dataset)
    if not eval_set.labelled:
        raise InputError(f"eval.dataset {eval_set.name!r} has no gold answers (it was imported with --unlabelled)")
    if config.stage == "preference":
        return resolve_preference(session, config, eval_set)
    if config.stage == "weak-sft":
        weak = get_checkpoint(session, config.weak)
        train_set = get_dataset(session, config.train)
        if not train_set.labelled:
            raise InputError(f"train {train_set.name!r} has no gold solutions: weak-sft needs a labelled dataset")
        if train_set.task != eval_set.task:
            raise InputError(f"train is a {train_set.task} dataset but eval.dataset is {eval_set.task}")
        baseline = current_student(session, weak)
        return ResolvedWeakSFT(task=train_set.task, student_id=weak.id, baseline_id=baseline.id,
                               lineage_root_id=lineage_root(weak), train_id=train_set.id, eval_id=eval_set.id), []

    weak, strong = get_checkpoint(session, config.weak), get_checkpoint(session, config.strong)
    student = get_checkpoint(session, config.student) if config.student else strong
    pool = get_dataset(session, config.pool)
    if pool.task != eval_set.task:
        raise InputError(f"pool is a {pool.task} dataset but eval.dataset is {eval_set.task}")
    if pool.id == eval_set.id:
        raise InputError("pool and eval.dataset are the same dataset: evaluate on held-out questions")
    question_ids = list(session.scalars(
        select(Question.id).where(Question.dataset_id == pool.id).order_by(Question.index).limit(config.pool_limit)))
    if config.demonstrations > len(question_ids):
        raise InputError(f"demonstrations: {config.demonstrations} is more than the pool's {len(question_ids)} questions")
    baseline = current_student(session, student)
    return ResolvedSFT(task=pool.task, weak_id=weak.id, strong_id=strong.id, student_id=student.id,
                       baseline_id=baseline.id, lineage_root_id=lineage_root(student), pool_id=pool.id,
                       eval_id=eval_set.id, question_count=len(question_ids)), question_ids


def resolve_preference(session: Session, config: PreferenceRoundConfig, eval_set) -> tuple[ResolvedPreference, list[int]]:
    student, weak = get_checkpoint(session, config.student), get_checkpoint(session, config.weak)
    if student.status not in (CheckpointStatus.PROMOTED, CheckpointStatus.CANDIDATE):
        raise InputError(f"student {student.name!r} is a {student.status} checkpoint: stage II starts from a "
                         "promoted or candidate stage I checkpoint (M_plus)")
    pool = get_dataset(session, config.pool)
    if pool.task != eval_set.task:
        raise InputError(f"pool is a {pool.task} dataset but eval.dataset is {eval_set.task}")
    # The weak side of every pair is the weak model's original stage I response on the pool.
    stage1 = [r for r in session.scalars(select(Round).where(Round.stage == "sft", Round.state == RoundState.DONE)
                                         .order_by(Round.iteration, Round.id.desc()))
              if (ids := resolved_of(r, ResolvedSFT)).pool_id == pool.id and ids.weak_id == weak.id]
    if not stage1:
        raise InputError(f"pool {pool.name!r} has no stage I outputs of weak model {weak.name!r}: "
                         "run a stage I round with that weak voter on that pool first")
    weak_round = stage1[0]
    answered = set(session.scalars(select(Generation.question_id).where(
        Generation.round_id == weak_round.id, Generation.voter == "weak")))
    question_ids = [q for q in session.scalars(select(Question.id).where(Question.dataset_id == pool.id)
                                                .order_by(Question.index).limit(config.pool_limit)) if q in answered]
    if not question_ids:
        raise InputError(f"pool {pool.name!r}: none of the selected questions has a weak answer in round {weak_round.id}")
    baseline = current_student(session, student)
    return ResolvedPreference(task=pool.task, student_id=student.id, weak_id=weak.id, weak_round_id=weak_round.id,
                              baseline_id=baseline.id, lineage_root_id=lineage_root(student), pool_id=pool.id,
                              eval_id=eval_set.id, question_count=len(question_ids)), question_ids


_C = TypeVar("_C", SFTRoundConfig, WeakSFTRoundConfig, PreferenceRoundConfig)


@overload
def load_config(round_: Round) -> AnyRoundConfig: ...
@overload
def load_config(round_: Round, expect: type[_C]) -> _C: ...
def load_config(round_: Round, expect: type[_C] | None = None) -> AnyRoundConfig | _C:
    """The round's config. With `expect`, a round of another stage is an error (as `resolved_of`'s)."""
    config = parse_round_config(round_.config, source=f"round {round_.id} config")
    if expect is not None and not isinstance(config, expect):
        raise InputError(f"round {round_.id} is a {round_.stage} round, not the stage this step needs "
                         f"({expect.__name__})")
    return config


# --- advance -------------------------------------------------------------------------------------


def advance(session: Session, round_id: int, delivery: DeliverySettings, *, after_job: int | None = None) -> list[int]:
    """Plan every step that has become ready; finish or fail the round. Returns new job ids to enqueue.
    `delivery` gives the leases (expired ones are re-planned) and new jobs' attempts.

    Takes a row lock on the round (PostgreSQL) so concurrent callers plan one after the other;
    the unique job keys make a second planner's inserts no-ops either way. The lock is FOR NO KEY
    UPDATE: the rows a running vote or pair step inserts hold FOR KEY SHARE on the round (their
    foreign key), which FOR UPDATE would wait for until that step commits, minutes on a big pool.

    `after_job`: the job whose end prompts this call. When it is a generation chunk whose step
    still has chunks to finish, nothing can have become ready (every step waits for whole steps),
    so only leases are checked: the full planning reads every job of the round, and a round of a
    million questions has thousands of chunks, each of which calls this.
    """
    state = session.scalar(select(Round.state).where(Round.id == round_id).with_for_update(key_share=True))
    if state is None:
        get_by_id(session, Round, round_id, "round")  # raises NotFound with the usual message
    if state in TERMINAL_ROUND_STATES:
        return []
    requeued = expire_leases(session, round_id, delivery)
    if after_job is not None and _step_still_running(session, round_id, after_job):
        return requeued
    round_ = get_by_id(session, Round, round_id, "round")
    # Payloads deferred: planning reads keys, states and results; a generation chunk's payload holds
    # its question ids (a million-question round's chunks carry every pool id, on every pass).
    jobs = {JobKey.parse(job.key): job
            for job in session.scalars(select(Job).where(Job.round_id == round_id).options(defer(Job.payload)))}

    failed = [job for job in jobs.values() if job.state == JobState.FAILED]
    if failed:
        round_.state, round_.finished_at = RoundState.FAILED, utcnow()
        round_.error = "; ".join(f"job {job.id} ({job.key}) failed: {job.error or 'no reason recorded'}" for job in failed)
        return _next_in_pipeline(session, round_, delivery)

    plan = plan_round(session, round_, load_config(round_), jobs)
    max_attempts = delivery.max_attempts
    new_ids = requeued + insert_ignore(
        session,
        Job,
        [{"round_id": round_id, "key": str(spec.key), "step": spec.key.step, "kind": spec.kind, "queue": spec.queue,
          "state": JobState.QUEUED, "payload": spec.payload.stored(), "max_attempts": max_attempts}
         for spec in plan if spec.key not in jobs],
    )
    promote = jobs.get(JobKey.single(JobKind.PROMOTE))
    if promote is not None and promote.state == JobState.DONE:
        round_.state, round_.finished_at = RoundState.DONE, utcnow()
        promoted = result_of(promote, PromoteResult)
        round_.outcome = promoted.outcome if promoted else None
        new_ids += _next_in_pipeline(session, round_, delivery)
    return new_ids


def _step_still_running(session: Session, round_id: int, job_id: int) -> bool:
    """The job is a generation chunk that did not fail, and another chunk of its step is not done."""
    # One query: the job's step (NULL, matching nothing, unless it is such a chunk), then any other unfinished job of it.
    step = select(Job.step).where(Job.id == job_id, Job.round_id == round_id, Job.kind == JobKind.GENERATE,
                                  Job.state.in_((JobState.DONE, JobState.QUEUED))).scalar_subquery()
    return session.scalar(select(Job.id).where(Job.round_id == round_id, Job.step == step,
                                               Job.state != JobState.DONE).limit(1)) is not None


def expire_leases(session: Session, round_id: int, delivery: DeliverySettings) -> list[int]:
    """Running jobs whose owner stopped heart-beating: back to the queue (ids returned, to be sent
    again), or failed once they have used every attempt (a job that kills its worker every time).

    Each change is a compare-and-set on the expired heartbeat: a heartbeat that lands first wins,
    and a zombie owner that wakes up later finds its attempt superseded and writes nothing.
    """
    now = utcnow()
    requeued = []
    # One query for every kind (each has its own lease): this runs after every job.
    cutoffs = {kind: now - timedelta(seconds=delivery.lease(kind)) for kind in JobKind}
    stale = session.execute(select(Job.id, Job.kind, Job.attempts, Job.max_attempts, Job.owner, Job.heartbeat_at).where(
        Job.round_id == round_id, Job.state == JobState.RUNNING,
        or_(*(and_(Job.kind == kind, Job.heartbeat_at < cutoff) for kind, cutoff in cutoffs.items())),
    ).order_by(Job.kind, Job.id)).all()
    for job_id, kind, attempts, max_attempts, owner, heartbeat_at in stale:
        cutoff = cutoffs[JobKind(kind)]
        lost = f"attempt {attempts} lost: its worker {owner} stopped heart-beating at {heartbeat_at:%Y-%m-%d %H:%M:%S}"
        if attempts >= max_attempts:
            values = {"state": JobState.FAILED, "finished_at": now,
                      "error": f"{lost}; gave up after {attempts} attempts (does the job kill its worker, "
                               "e.g. by running out of memory?)"}
        else:
            values = {"state": JobState.QUEUED, "error": lost}
        changed = session.execute(update(Job).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.attempts == attempts, Job.heartbeat_at < cutoff,
        ).values(**values).execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
        if changed and values["state"] == JobState.QUEUED:
            requeued.append(job_id)
    return requeued


def _next_in_pipeline(session: Session, round_: Round, delivery: DeliverySettings) -> list[int]:
    """A round of a pipeline that ends starts the next one (or ends the pipeline)."""
    if round_.pipeline_id is None:
        return []
    session.flush()
    return advance_pipeline(session, round_.pipeline_id, delivery)


def _done(jobs: dict[JobKey, Job], step: str) -> bool:
    """Every job of a step is done: `generate:weak` (all its chunks), `vote`, `train:icl`, ..."""
    matching = [job for key, job in jobs.items() if str(key.display_step) == step]
    return bool(matching) and all(job.state == JobState.DONE for job in matching)


def _evaluate(checkpoint_id: int, eval_id: int, config: AnyRoundConfig, **pass_at: Any) -> EvaluatePayload:
    return EvaluatePayload(checkpoint_id=checkpoint_id, dataset_id=eval_id, limit=config.eval.limit, **pass_at)


def _baseline_evaluations(resolved: AnyResolved, config: AnyRoundConfig) -> list[JobSpec]:
    """The student before the round, on the eval (dev) split and, if the round has one, on the report_on split."""
    plan = [JobSpec(JobKey.evaluate("baseline"), _evaluate(resolved.baseline_id, resolved.eval_id, config))]
    if resolved.report_on_id is not None:
        plan.append(JobSpec(JobKey.evaluate("baseline", report_on=True),
                            _evaluate(resolved.baseline_id, resolved.report_on_id, config)))
    return plan


def _candidates(jobs: dict[JobKey, Job]) -> dict[str, int]:
    """candidate → its checkpoint id, for train jobs that produced one (a set with no examples trains nothing)."""
    out = {}
    for key, job in jobs.items():
        trained = result_of(job, TrainResult) if key.kind == JobKind.TRAIN and job.state == JobState.DONE else None
        if trained is not None and trained.checkpoint_id and key.subject is not None:
            out[key.subject] = trained.checkpoint_id
    return out


def _train_jobs(training_sets: list[str], config: AnyRoundConfig) -> list[JobSpec]:
    """One train job per candidate: per training set, one per setting of the training grid (or one)."""
    grid = config.training.grid
    return [JobSpec(JobKey.train(subject), TrainPayload(variant=variant, **({"setting": setting} if grid else {})))
            for subject, (variant, setting) in grid_candidates(training_sets, grid).items()]


def _tail(jobs: dict[JobKey, Job], variants: list[str], resolved: AnyResolved) -> list[JobSpec]:
    """evaluate each candidate once its training is done (on the report_on split too, if the round
    has one), then promote once everything is in. `variants`: the candidates' names."""
    plan = []
    candidates = _candidates(jobs)
    for variant, checkpoint_id in candidates.items():
        plan.append(JobSpec(JobKey.evaluate(variant),
                            EvaluatePayload(checkpoint_id=checkpoint_id, dataset_id=resolved.eval_id, limit=None)))
        if resolved.report_on_id is not None:
            plan.append(JobSpec(JobKey.evaluate(variant, report_on=True),
                                EvaluatePayload(checkpoint_id=checkpoint_id, dataset_id=resolved.report_on_id, limit=None)))
    trained = all(_done(jobs, str(JobKey.train(variant))) for variant in variants)
    evaluated = all(_done(jobs, str(JobKey.evaluate(variant))) for variant in candidates) \
        and _done(jobs, str(JobKey.evaluate("baseline")))
    if resolved.report_on_id is not None:
        evaluated = evaluated and all(_done(jobs, str(JobKey.evaluate(subject, report_on=True)))
                                      for subject in [*candidates, "baseline"])
    # Extra evaluations (pass@k) finish before the round does; they are planned with the candidates.
    evaluated = evaluated and all(job.state == JobState.DONE for key, job in jobs.items() if key.kind == JobKind.EVALUATE)
    evaluated = evaluated and all(JobKey.evaluate(variant, pass_at_k=True) in jobs for variant in candidates
                                  if JobKey.evaluate("student", pass_at_k=True) in jobs)
    if trained and evaluated:
        plan.append(JobSpec(JobKey.single(JobKind.PROMOTE), PromotePayload(candidates=candidates)))
    return plan


def _generation_chunks(session: Session, round_id: int, voters: list[str], question_count: int, size: int,
                       jobs: dict[JobKey, Job]) -> list[JobSpec]:
    """The generation chunks of `voters` not planned yet: chunk i answers the pool questions at
    positions [i * size, (i + 1) * size). Only the ids of those chunks are read (one range for all
    voters), so planning a round whose chunks are all planned reads none of its pool."""
    missing = [(voter, i) for voter in voters for i in range(-(-question_count // size))
               if JobKey.generate(voter, i) not in jobs]
    if not missing:
        return []
    low, high = min(i for _, i in missing) * size, (max(i for _, i in missing) + 1) * size
    ids = round_question_ids(session, round_id, low, high)
    return [JobSpec(JobKey.generate(voter, i),
                    GeneratePayload(voter=voter, question_ids=ids[i * size - low : (i + 1) * size - low]))
            for voter, i in missing]


def plan_sft(session: Session, round_: Round, config: SFTRoundConfig, jobs: dict[JobKey, Job]) -> list[JobSpec]:
    resolved = resolved_of(round_, ResolvedSFT)
    plan = _baseline_evaluations(resolved, config)
    voters = ["weak"]

    # The strong voter's few-shot demonstrations come from the weak voter's own outputs: one fixed
    # set per round, so it can only be chosen once every weak answer is in.
    if config.demonstrations == 0 or _done(jobs, "generate:weak"):
        if resolved.demonstration_ids is None:
            resolved = resolved.model_copy(update={"demonstration_ids": choose_demonstrations(session, round_, config)})
            round_.resolved = resolved.stored()
        voters.append("strong")
    plan += _generation_chunks(session, round_.id, voters, resolved.question_count, config.generation.chunk_size, jobs)

    if _done(jobs, "generate:weak") and _done(jobs, "generate:strong"):
        plan.append(JobSpec(JobKey.single(JobKind.VOTE), VotePayload()))
    if _done(jobs, "vote"):
        plan += _train_jobs(list(config.variants), config)
        plan += _tail(jobs, list(grid_candidates(list(config.variants), config.training.grid)), resolved)
    # A candidate's eval uses the round's eval limit too (same questions as the baseline).
    return [_with_limit(spec, config) for spec in plan]


def plan_preference(session: Session, round_: Round, config: PreferenceRoundConfig,
                    jobs: dict[JobKey, Job]) -> list[JobSpec]:
    resolved = resolved_of(round_, ResolvedPreference)
    # pass@k (k = the samples per question) of the starting student and of the candidate, for the report.
    pass_at = {"pass_at": config.sampling.samples, "temperature": config.sampling.temperature, "top_p": config.sampling.top_p}
    plan = _baseline_evaluations(resolved, config)
    if config.sampling.pass_at_k:
        plan.append(JobSpec(JobKey.evaluate("student", pass_at_k=True),
                            _evaluate(resolved.student_id, resolved.eval_id, config, **pass_at)))
        for variant, checkpoint_id in _candidates(jobs).items():
            plan.append(JobSpec(JobKey.evaluate(variant, pass_at_k=True),
                                _evaluate(checkpoint_id, resolved.eval_id, config, **pass_at)))
    plan += _generation_chunks(session, round_.id, ["student"], resolved.question_count,
                               config.generation.chunk_size, jobs)
    if _done(jobs, "generate:student"):
        plan.append(JobSpec(JobKey.single(JobKind.PAIRS), PairsPayload()))
    if _done(jobs, "pairs"):
        plan += _train_jobs([config.training.loss], config)
        plan += _tail(jobs, list(grid_candidates([config.training.loss], config.training.grid)), resolved)
    return [_with_limit(spec, config) for spec in plan]


def plan_weak_sft(session: Session, round_: Round, config: WeakSFTRoundConfig,
                  jobs: dict[JobKey, Job]) -> list[JobSpec]:
    resolved = resolved_of(round_, ResolvedWeakSFT)
    plan = [*_baseline_evaluations(resolved, config), *_train_jobs(["gold"], config)]
    plan += _tail(jobs, list(grid_candidates(["gold"], config.training.grid)), resolved)
    return [_with_limit(spec, config) for spec in plan]


# How each stage is planned: which of its steps are ready, given the jobs so far.
PLANNERS: dict[Stage, Callable[[Session, Round, Any, dict[JobKey, Job]], list[JobSpec]]] = {
    Stage.SFT: plan_sft,
    Stage.WEAK_SFT: plan_weak_sft,
    Stage.PREFERENCE: plan_preference,
}


def plan_round(session: Session, round_: Round, config: AnyRoundConfig, jobs: dict[JobKey, Job]) -> list[JobSpec]:
    """Every job of the round that is ready, given the jobs so far (planned before or not), in the
    step graph's order, so rows and job ids follow the round's display order. A job whose step the
    graph does not have for this stage is an error (StepGraphError), not a silent extra."""
    specs: dict[JobKey, JobSpec] = {}
    for spec in PLANNERS[Stage(config.stage)](session, round_, config, jobs):
        specs.setdefault(spec.key, spec)
    return [specs[key] for key in order_plan(config.stage, variants_of(config.stage, round_.config), list(specs),
                                             report_on=reports_on(round_.config))]


def _with_limit(spec: JobSpec, config: AnyRoundConfig) -> JobSpec:
    if spec.kind == JobKind.EVALUATE:
        limit = config.eval.report_limit if spec.key.report_on else config.eval.limit
        return JobSpec(spec.key, spec.payload.model_copy(update={"limit": limit}))
    return spec


def choose_demonstrations(session: Session, round_: Round, config: SFTRoundConfig) -> list[int]:
    """K weak generations with a non-empty answer, drawn with the round's seed (unchecked: no labels
    exist), preferring complete and shorter responses (``demonstration_candidates``)."""
    if config.demonstrations == 0:
        return []
    rows = session.execute(
        select(Generation.id, Generation.output_tokens)
        .join(Question, Question.id == Generation.question_id)
        .where(Generation.round_id == round_.id, Generation.voter == "weak", Generation.answer != "",
               Generation.sample_index == 0)
        .order_by(Question.index)
    ).all()
    candidates = demonstration_candidates([(row.id, row.output_tokens) for row in rows], config.demonstrations,
                                          config.generation.max_new_tokens)
    if len(candidates) <= config.demonstrations:
        # Fewer answered questions than K: use what there is rather than stall the round.
        return sorted(candidates)
    return sorted(random.Random(config.seed).sample(candidates, config.demonstrations))


def demonstration_candidates(responses: list[tuple[int, int]], k: int, max_new_tokens: int) -> list[int]:
    """The weak responses (id, output tokens) that K demonstrations are drawn from, in the order
    given: the complete ones (stopped before ``max_new_tokens``: a cut response teaches the strong
    model to ramble and fills its context), and of those the shorter half, at least K, so that
    the demonstrations leave room in the strong model's context. Cut responses only make up the
    numbers when fewer than K are complete."""
    complete = [(i, n) for i, n in responses if n < max_new_tokens]
    if len(complete) < k:
        cut = sorted(((i, n) for i, n in responses if n >= max_new_tokens), key=lambda r: r[1])
        return [i for i, _ in complete + cut[: k - len(complete)]]
    keep = max(k, (len(complete) + 1) // 2)
    shorter = {i for i, _ in sorted(complete, key=lambda r: (r[1], r[0]))[:keep]}
    return [i for i, _ in complete if i in shorter]


# --- resume, lookups -----------------------------------------------------------------------------


def get_round(session: Session, round_id: int) -> Round:
    return get_by_id(session, Round, round_id, "round")


def resume_round(session: Session, round_id: int, delivery: DeliverySettings) -> list[int]:
    """Re-plan what is missing (new steps, jobs whose lease expired) and return every queued job id,
    to be re-sent. Safe to repeat: a second message for a job is dropped by the claim; a finished
    round gives no ids."""
    round_ = get_round(session, round_id)
    advance(session, round_id, delivery)
    session.flush()
    if round_.state in TERMINAL_ROUND_STATES:
        return []
    return list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.state == JobState.QUEUED).order_by(Job.id)))


@dataclass(frozen=True)
class Cancelled:
    queued: list[int]  # jobs that never started: their messages are revoked
    running: list[int]  # jobs that were running: their workers stop them (see workers.runner)


def cancel_round(session: Session, round_id: int, delivery: DeliverySettings,
                 reason: str = "cancelled by the operator") -> Cancelled:
    """Mark the round and its unfinished jobs cancelled, in one transaction under the round's lock.

    From the commit on, nothing of the round can start (a claim needs a queued job) nor keep
    anything (every write of a running attempt is fenced on the job being running), and `advance`
    plans nothing more. Stopping the running attempts' processes is the caller's part.
    """
    round_ = get_by_id(session, Round, round_id, "round", lock=True)
    if round_.state in TERMINAL_ROUND_STATES:
        raise StateError(f"round {round_id} is already {round_.state}")
    open_jobs = session.execute(select(Job.id, Job.state).where(
        Job.round_id == round_id, Job.state.in_((JobState.QUEUED, JobState.RUNNING))).with_for_update()).all()
    now = utcnow()
    session.execute(update(Job).where(Job.id.in_([job_id for job_id, _ in open_jobs]))
                    .values(state=JobState.CANCELLED, finished_at=now, error=reason)
                    .execution_options(synchronize_session=False))
    round_.state, round_.finished_at, round_.error = RoundState.CANCELLED, now, reason
    if round_.pipeline_id is not None:  # its chain stops here, saying why
        advance_pipeline(session, round_.pipeline_id, delivery)
    return Cancelled(queued=[j for j, state in open_jobs if state == JobState.QUEUED],
                     running=[j for j, state in open_jobs if state == JobState.RUNNING])


# --- pipelines (services.pipeline has the rule; a round that ends and the next one it starts call each other) ---


def start_pipeline(session: Session, config: PipelineConfig, delivery: DeliverySettings) -> tuple[Pipeline, list[int]]:
    pipeline = Pipeline(config=config.model_dump(mode="json"), state="running")
    session.add(pipeline)
    session.flush()
    step, round_data = first_round(config, [])
    round_, job_ids = start_round(session, parse_round_config(round_data, f"pipeline {pipeline.id} {step}"), delivery)
    round_.pipeline_id, round_.pipeline_step = pipeline.id, step
    return pipeline, job_ids


def advance_pipeline(session: Session, pipeline_id: int, delivery: DeliverySettings) -> list[int]:
    """After one of its rounds ended: start the next round, or close the pipeline. Idempotent:
    the unique (pipeline, step) key lets only one caller create the next round."""
    from db.session import insert_ignore

    pipeline = session.scalar(select(Pipeline).where(Pipeline.id == pipeline_id).with_for_update())
    if pipeline is None or pipeline.state != "running":
        return []
    rounds = session.scalars(select(Round).where(Round.pipeline_id == pipeline_id).order_by(Round.id)).all()
    if any(r.state == RoundState.RUNNING for r in rounds):
        return []
    config = PipelineConfig.model_validate(pipeline.config)
    decision = next_step(config, [_outcome(session, r) for r in rounds])
    if isinstance(decision, str):
        complete = decision.startswith(ALL_RAN) or decision == ALL_PROMOTED
        pipeline.state, pipeline.reason, pipeline.finished_at = ("done" if complete else "stopped"), decision, utcnow()
        return []
    step, round_data = decision
    try:
        round_config = parse_round_config(round_data, f"pipeline {pipeline_id} {step}")
        resolved, question_ids = resolve(session, round_config)
    except Exception as exc:  # noqa: BLE001 - a step that cannot start ends the chain with its reason
        pipeline.state, pipeline.reason, pipeline.finished_at = "failed", f"{step}: {exc}", utcnow()
        return []
    new = insert_ignore(session, Round, [{
        "stage": round_config.stage, "iteration": getattr(round_config, "iteration", 1), "state": RoundState.RUNNING,
        "config": round_config.model_dump(mode="json"), "resolved": resolved.stored(), "pipeline_id": pipeline_id,
        "pipeline_step": step, "created_at": utcnow()}])
    if not new:
        return []
    store_round_questions(session, new[0], question_ids)
    return advance(session, new[0], delivery)


def _outcome(session: Session, round_: Round) -> StepOutcome:
    if round_.pipeline_step is None:
        raise StateError(f"round {round_.id} of pipeline {round_.pipeline_id} names no pipeline step")
    # variant → its candidate; with a training grid, the variant's best setting on the eval (dev) split.
    candidates: dict[str, str] = {}
    best: dict[str, float] = {}
    for c in session.scalars(select(Checkpoint).where(Checkpoint.round_id == round_.id).order_by(Checkpoint.id)):
        if c.variant is None:
            continue
        accuracy = float((c.metrics or {}).get("eval_accuracy") or 0.0)
        if c.variant not in candidates or accuracy > best[c.variant]:
            candidates[c.variant], best[c.variant] = c.name, accuracy
    promoted = next((c.name for c in session.scalars(select(Checkpoint).where(
        Checkpoint.round_id == round_.id, Checkpoint.status == CheckpointStatus.PROMOTED))), None)
    return StepOutcome(round_.pipeline_step, round_.state, round_.outcome, candidates, promoted)
