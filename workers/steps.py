"""What each kind of job does. Each handler reads its inputs in a short transaction, does the
work outside any transaction, and writes its results in the transaction that marks the job done."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, select, update

from db.schema import Checkpoint, Generation, Job, PreferencePair, Question, Round, TrainingExample, utcnow
from db.session import among, insert_ignore
from models.answers import extract_answer
from models.backends import CheckpointError, configure_default_cache, default_cache, describe, in_format
from models.generation import generate
from models.leco import score_steps
from models.prompts import clean_response, fit_few_shot, zero_shot
from services.config import (
    PreferenceRoundConfig,
    SamplingConfig,
    SFTRoundConfig,
    StrategyConfig,
    WeakSFTRoundConfig,
)
from services.contracts import (
    CheckpointStatus,
    EvaluatePayload,
    EvaluateResult,
    GeneratePayload,
    GenerateResult,
    JobKey,
    JobKind,
    JobState,
    PairsResult,
    PromotePayload,
    PromoteResult,
    ResolvedPreference,
    ResolvedSFT,
    ResolvedWeakSFT,
    TrainPayload,
    TrainResult,
    VoteResult,
    resolved_of,
    result_of,
)
from services.contracts.jobs import parse_contract
from services.evaluation import EvalFigures, Sample, evaluate, round_eval_method, solve, step_dicts
from services.lookup import get_by_id
from services.promotion import SplitAccuracy, gate_on_dev
from services.report import round_report
from services.round_questions import round_question_ids
from services.rounds import load_config
from services.selection import decide_pairs, variant_sources
from services.store import checkpoint_path
from services.tracking import training_run_spec
from services.voting import voted_pages
from workers.runner import JobContext


def load_named(name: str, path: str, backend: str | None = None, settings=None,
               decoding: dict[str, Any] | None = None):
    """The model of a checkpoint with ``backend`` (None: recognised from the directory) and its
    registered decoding overrides; a failure to load names the model and its path (the job's error
    is what `round status` shows), whatever library raised it. ``settings``: the worker's, for the
    engines' own options (W2S_VLLM_*)."""
    if settings is not None:
        configure_default_cache(settings.backend_options())
    try:
        return default_cache().get(path, backend=backend, decoding=decoding)
    except Exception as exc:  # noqa: BLE001 - transformers, safetensors and torch each raise their own
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(path, f"model {name!r} does not load: {reason}") from exc


# A generation chunk commits its groups' rows at least this often (and with its last group): a
# model slower than this per group commits every group, as before; a fast one (recorded answers, vLLM on
# small prompts) commits a few times per chunk instead of per group, each commit a fenced progress
# update and a round trip or more. At most this much work is redone after a crash.
GENERATION_COMMIT_S = 1.0


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- generate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GenerationSetup:
    config: Any
    task: str
    checkpoint_id: int
    path: str
    model_name: str
    demonstrations: list[tuple[str, str]]
    decoding: dict[str, Any]  # the checkpoint's registered overrides of its generation_config.json
    prompt_format: str = "plain"  # the checkpoint's (models.prompts.model_text)


# (round, voter) → what every generation chunk of that voter needs. Reading it costs a parse of the
# round's resolved ids, whose pool list is megabytes at a million questions, and a round has
# thousands of chunks; so each worker process reads it once. It cannot go stale: a round's config
# and checkpoints are fixed at its start, and the one fact fixed later (the strong voter's
# demonstrations) is fixed before any strong chunk is planned; weak and student chunks use none.
# Keyed by the database too, and the round's creation time: ids restart in a new database.
_SETUPS: dict[tuple[str, int, Any, str], _GenerationSetup] = {}


def _generation_setup(session, round_id: int, voter: str) -> _GenerationSetup:
    created = session.scalar(select(Round.created_at).where(Round.id == round_id))
    key = (str(session.get_bind().url), round_id, created, voter)
    cached = _SETUPS.get(key)
    if cached is not None:
        return cached
    round_ = get_by_id(session, Round, round_id, "round")
    config = load_config(round_)
    resolved = resolved_of(round_)
    checkpoint = get_by_id(session, Checkpoint, resolved.voters()[voter], "checkpoint")
    demonstrations: list[tuple[str, str]] = []
    if voter == "strong" and isinstance(resolved, ResolvedSFT) and resolved.demonstration_ids:
        demos = session.execute(
            select(Question.text, Generation.text).join(Generation, Generation.question_id == Question.id)
            .where(Generation.id.in_(resolved.demonstration_ids)).order_by(Generation.id)
        ).all()
        demonstrations = [(q, a) for q, a in demos]
    setup = _GenerationSetup(config, resolved.task, checkpoint.id, checkpoint.path, checkpoint.name, demonstrations,
                             dict(checkpoint.decoding or {}), checkpoint.prompt_format)
    if len(_SETUPS) >= 64:  # a long-lived worker serves many rounds: keep the recent ones
        _SETUPS.pop(next(iter(_SETUPS)))
    _SETUPS[key] = setup
    return setup


def run_generate(ctx: JobContext) -> None:
    """Answer a chunk of questions: greedy for the stage I voters, n samples for the stage II student."""
    payload = parse_contract(GeneratePayload, ctx.payload, f"job {ctx.job_id} payload")
    voter = payload.voter
    with ctx.session() as session:
        setup = _generation_setup(session, ctx.round_id, voter)
        # `among`: an index range of the chunk's size, not the voter's whole round (its plan without statistics).
        existing = Counter(session.scalars(select(Generation.question_id).where(
            Generation.round_id == ctx.round_id, Generation.voter == voter,
            among(Generation.question_id, payload.question_ids))))
        # Id and text only: whole ORM rows cost more to build than answering the chunk when answers are fast.
        by_id = {q.id: q for q in session.execute(select(Question.id, Question.text)
                                                  .where(Question.id.in_(payload.question_ids)))}
        questions = [by_id[qid] for qid in payload.question_ids]
    config, task, demonstrations = setup.config, setup.task, setup.demonstrations
    checkpoint_id, path, model_name, decoding = setup.checkpoint_id, setup.path, setup.model_name, setup.decoding

    # Stage II's student samples; stage I voters answer with their configured strategy (cot: greedy,
    # as the reference).
    how: SamplingConfig | StrategyConfig = config.sampling if voter == "student" else getattr(config.strategies, voter)
    answering = how if isinstance(how, StrategyConfig) else None
    n = how.samples if isinstance(how, SamplingConfig) or how.strategy == "sc" else 1
    strategy = "sampled" if answering is None else "few-shot" if demonstrations else "zero-shot"
    if answering is not None and answering.strategy != "cot":
        strategy += f"/{answering.label()}"
    backend = (answering.backend if answering else None) or config.generation.backend or ctx.settings.backend
    loaded = in_format(load_named(model_name, path, backend, ctx.settings, decoding), setup.prompt_format)
    max_new_tokens = config.generation.max_new_tokens
    # Every prompt leaves room for max_new_tokens: demonstrations are dropped (longest first) where
    # a question needs it, and a question whose zero-shot prompt cannot fit is skipped, with why.
    # Decided for the whole chunk before generating, so a retry records the same figures.
    fitted = dict(zip((q.id for q in questions), fit_few_shot(
        [q.text for q in questions], demonstrations, loaded.count_tokens, context=loaded.context_length,
        max_new_tokens=max_new_tokens)))
    skipped = {qid: fit.reason or "" for qid, fit in fitted.items() if fit.prompt is None}
    fewer = {qid: fit.demonstrations for qid, fit in fitted.items()
             if fit.prompt is not None and fit.demonstrations < len(demonstrations)}
    answerable = [q for q in questions if q.id not in skipped]
    groups = _batches(answerable, max(1, config.generation.batch_size * 4 // n))
    generated, tokens, finished = 0, 0, False

    def result() -> dict[str, Any]:
        return GenerateResult(generated=generated, questions=len(questions), samples_per_question=n,
                              output_tokens=tokens, engine=describe(loaded),
                              **({"fewer_demonstrations": fewer} if fewer else {}),
                              **({"skipped": skipped} if skipped else {})).stored()

    # Commit group by group, or several groups at once when they come faster than
    # GENERATION_COMMIT_S (a fast model: one transaction per chunk, not per group): a retry skips the
    # groups already complete. Groups are fixed by the chunk, and each group's sampling seed by
    # (round seed, group's first question), so a re-run reproduces the same samples. The last
    # group's rows commit with the job's done mark.
    pending: list[dict[str, Any]] = []
    committed_at = time.monotonic()
    for done_groups, group in enumerate(groups, start=1):
        if all(existing[q.id] >= n for q in group):
            continue
        prompts = [fitted[q.id].prompt or "" for q in group]
        seed = config.seed * 1_000_003 + group[0].id
        if isinstance(how, SamplingConfig):
            completions = generate(
                loaded, prompts, max_new_tokens=max_new_tokens,
                batch_size=config.generation.batch_size, do_sample=True, num_samples=n,
                temperature=how.temperature, top_p=how.top_p, seed=seed, return_token_probs="top5")
            answers = [[_scored_sample(c, task) for c in samples] for samples in completions]
        else:
            solutions = solve(loaded, prompts, task, how, max_new_tokens=max_new_tokens,
                              batch_size=config.generation.batch_size, seed=seed)
            answers = [solution.samples for solution in solutions]
        rows = []
        for question, samples in zip(group, answers):
            for index, sample in enumerate(samples):  # sc: a majority sample first; leco: the vote's winner
                rows.append({"round_id": ctx.round_id, "job_id": ctx.job_id, "question_id": question.id,
                             "checkpoint_id": checkpoint_id, "voter": voter, "sample_index": index,
                             "strategy": strategy, "text": sample.text, "answer": sample.answer,
                             "step_scores": sample.steps, "input_tokens": sample.input_tokens,
                             "output_tokens": sample.output_tokens})
        tokens += sum(row["output_tokens"] for row in rows)
        pending += rows
        last = done_groups == len(groups)
        if not last and time.monotonic() - committed_at < GENERATION_COMMIT_S:
            continue
        with ctx.session() as session:
            generated += len(insert_ignore(session, Generation, pending))
            if last:
                ctx.finish(session, result())
                finished = True
            else:
                ctx.progress(session, done_groups / len(groups))
        pending, committed_at = [], time.monotonic()
    if not finished:  # the last group was already in (a redelivery): the rows still pending, and the done mark
        with ctx.session() as session:
            generated += len(insert_ignore(session, Generation, pending))
            ctx.finish(session, result())


def _scored_sample(completion, task: str) -> Sample:
    text = clean_response(completion.text)
    steps = score_steps(completion.token_texts or [], completion.token_probs or [])
    return Sample(text, extract_answer(text, task), step_dicts(steps), completion.input_tokens, completion.output_tokens)


# --- vote ----------------------------------------------------------------------------------------


def run_vote(ctx: JobContext) -> None:
    """Vote a page of questions at a time and write each page's training examples in bulk, all in
    the transaction that marks the job done (a redelivered vote writes nothing twice: the unique
    keys; a stale attempt keeps nothing: the fenced finish rolls the whole transaction back)."""
    with ctx.session() as session:
        round_ = get_by_id(session, Round, ctx.round_id, "round")
        config = load_config(round_, SFTRoundConfig)
        resolved = resolved_of(round_, ResolvedSFT)
        question_ids = round_question_ids(session, ctx.round_id)
        sources = {variant: variant_sources(variant) for variant in config.variants}
        voted = kept = dropped = 0
        for page in voted_pages(session, ctx.round_id, question_ids, resolved.task, config.vote.min_step_score):
            examples = []
            for question in page:
                voted += 1
                dropped += question.dropped_by_step_score
                if not question.kept:
                    continue
                kept += 1
                prompt = zero_shot(question.question)
                for variant, variant_from in sources.items():
                    for source in variant_from:
                        generation = question.first if source == "first" else question.second
                        examples.append({"round_id": ctx.round_id, "variant": variant, "question_id": question.question_id,
                                         "generation_id": generation.id, "prompt": prompt, "response": generation.text})
            insert_ignore(session, TrainingExample, examples)
            ctx.page_done(session, 0.99 * voted / max(len(question_ids), 1))
        counts = {variant: kept * len(variant_from) for variant, variant_from in sources.items()}
        ctx.finish(session, VoteResult(pool=len(question_ids), voted=voted, kept=kept,
                                       dropped_by_step_score=dropped, examples=counts).stored())


# --- pairs (stage II) ----------------------------------------------------------------------------

PAIR_PAGE = 1000  # questions per read: their weak answers and every student sample


def run_pairs(ctx: JobContext) -> None:
    """Apply the stage II pair rules to every question: the student's samples against the weak
    model's original stage I response. A page of questions at a time (memory holds one page),
    each page's pairs inserted in bulk, in the transaction that marks the job done."""
    with ctx.session() as session:
        round_ = get_by_id(session, Round, ctx.round_id, "round")
        config = load_config(round_, PreferenceRoundConfig)
        resolved = resolved_of(round_, ResolvedPreference)
        question_ids = round_question_ids(session, ctx.round_id)
        total, skipped, cases = 0, Counter[str](), Counter[str]()
        for start in range(0, len(question_ids), PAIR_PAGE):
            page = question_ids[start : start + PAIR_PAGE]
            texts = dict(session.execute(select(Question.id, Question.text).where(Question.id.in_(page))).all())
            weak = {g.question_id: g for g in session.execute(select(
                Generation.id, Generation.question_id, Generation.text, Generation.answer).where(
                Generation.round_id == resolved.weak_round_id, Generation.voter == "weak", Generation.sample_index == 0,
                among(Generation.question_id, page)))}
            samples: dict[int, list[Any]] = {}
            for g in session.execute(select(Generation.id, Generation.question_id, Generation.text, Generation.answer)
                                     .where(Generation.round_id == ctx.round_id, Generation.voter == "student",
                                            among(Generation.question_id, page))
                                     .order_by(Generation.question_id, Generation.sample_index)):
                samples.setdefault(g.question_id, []).append(g)

            rows = []
            for qid in page:
                if not samples.get(qid):  # the student's prompt did not fit its context: nothing sampled
                    skipped["prompt_too_long"] += 1
                    continue
                decision = decide_pairs(
                    weak[qid].answer, weak[qid].text, [(g.answer, g.text) for g in samples[qid]], task=resolved.task,
                    floor=config.pairs.floor, tau=config.pairs.tau, per_question=config.pairs.pairs_per_question,
                    rng=random.Random(f"{config.seed}:{qid}"))  # per question: independent of processing order
                if decision.skipped:
                    skipped[decision.skipped] += 1
                source = {g.text: g.id for g in reversed(samples[qid])} | {weak[qid].text: weak[qid].id}
                for index, pair in enumerate(decision.pairs):
                    cases[pair.case] += 1
                    rows.append({"round_id": ctx.round_id, "question_id": qid, "pair_index": index, "case": pair.case,
                                 "confidence": decision.confidence, "prompt": zero_shot(texts[qid]),
                                 "chosen": pair.chosen, "rejected": pair.rejected,
                                 "chosen_generation_id": source[pair.chosen],
                                 "rejected_generation_id": source[pair.rejected]})
            insert_ignore(session, PreferencePair, rows)
            total += len(rows)
            ctx.page_done(session, 0.99 * (start + len(page)) / max(len(question_ids), 1))
        ctx.finish(session, PairsResult(questions=len(question_ids), pairs=total, by_case=dict(cases),
                                        skipped=dict(skipped)).stored())


# --- train ---------------------------------------------------------------------------------------


def run_train(ctx: JobContext) -> None:
    """Fine-tune the round's student under DeepSpeed; register the output as a candidate only
    when it is complete and its tensors match the model.

    Every attempt of a job shares `jobs/job<ID>/` in the checkpoint store: the training file, the
    job file, one log per attempt, the ranks' exit records, and the DeepSpeed state saved every
    `save_every_steps` updates. A retry resumes from that state when it was saved by a run with
    the same data and config, and starts clean otherwise. A failed launch records on the job what
    happened (command, redacted environment, each rank's exit, the reason) and removes whatever
    output it left; the student is never touched.
    """
    from models.train.checkpoint import CheckpointMismatch, verify_checkpoint
    from models.train.launch import ClusterSpec, default_num_ranks, launch_training, prepare_state_dir

    payload = parse_contract(TrainPayload, ctx.payload, f"job {ctx.job_id} payload")
    variant, candidate = payload.variant, payload.candidate
    with ctx.session() as session:
        round_ = get_by_id(session, Round, ctx.round_id, "round")
        config = load_config(round_)
        resolved = resolved_of(round_)
        student = get_by_id(session, Checkpoint, resolved.student_id, "checkpoint")
        if variant == "gold" and not session.scalar(select(TrainingExample.id).where(  # weak-sft: the labelled
                TrainingExample.round_id == ctx.round_id, TrainingExample.variant == "gold").limit(1)):  # set's own
            # solutions are the targets; written once (their unique key has a NULL, so a retry would duplicate them)
            _write_gold_examples(session, ctx.round_id, resolved_of(round_, ResolvedWeakSFT).train_id,
                                 load_config(round_, WeakSFTRoundConfig).train_limit)
        if round_.stage == "preference":
            examples = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in session.scalars(
                select(PreferencePair).where(PreferencePair.round_id == ctx.round_id).order_by(PreferencePair.id))]
        else:
            examples = [{"prompt": e.prompt, "response": e.response} for e in session.scalars(
                select(TrainingExample).where(TrainingExample.round_id == ctx.round_id, TrainingExample.variant == variant)
                .order_by(TrainingExample.id))]
        student_id, student_path, student_role = student.id, student.path, student.role
        prompt_format = student.prompt_format  # trained on what it is asked; the candidate keeps it
        student_decoding = dict(student.decoding or {})  # a candidate decodes as its student was registered to
        lineage_root_id = resolved.lineage_root_id
        stage, iteration = round_.stage, round_.iteration
    if not examples:
        with ctx.session() as session:
            why = "no preference pairs: every question was skipped" if stage == "preference" else \
                "no training examples: the vote kept no question"
            ctx.finish(session, TrainResult(checkpoint_id=None, skipped=why).stored())
        return

    store = ctx.settings.checkpoint_dir
    name = f"round{ctx.round_id}-{candidate}"  # round1-hybrid, or with a grid round1-hybrid-lr1e-4
    output_dir = checkpoint_path(store, name)  # refuses a name that leaves the store
    job_dir = checkpoint_path(store, f"jobs/job{ctx.job_id}")  # shared by the job's attempts
    job_dir.mkdir(parents=True, exist_ok=True)
    train_file = job_dir / "train.jsonl"
    train_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
    data_hash = hashlib.sha256(train_file.read_bytes()).hexdigest()
    state_dir = job_dir / "state"

    launch: dict[str, Any] | None = None
    if not (output_dir / "w2s.json").is_file():  # a previous attempt may have finished training already
        _remove_partial_outputs(store, name)
        # A grid's setting overrides the round's training fields (validated with the config).
        training = {**config.training.model_dump(mode="json", exclude={"num_ranks", "timeout_s", "grid"}),
                    **(payload.setting or {})}
        resumed_from = prepare_state_dir(state_dir, {"data_sha256": data_hash, "base_model": student_path,
                                                     "training": training, "seed": config.seed, "stage": stage})
        status_dir = job_dir / f"ranks-attempt{ctx.attempt}"
        job_file = job_dir / "job.json"
        with ctx.session() as session:  # rank 0 logs its steps in a run nested under the round's, if tracking is on
            tracking = training_run_spec(session, ctx.settings, ctx.round_id, variant=candidate, job_id=ctx.job_id,
                                         attempt=ctx.attempt, checkpoint=name)
        job_file.write_text(json.dumps({
            "base_model": student_path,
            "train_file": str(train_file),
            "output_dir": str(output_dir),
            "lineage": {"parent": student_id, "parent_path": student_path, "round": ctx.round_id, "stage": stage,
                        "iteration": iteration, "variant": variant, "setting": payload.setting, "examples": len(examples),
                        "data_sha256": data_hash, "job": ctx.job_id, "attempt": ctx.attempt,
                        "config": config.model_dump(mode="json")},
            **training,
            "seed": config.seed,
            "prompt_format": prompt_format,
            "state_dir": str(state_dir),
            "status_dir": str(status_dir),
            **({"tracking": tracking} if tracking else {}),
        }, indent=2))
        log_path = job_dir / f"attempt{ctx.attempt}.log"
        ctx.set_log_path(str(log_path))
        module = "models.train.preference" if stage == "preference" else "models.train.sft"
        cluster = ClusterSpec(**ctx.settings.cluster_options())
        result = launch_training(module, job_file, num_ranks=config.training.num_ranks or default_num_ranks(cluster.gpus),
                                 log_path=log_path, timeout_s=config.training.timeout_s, check=False,
                                 cluster=cluster, status_dir=status_dir)
        launch = {**result.record(), "attempt": ctx.attempt, "resumed_from_step": resumed_from}
        failure = result.failure or (None if (output_dir / "w2s.json").is_file() else
                                     f"the launch ended without writing {output_dir}")
        if failure is not None:
            _remove_partial_outputs(store, name)
            _record_launch(ctx, {**launch, "failure": failure})
            raise TrainingFailed(f"training failed: {failure}\nlog: {log_path}\n"
                                 f"--- last lines ---\n{result.log_tail[-1200:]}")

    try:
        saved = verify_checkpoint(output_dir)
    except CheckpointMismatch as exc:
        _remove_partial_outputs(store, name)
        if launch is not None:
            _record_launch(ctx, {**launch, "failure": str(exc)})
        raise TrainingFailed(f"training wrote a checkpoint that does not match its model: {exc}") from None
    metrics_file = output_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    with ctx.session() as session:
        insert_ignore(session, Checkpoint, [{
            "name": name, "path": str(output_dir), "role": student_role, "status": CheckpointStatus.CANDIDATE,
            "parent_id": student_id, "lineage_root_id": lineage_root_id, "round_id": ctx.round_id,
            "decoding": student_decoding,
            "variant": variant, "metrics": {"train": metrics, "saved": saved, "setting": payload.setting or {}},
            "created_at": utcnow(), "prompt_format": prompt_format}])
        checkpoint_id = session.scalar(select(Checkpoint.id).where(Checkpoint.name == name))
        ctx.finish(session, TrainResult(checkpoint_id=checkpoint_id, examples=len(examples), train=metrics, saved=saved,
                                        **({"launch": launch} if launch else {})).stored())
    shutil.rmtree(state_dir, ignore_errors=True)  # registered: nothing left to resume


class TrainingFailed(RuntimeError):
    """A training launch that failed; the message has the reason, the log path and its tail."""


def _remove_partial_outputs(store, name: str) -> None:
    """What an interrupted or failed attempt left of the output: the directory and temporary ones."""
    for partial in [store / name, *store.glob(f"{name}.tmp-*")]:
        shutil.rmtree(partial, ignore_errors=True)


def _record_launch(ctx: JobContext, launch: dict[str, Any]) -> None:
    """Keep a failed attempt's launch record on the job (`jobs show` prints it), fenced like every
    job write: only while this attempt still owns the job."""
    with ctx.session() as session:
        session.execute(update(Job).where(Job.id == ctx.job_id, Job.attempts == ctx.attempt, Job.state == JobState.RUNNING)
                        .values(result={"launch": launch}))


def _write_gold_examples(session, round_id: int, dataset_id: int, limit: int | None) -> None:
    questions = session.scalars(select(Question).where(Question.dataset_id == dataset_id)
                                .order_by(Question.index).limit(limit))
    insert_ignore(session, TrainingExample, [
        {"round_id": round_id, "variant": "gold", "question_id": q.id, "generation_id": None,
         "prompt": zero_shot(q.text), "response": q.gold_solution or q.gold_answer}
        for q in questions])


# --- evaluate ------------------------------------------------------------------------------------


def run_evaluate(ctx: JobContext) -> None:
    """Accuracy of one checkpoint on a labelled set, by the one evaluation path
    (``services.evaluation.evaluate``): the round's eval method (greedy zero-shot by default), or
    pass@k over k samples, or a strategy the payload names. Figures a round stored before under
    the same method are reused."""
    payload = parse_contract(EvaluatePayload, ctx.payload, f"job {ctx.job_id} payload")
    with ctx.session() as session:
        config = load_config(get_by_id(session, Round, ctx.round_id, "round"))
    method = round_eval_method(config, strategy=payload.strategy, shots=payload.shots, pass_at=payload.pass_at,
                               temperature=payload.temperature, top_p=payload.top_p)

    def progress(done: int, total: int) -> None:
        with ctx.session() as session:
            ctx.progress(session, done / max(total, 1))

    backend = method.strategy.backend or config.generation.backend or ctx.settings.backend
    engines: list[dict] = []

    def load(name: str, path: str, decoding: dict[str, Any]):
        loaded = load_named(name, path, backend, ctx.settings, decoding)
        engines.append(describe(loaded))
        return loaded

    def finish(session, figures: EvalFigures) -> None:
        ctx.finish(session, EvaluateResult(evaluation_id=figures.evaluation_id, accuracy=figures.accuracy,
                                           reused=figures.reused, input_tokens=figures.input_tokens,
                                           output_tokens=figures.output_tokens,
                                           **({"engine": engines[-1]} if engines else {})).stored())

    evaluate(ctx.session, load, checkpoint_id=payload.checkpoint_id, dataset_id=payload.dataset_id,
             method=method, limit=payload.limit, round_id=ctx.round_id, reuse=True, progress=progress,
             then=finish)


# --- promote -------------------------------------------------------------------------------------


def run_promote(ctx: JobContext) -> None:
    """The gate decides on the eval (dev) split alone; the report_on split's figures are recorded
    next to them for the report (services.promotion.gate_on_dev never sees them decide)."""
    with ctx.session() as session:
        round_ = get_by_id(session, Round, ctx.round_id, "round")
        config = load_config(round_)
        jobs = {JobKey.parse(job.key): job for job in session.scalars(select(Job).where(Job.round_id == ctx.round_id))}
        resolved = resolved_of(round_)
        reporting = resolved.report_on_id is not None

        def accuracies(subject: str) -> SplitAccuracy:
            report = _accuracy(jobs[JobKey.evaluate(subject, report_on=True)]) if reporting else None
            return SplitAccuracy(decide=_accuracy(jobs[JobKey.evaluate(subject)]), report=report)

        baseline = get_by_id(session, Checkpoint, resolved.baseline_id, "checkpoint")
        before = accuracies("baseline")
        candidates: dict[str, SplitAccuracy] = {}
        by_name: dict[str, Checkpoint] = {}
        for variant, checkpoint_id in parse_contract(PromotePayload, ctx.payload, f"job {ctx.job_id} payload").candidates.items():
            checkpoint = get_by_id(session, Checkpoint, checkpoint_id, "checkpoint")
            candidates[checkpoint.name] = accuracies(variant)
            by_name[checkpoint.name] = checkpoint
        decision = gate_on_dev(baseline.name, before, candidates, config.promotion.min_improvement,
                               decided_on=config.eval.dataset)

        now = utcnow()
        for name, checkpoint in by_name.items():
            # Compare-and-set: only a candidate can become promoted or rejected, once.
            status = CheckpointStatus.PROMOTED if name == decision.promoted else CheckpointStatus.REJECTED
            session.execute(update_status(checkpoint.id, status, now))
            checkpoint.metrics = {**(checkpoint.metrics or {}), "eval_accuracy": candidates[name].decide,
                                  "baseline_accuracy": before.decide,
                                  **({"report_accuracy": candidates[name].report} if reporting else {})}
        report_fields = {"report_on": config.eval.report_on, "baseline_report_accuracy": before.report,
                         "candidates_report": {name: a.report for name, a in candidates.items()}} if reporting else {}
        result = PromoteResult(outcome=CheckpointStatus.PROMOTED if decision.promoted else CheckpointStatus.REJECTED,
                               promoted=decision.promoted, reason=decision.reason, baseline=baseline.name,
                               baseline_accuracy=before.decide, decided_on=config.eval.dataset,
                               candidates={name: a.decide for name, a in candidates.items()}, **report_fields)
        session.flush()
        round_.report = round_report(session, round_, promotion=result)
        ctx.finish(session, result.stored())


def _accuracy(evaluation: Job) -> float:
    """A done evaluate job's accuracy (promote runs only once every evaluation is done)."""
    result = result_of(evaluation, EvaluateResult)
    if result is None:
        raise RuntimeError(f"job {evaluation.id} ({evaluation.key}) has no result to promote on")
    return result.accuracy


def update_status(checkpoint_id: int, status: str, now) -> Update:
    values: dict[str, Any] = {"status": status}
    if status == CheckpointStatus.PROMOTED:
        values["promoted_at"] = now
    candidate = (Checkpoint.id == checkpoint_id) & (Checkpoint.status == CheckpointStatus.CANDIDATE)
    return update(Checkpoint).where(candidate).values(**values)


HANDLERS = {
    JobKind.GENERATE: run_generate,
    JobKind.VOTE: run_vote,
    JobKind.PAIRS: run_pairs,
    JobKind.TRAIN: run_train,
    JobKind.EVALUATE: run_evaluate,
    JobKind.PROMOTE: run_promote,
}

# Keep the environment tidy for DeepSpeed subprocesses started from a Celery worker.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
