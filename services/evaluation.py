"""Answering with a strategy (CoT, self-consistency, LECO) and evaluating a checkpoint with it.

``solve`` is the one place a strategy turns prompts into answers, for the round workers, for
``w2sctl solve`` and for evaluations: every solution comes with its step scores and the tokens
it cost. ``evaluate_questions`` grades solutions against gold; ``evaluate`` does that for a
registered checkpoint on an imported labelled dataset and stores the result as an ``Evaluation``
row (one per checkpoint, dataset, method label and question count: a new run replaces the old
figures). ``evaluate`` is the only evaluation there is: the promotion gate's evaluate job, ``w2sctl
eval run`` and the demo's rounds all call it, so their accuracies are one measurement.

Token accounting: ``input_tokens`` are the tokens the model actually encoded (self-consistency
encodes the prompt once per sample: ``generate`` expands it to n rows; a LECO rethink encodes only
what its cache does not hold), ``output_tokens`` the generated tokens kept in the text (eos, padding
and stop strings not counted; see ``models.backends.base.Completion``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Dataset, Evaluation, Question, utcnow
from db.session import insert_ignore
from models.answers import answers_match, extract_answer
from models.backends import CallStats, ModelBackend, in_format
from models.generation import generate, step_generator
from models.leco import LecoResult, Step, leco_solve, majority_index, score_steps
from models.prompts import clean_response, prompt_too_long, step_by_step
from services.config import StrategyConfig
from services.errors import InputError, NotFound
from services.registry import get_checkpoint, get_dataset


@dataclass
class Sample:
    """One generated answer: its cleaned text, extracted answer and step scores."""

    text: str
    answer: str
    steps: list[dict[str, Any]]
    input_tokens: int
    output_tokens: int


@dataclass
class Solution:
    """A strategy's answer to one question. ``samples[0]`` is the answer given (sc: a sample with
    the majority answer; leco: the vote's winning solution); tokens are summed over every call."""

    answer: str
    samples: list[Sample]
    input_tokens: int
    output_tokens: int
    leco: LecoResult | None = None  # the whole rethink trail, for ``w2sctl solve``

    @property
    def text(self) -> str:
        return self.samples[0].text


@dataclass
class SolveStats:
    """Per batched model call: what ``solve`` encoded and generated (LECO: also what re-encoding would)."""

    calls: list[CallStats] = field(default_factory=list)


def step_dicts(steps: Sequence[Step]) -> list[dict[str, Any]]:
    """Step scores as stored on a generation (``Generation.step_scores``)."""
    return [{"text": s.text, "avg": s.avg, "trans": s.trans, "diver": s.diver, "score": s.score, "tokens": s.n_tokens}
            for s in steps]


def solve(
    loaded: ModelBackend,
    prompts: Sequence[str],
    task: str,
    strategy: StrategyConfig,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    seed: int = 0,
    stats: SolveStats | None = None,
) -> list[Solution]:
    """One solution per prompt, in order."""
    if not prompts:
        return []
    check_prompts_fit(loaded, prompts, max_new_tokens)
    if strategy.strategy == "leco":
        return _solve_leco(loaded, prompts, task, strategy, max_new_tokens, batch_size, stats)
    sampling: dict[str, Any] = {}
    if strategy.strategy == "sc":
        sampling = {"do_sample": True, "num_samples": strategy.samples, "temperature": strategy.temperature,
                    "top_p": strategy.top_p, "seed": seed}
    completions = generate(loaded, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           return_token_probs=strategy.token_prob, **sampling)
    solutions = []
    for samples in completions:
        scored = [_sample(c.text, c.token_texts or [], c.token_probs or [], task, c.input_tokens, c.output_tokens)
                  for c in samples]
        first = majority_index([s.answer for s in scored], task)
        scored.insert(0, scored.pop(first))  # the answer given comes first
        solutions.append(Solution(answer=scored[0].answer, samples=scored,
                                  input_tokens=sum(s.input_tokens for s in scored),
                                  output_tokens=sum(s.output_tokens for s in scored)))
    if stats is not None:
        stats.calls.append(CallStats(len(prompts), sum(s.input_tokens for s in solutions),
                                     sum(s.input_tokens for s in solutions), sum(s.output_tokens for s in solutions)))
    return solutions


def check_prompts_fit(loaded: ModelBackend, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Every prompt leaves room for ``max_new_tokens`` in the model's context (prompt +
    max_new_tokens <= context): past it, positions the model never saw produce garbage or an index
    error. A prompt that does not fit is refused with its length; the usual cause is the
    demonstrations. (The round's generate jobs fit their prompts first and skip what cannot fit.)"""
    context = loaded.context_length
    if context is None:
        return
    lengths = loaded.count_tokens(prompts)
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > context:
        raise InputError(f"prompt {longest + 1} of {loaded.path}: {prompt_too_long(lengths[longest], max_new_tokens, context)}: "
                         "use fewer demonstrations (--shots), a smaller max_new_tokens or a model with a longer context")


def _sample(text: str, pieces: list[str], probs: list[float], task: str, input_tokens: int, output_tokens: int) -> Sample:
    cleaned = clean_response(text)
    return Sample(cleaned, extract_answer(cleaned, task), step_dicts(score_steps(pieces, probs)),
                  input_tokens, output_tokens)


def _solve_leco(loaded, prompts, task, strategy, max_new_tokens, batch_size, stats) -> list[Solution]:
    """One batch of questions at a time: their KV caches live only while their loop runs."""
    solutions = []
    for start in range(0, len(prompts), batch_size):
        group = list(prompts[start : start + batch_size])
        generator = step_generator(loaded, group, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   token_probs=strategy.token_prob, reuse_cache=strategy.reuse_cache,
                                   divert=strategy.rethink == "divert")
        for result in leco_solve(group, generator, task=task, max_rethinks=strategy.max_rethinks):
            winner = next(a for a in reversed(result.attempts) if a.text == result.text)
            cleaned = clean_response(result.text)
            sample = Sample(cleaned, result.answer, step_dicts(winner.steps), result.input_tokens, result.output_tokens)
            solutions.append(Solution(answer=result.answer, samples=[sample], input_tokens=result.input_tokens,
                                      output_tokens=result.output_tokens, leco=result))
        if stats is not None:
            stats.calls.extend(generator.calls)
    return solutions


# --- evaluation ----------------------------------------------------------------------------------
#
# One path for every accuracy the project shows: the promotion gate (the evaluate job), `w2sctl eval
# run` and `eval compare`, and the demo (which runs rounds). Whatever decides a figure (prompt,
# strategy, generation budget, grading, seed) is in `EvalMethod`, and its label is the key the figure
# is stored under, so two figures under one label are one measurement.


@dataclass(frozen=True)
class GoldQuestion:
    id: int
    text: str
    gold: str


@dataclass(frozen=True)
class EvalMethod:
    """How a checkpoint is evaluated. ``pass_at``: sample ``strategy.samples`` answers (sc) and count
    a question right when any of them is (pass@k), instead of the majority's answer."""

    strategy: StrategyConfig = StrategyConfig()  # cot: greedy, one answer
    shots: int = 0  # step-by-step demonstrations before the question (0: the zero-shot prompt)
    pass_at: bool = False
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pass_at and self.strategy.strategy != "sc":
            raise ValueError(f"pass_at: needs the sc strategy (k samples), got {self.strategy.strategy}")

    def label(self) -> str:
        """The name the figures are stored under, and the key a round reuses them by: everything
        that changes the answers (``eval_label``), e.g. ``cot/0-shot/512-new``,
        ``sc@10/4-shot/512-new/t0.7/p1``, ``pass@10/0-shot/1024-new/t1/p1``,
        ``leco/0-shot/512-new/top5/3-rethinks/divert``."""
        name = f"pass@{self.strategy.samples}" if self.pass_at else self.strategy.label()
        return eval_label(name, self.shots, self.strategy, self.max_new_tokens)


def eval_label(name: str, shots: int, strategy: StrategyConfig, max_new_tokens: int) -> str:
    """An evaluation's identity as a label: the method's name and shots, then the generation
    settings that change its answers. Sampling adds temperature and top-p; LECO adds the step-score
    mode, the rethinks and the rethink rule (they decide which steps are redone). Left out, as
    they do not change what is measured: batch size, LECO's KV-cache reuse (same tokens either
    way), and the seed (a sampled figure is one draw of the same measurement)."""
    parts = [name, f"{shots}-shot", f"{max_new_tokens}-new"]
    if strategy.strategy == "sc":
        parts += [f"t{strategy.temperature:g}", f"p{strategy.top_p:g}"]
    if strategy.strategy == "leco":
        parts += [strategy.token_prob, f"{strategy.max_rethinks}-rethinks", strategy.rethink]
    return "/".join(parts)


def round_eval_method(config: Any, *, strategy: StrategyConfig | dict[str, Any] | None = None, shots: int | None = None,
                      pass_at: int | None = None, temperature: float = 1.0, top_p: float = 1.0) -> EvalMethod:
    """A round's evaluation: its ``eval`` section's strategy and shots, its generation budget and
    seed. ``pass_at=k``: k answers sampled at ``temperature``/``top_p`` (stage II's pass@k).
    ``strategy``/``shots`` override the eval section (an evaluation job that names its own)."""
    chosen: StrategyConfig
    if pass_at:
        chosen = StrategyConfig(strategy="sc", samples=pass_at, temperature=temperature, top_p=top_p)
    elif strategy is None:
        chosen = config.eval.strategy
    elif isinstance(strategy, dict):
        chosen = StrategyConfig.model_validate(strategy)
    else:
        chosen = strategy
    return EvalMethod(strategy=chosen, shots=config.eval.shots if shots is None else shots, pass_at=bool(pass_at),
                      max_new_tokens=config.generation.max_new_tokens, batch_size=config.generation.batch_size,
                      seed=config.seed)


@dataclass
class EvalOutcome:
    strategy: str  # the label (EvalMethod.label): cot/0-shot/512-new, pass@10/0-shot/512-new/t1/p1, ...
    n_questions: int
    correct: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    solutions: list[Solution]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n_questions if self.n_questions else 0.0


def grade_solution(solution: Solution, gold: str, task: str, pass_at: bool = False) -> bool:
    """The answer given is right; with ``pass_at``, any sample's answer is."""
    answers = [sample.answer for sample in solution.samples] if pass_at else [solution.answer]
    return any(answers_match(answer, gold, task) for answer in answers)


def evaluate_questions(
    loaded: ModelBackend,
    questions: Sequence[GoldQuestion],
    task: str,
    method: EvalMethod,
    *,
    progress: Callable[[int], None] | None = None,
    stats: SolveStats | None = None,
) -> EvalOutcome:
    """Accuracy of one method on labelled questions, with the tokens it took and its wall time.
    Questions go to ``solve`` in groups of four batches; a sampling group is seeded by the method's
    seed and its first question's id, so a question's samples do not depend on the other questions
    asked."""
    started = time.perf_counter()
    strategy = method.strategy
    solutions: list[Solution] = []
    group_size = max(1, method.batch_size * 4 // (strategy.samples if strategy.strategy == "sc" else 1))
    for start in range(0, len(questions), group_size):
        group = questions[start : start + group_size]
        prompts = [step_by_step(q.text, task, method.shots) for q in group]
        solutions += solve(loaded, prompts, task, strategy, max_new_tokens=method.max_new_tokens,
                           batch_size=method.batch_size, seed=method.seed * 1_000_003 + group[0].id, stats=stats)
        if progress:
            progress(len(solutions))
    correct = sum(grade_solution(s, q.gold, task, method.pass_at) for s, q in zip(solutions, questions))
    return EvalOutcome(method.label(), len(questions), correct, sum(s.input_tokens for s in solutions),
                       sum(s.output_tokens for s in solutions), time.perf_counter() - started, solutions)


def gold_questions(session: Session, dataset: Dataset, limit: int | None = None) -> list[GoldQuestion]:
    """The dataset's questions in file order; an unlabelled dataset (or a question without gold) is an error."""
    if not dataset.labelled:
        raise InputError(f"dataset {dataset.name!r} has no gold answers (it was imported with --unlabelled): "
                         "evaluation needs a labelled dataset")
    rows = session.execute(select(Question.id, Question.index, Question.text, Question.gold_answer)
                           .where(Question.dataset_id == dataset.id).order_by(Question.index).limit(limit)).all()
    missing = [row.index for row in rows if not row.gold_answer]
    if missing:
        raise InputError(f"dataset {dataset.name!r}: question(s) at line {', '.join(map(str, missing[:5]))} "
                         "have no gold answer: evaluation needs one for every question")
    return [GoldQuestion(row.id, row.text, row.gold_answer) for row in rows]


def store_evaluation(session: Session, *, checkpoint_id: int, dataset_id: int, outcome: EvalOutcome,
                     round_id: int | None = None) -> Evaluation:
    """Write the figures under the outcome's label (replacing an earlier evaluation under the same
    key). The caller commits."""
    key = dict(checkpoint_id=checkpoint_id, dataset_id=dataset_id, strategy=outcome.strategy,
               n_questions=outcome.n_questions)
    figures = dict(correct=outcome.correct, accuracy=outcome.accuracy, input_tokens=outcome.input_tokens,
                   output_tokens=outcome.output_tokens, wall_s=outcome.wall_s, round_id=round_id, created_at=utcnow())
    existing = session.scalar(select(Evaluation).filter_by(**key))
    if existing is not None:
        for name, value in figures.items():
            setattr(existing, name, value)
    else:
        insert_ignore(session, Evaluation, [{**key, **figures}])
    session.flush()
    return session.scalars(select(Evaluation).filter_by(**key)).one()  # written just above


@dataclass(frozen=True)
class EvalFigures:
    """What an evaluation measured, as stored (``reused``: an earlier round's stored figures)."""

    evaluation_id: int
    label: str
    n_questions: int
    correct: int
    accuracy: float
    input_tokens: int
    output_tokens: int
    wall_s: float
    reused: bool = False

    @classmethod
    def of(cls, evaluation: Evaluation, reused: bool = False) -> EvalFigures:
        return cls(evaluation.id, evaluation.strategy, evaluation.n_questions, evaluation.correct, evaluation.accuracy,
                   evaluation.input_tokens, evaluation.output_tokens, evaluation.wall_s, reused)


def evaluate(
    session_scope: Callable[[], Any],
    load: Callable[[str, str, dict[str, Any]], ModelBackend],
    *,
    checkpoint_id: int,
    dataset_id: int,
    method: EvalMethod,
    limit: int | None = None,
    round_id: int | None = None,
    reuse: bool = False,
    progress: Callable[[int, int], None] | None = None,
    then: Callable[[Session, EvalFigures], None] | None = None,
    stats: SolveStats | None = None,
) -> EvalFigures:
    """Evaluate a registered checkpoint on an imported labelled dataset and store the figures.

    Reads the questions in a short transaction, loads the model (``load(name, path, decoding)``) and answers
    outside any, then stores the figures and calls ``then(session, figures)`` in the same
    transaction (a job marks itself done there). ``reuse``: figures that a round stored under the
    same key (checkpoint, dataset, method label, question count) are taken as they are, without
    loading the model. ``session_scope()`` opens a session that commits on exit."""
    with session_scope() as session:
        dataset, checkpoint = session.get(Dataset, dataset_id), session.get(Checkpoint, checkpoint_id)
        if dataset is None or checkpoint is None:
            raise NotFound(f"dataset {dataset_id} does not exist" if dataset is None else
                           f"checkpoint {checkpoint_id} does not exist")
        questions, task = gold_questions(session, dataset, limit), dataset.task
        name, path, prompt_format = checkpoint.name, checkpoint.path, checkpoint.prompt_format
        decoding = dict(checkpoint.decoding or {})
        if not questions:
            raise InputError(f"dataset {dataset.name!r} has no questions")
        if reuse:
            stored = session.scalar(select(Evaluation).where(
                Evaluation.checkpoint_id == checkpoint_id, Evaluation.dataset_id == dataset_id,
                Evaluation.strategy == method.label(), Evaluation.n_questions == len(questions),
                Evaluation.round_id.is_not(None)))
            if stored is not None:
                figures = EvalFigures.of(stored, reused=True)
                if then is not None:
                    then(session, figures)
                return figures
    loaded = in_format(load(name, path, decoding), prompt_format)  # as the checkpoint was registered (or trained)
    outcome = evaluate_questions(loaded, questions, task, method, stats=stats,
                                 progress=(lambda done: progress(done, len(questions))) if progress else None)
    with session_scope() as session:
        figures = EvalFigures.of(store_evaluation(session, checkpoint_id=checkpoint_id, dataset_id=dataset_id,
                                                  outcome=outcome, round_id=round_id))
        if then is not None:
            then(session, figures)
        return figures


def compare(session: Session, model: str, dataset: str) -> list[Evaluation]:
    """Every stored evaluation of the model on the dataset, newest first per strategy."""
    checkpoint, ds = get_checkpoint(session, model), get_dataset(session, dataset)
    return list(session.scalars(select(Evaluation).where(Evaluation.checkpoint_id == checkpoint.id,
                                                         Evaluation.dataset_id == ds.id)
                                .order_by(Evaluation.strategy, Evaluation.n_questions.desc())))
