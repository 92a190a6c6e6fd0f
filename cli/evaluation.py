"""`w2sctl solve`, `w2sctl eval run`, `w2sctl eval compare`: answer with a strategy, evaluate, compare.

Thin: parse, validate, call ``services.evaluation``, print. Both run the model in this process
(on this machine's device), like a worker would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Column, Table
from rich.text import Text

from cli.context import App, Group, console, pass_app
from services.config import STRATEGIES, StrategyConfig
from services.errors import InputError

MAX_NEW_TOKENS = {"gsm8k": 512, "math": 1024}  # ref (ALGORITHMS.md, LECO)


def _strategy(strategy: str, samples: int, temperature: float, token_prob: str, max_rethinks: int, rethink: str,
              no_cache: bool) -> StrategyConfig:
    return StrategyConfig(strategy=strategy, samples=samples, temperature=temperature, token_prob=token_prob,
                          max_rethinks=max_rethinks, rethink=rethink, reuse_cache=not no_cache)


def strategy_options(f):
    """The options every strategy command takes."""
    options = [
        click.option("--strategy", type=click.Choice(STRATEGIES), default="leco", show_default=True,
                     help="cot: greedy; sc: self-consistency over --samples; leco: greedy + rethinks."),
        click.option("--samples", type=click.IntRange(min=1, max=256), default=10, show_default=True,
                     help="sc: answers sampled per question."),
        click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=0.7,
                     show_default=True, help="sc: sampling temperature."),
        click.option("--token-prob", type=click.Choice(["top5", "full"]), default="top5", show_default=True,
                     help="Step scores read the chosen token's probability over the top-5 logits (ref) or all."),
        click.option("--max-rethinks", type=click.IntRange(min=0, max=16), default=3, show_default=True,
                     help="leco: rethinks after the original answer."),
        click.option("--rethink", type=click.Choice(["divert", "greedy"]), default="divert", show_default=True,
                     help="leco: turn a rethink away from the dropped step at its least confident token, or plain greedy."),
        click.option("--no-cache", is_flag=True, help="leco: re-encode prompt and kept steps instead of reusing the KV cache."),
        click.option("--shots", type=click.IntRange(min=0, max=4), default=4, show_default=True,
                     help="Step-by-step demonstrations in the prompt (0: zero-shot)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Default (ref): 512 for GSM8K, 1024 for MATH."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(app: App, model: str):
    """A registered model by name (in its registered prompt format and decoding), or a checkpoint
    directory (plain prompts, its own generation_config.json)."""
    from models.backends import default_cache
    from models.backends.loader import in_format
    from services.errors import NotFound
    from services.registry import get_checkpoint

    decoding, prompt_format = None, "plain"
    with app.session() as session:
        try:
            checkpoint = get_checkpoint(session, model)
            path, decoding, prompt_format = checkpoint.path, checkpoint.decoding, checkpoint.prompt_format
        except NotFound:
            if not Path(model).is_dir():
                raise
            path = model
    return in_format(default_cache().get(path, decoding=decoding), prompt_format)


# --- solve ---------------------------------------------------------------------------------------


@click.command("solve", cls=click.Command)
@click.argument("question")
@click.option("--model", required=True, help="A registered model name, or a checkpoint directory.")
@click.option("--task", type=click.Choice(["gsm8k", "math"]), default="gsm8k", show_default=True)
@strategy_options
@pass_app
def solve_command(app: App, question: str, model: str, task: str, shots: int, max_new_tokens: int, batch_size: int,
                  **options: Any) -> None:
    """Answer one question and show the steps, their scores, each rethink and the vote."""
    from models.prompts import step_by_step
    from services.evaluation import solve

    if not question.strip():
        raise click.ClickException("question: empty")
    strategy = _strategy(**options)
    loaded = _load(app, model)
    (solution,) = solve(loaded, [step_by_step(question, task, shots)], task, strategy,
                        max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], batch_size=batch_size)
    if solution.leco is not None:
        _print_leco(solution.leco)
    else:
        for index, sample in enumerate(solution.samples):
            title = "answer" if strategy.strategy == "cot" else f"sample {index + 1}" + (" (majority)" if index == 0 else "")
            console.print(_steps_table(title, sample.steps, None, 0))
            console.print(f"  answer: {sample.answer or '(none)'}")
    console.print(f"[bold]final answer: {solution.answer or '(none)'}[/bold]   "
                  f"input tokens {solution.input_tokens}, output tokens {solution.output_tokens}")


def _steps_table(title: str, steps: list[dict[str, Any]], suspect: int | None, kept: int) -> Table:
    table = Table("#", "step", "avg", "trans", "diver", "score", "", title=title, title_justify="left")
    for i, step in enumerate(steps):
        mark = "<- suspected error" if i == suspect else "kept" if i < kept else ""
        table.add_row(str(i + 1), step["text"].strip(), f"{step['avg']:.3f}", f"{step['trans']:.3f}",
                      f"{step['diver']:.3f}", f"{step['score']:.3f}", mark)
    return table


def _print_leco(result) -> None:
    from services.evaluation import step_dicts

    for index, attempt in enumerate(result.attempts):
        title = "original" if index == 0 else f"rethink {index} (continues {attempt.kept_steps} kept step(s))"
        console.print(_steps_table(title, step_dicts(attempt.steps), attempt.suspect, attempt.kept_steps))
        console.print(f"  answer: {attempt.answer or '(none)'}   input tokens {attempt.input_tokens}, "
                      f"output tokens {attempt.output_tokens}")
    console.print(f"stopped: {result.stop_reason}")
    console.print("vote (original 1.5, each rethink 1.0): "
                  + ", ".join(f"{answer or '(none)'}: {weight:g}" for answer, weight in result.votes))


# --- eval ----------------------------------------------------------------------------------------


@click.group("eval", cls=Group)
def eval_group() -> None:
    """Evaluate a checkpoint on a labelled dataset with CoT, self-consistency or LECO."""


@eval_group.command("run")
@click.option("--model", required=True, help="A registered model (base or trained checkpoint).")
@click.option("--dataset", required=True, help="An imported labelled dataset.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="The first N questions only.")
@click.option("--seed", type=int, default=0, show_default=True, help="sc: sampling seed.")
@strategy_options
@pass_app
def eval_run(app: App, model: str, dataset: str, limit: int | None, seed: int, shots: int, max_new_tokens: int,
             batch_size: int, **options: Any) -> None:
    """Accuracy, tokens in/out and wall time of one strategy; stored as an evaluation. The same
    evaluation as a round's gate: with the round's strategy, shots and --max-new-tokens it
    measures the same figure."""
    from db.schema import Evaluation
    from models.backends import default_cache
    from services.evaluation import EvalMethod, evaluate
    from services.registry import get_checkpoint, get_dataset

    with app.session() as session:  # every check before the model loads
        checkpoint, ds = get_checkpoint(session, model), get_dataset(session, dataset)
        checkpoint_id, dataset_id = checkpoint.id, ds.id
        method = EvalMethod(strategy=_strategy(**options), shots=shots, batch_size=batch_size, seed=seed,
                            max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[ds.task])
    label = method.label()
    with console.status(f"{label} on {dataset}") as status:
        figures = evaluate(app.session, lambda _name, path, decoding: default_cache().get(path, decoding=decoding),
                           checkpoint_id=checkpoint_id,
                           dataset_id=dataset_id,
                           method=method, limit=limit,
                           progress=lambda done, total: status.update(f"{label}: {done}/{total} questions"))
    with app.session() as session:
        console.print(_compare_table(model, dataset, [session.get(Evaluation, figures.evaluation_id)]))


@eval_group.command("compare")
@click.option("--model", required=True)
@click.option("--dataset", required=True)
@pass_app
def eval_compare(app: App, model: str, dataset: str) -> None:
    """Every stored evaluation of a model on a dataset, side by side."""
    from services.evaluation import compare

    with app.session() as session:
        evaluations = compare(session, model, dataset)
        if not evaluations:
            raise InputError(f"no evaluations of {model!r} on {dataset!r}: run `w2sctl eval run` first")
        console.print(_compare_table(model, dataset, evaluations))


def split_label(label: str) -> tuple[str, str]:
    """``cot/0-shot/512-new/...`` → (``cot/0-shot``, ``512-new ...``); a label stored before labels
    named the settings has none (``—``)."""
    parts = label.split("/")
    return "/".join(parts[:2]), " ".join(parts[2:]) or "—"


def _compare_table(model: str, dataset: str, evaluations) -> Table:
    # The label as the method, then under it the generation settings, which wrap (the figures never do).
    table = Table(Column("strategy", min_width=11),
                  *(Column(name, no_wrap=True) for name in ("n", "accuracy", "tokens in", "tokens out", "in/q",
                                                            "out/q", "wall s")),
                  title=f"{model} on {dataset}", title_justify="left")
    for e in evaluations:
        method, settings = split_label(e.strategy)
        table.add_row(Text(method) + Text("\n" + settings, style="dim"), str(e.n_questions), f"{e.accuracy:.1%}",
                      f"{e.input_tokens:,}",
                      f"{e.output_tokens:,}", f"{e.input_tokens / e.n_questions:,.1f}",
                      f"{e.output_tokens / e.n_questions:,.1f}", f"{e.wall_s:.1f}")
    return table
