"""`w2sctl`: parse, validate, call a service function, print. Nothing clever lives here."""

from __future__ import annotations

if __name__ == "__main__":  # `python -m services.cli`: run the importable module, where every command module
    from services.cli import main as _main  # registered at the end has been added (no second, partial copy)

    _main()
    raise SystemExit(0)

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Dataset, Job, Round
from db.session import SchemaOutOfDate, database_error_line, ensure_schema, session_scope, upgrade
from models.loading import CheckpointError
from services.config import QUEUES, ConfigError, load_round_config_file, load_settings, parse_round_config
from services.errors import W2SError

console = Console(highlight=False)


class App:
    """The context object: settings, and sessions on a migrated database."""

    def __init__(self) -> None:
        self.settings = load_settings()
        self._schema_checked = False

    @contextmanager
    def session(self) -> Iterator[Session]:
        if not self._schema_checked:
            ensure_schema(self.settings.database_url)
            self._schema_checked = True
        with session_scope(self.settings.database_url) as session:
            yield session


pass_app = click.make_pass_decorator(App, ensure=True)


class Group(click.Group):
    """Every user-fixable error becomes one clear line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (W2SError, CheckpointError, SchemaOutOfDate) as exc:
            raise click.ClickException(str(exc)) from None
        except DBAPIError as exc:  # the database is down, not created or not migrated: say which and the fix
            line = database_error_line(exc, load_settings().database_url)
            if line is None:
                raise
            raise click.ClickException(line) from None


def main() -> None:
    cli(prog_name="w2sctl")


@click.group(cls=Group)
@click.version_option(package_name="w2s")
def cli() -> None:
    """w2s: weak-to-strong reasoning as a job service."""


# --- db ------------------------------------------------------------------------------------------


@cli.group(cls=Group)
def db() -> None:
    """The SQL store."""


@db.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Apply Alembic migrations to W2S_DATABASE_URL."""
    upgrade(app.settings.database_url)
    console.print(f"database at head: {app.settings.redacted_database_url()}")


# --- datasets ------------------------------------------------------------------------------------


@cli.group(cls=Group)
def dataset() -> None:
    """Question sets: labelled (gold answers) or unlabelled pools."""


@dataset.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Name to refer to the dataset by.")
@click.option("--task", type=click.Choice(["gsm8k", "math"]), default="gsm8k", show_default=True,
              help="Answer format: GSM8K numbers or MATH LaTeX.")
@click.option("--unlabelled", is_flag=True, help="A question pool: gold answers, if any, are kept for reports only.")
@pass_app
def dataset_import(app: App, path: Path, name: str, task: str, unlabelled: bool) -> None:
    """Import a JSONL (or JSON array) question file."""
    from services.registry import import_dataset

    with app.session() as session:
        ds = import_dataset(session, path, name=name, task=task, labelled=not unlabelled)
        console.print(f"imported {ds.size} questions as dataset {ds.name!r} ({task}, "
                      f"{'labelled' if ds.labelled else 'unlabelled pool'})")


@dataset.command("list")
@pass_app
def dataset_list(app: App) -> None:
    with app.session() as session:
        table = Table("name", "task", "questions", "labelled", "source")
        for ds in session.scalars(select(Dataset).order_by(Dataset.id)):
            table.add_row(ds.name, ds.task, str(ds.size), "yes" if ds.labelled else "no", ds.source)
        console.print(table)


# --- models --------------------------------------------------------------------------------------


@cli.group(cls=Group)
def model() -> None:
    """Local model checkpoints (Hugging Face directories in safetensors)."""


@model.command("register")
@click.argument("name")
@click.option("--path", "path", required=True, type=click.Path(path_type=Path), help="Local checkpoint directory.")
@click.option("--role", type=click.Choice(["weak", "strong"]), required=True, help="Weak teacher or strong student.")
@pass_app
def model_register(app: App, name: str, path: Path, role: str) -> None:
    from services.registry import register_model

    with app.session() as session:
        checkpoint = register_model(session, name=name, path=path, role=role)
        console.print(f"registered {role} model {checkpoint.name!r} at {checkpoint.path}")


@model.command("list")
@pass_app
def model_list(app: App) -> None:
    """Every checkpoint: registered models and the candidates rounds trained."""
    with app.session() as session:
        table = Table("id", "name", "role", "status", "parent", "round", "eval acc", "path")
        names = dict(session.execute(select(Checkpoint.id, Checkpoint.name)).all())
        for ckpt in session.scalars(select(Checkpoint).order_by(Checkpoint.id)):
            accuracy = (ckpt.metrics or {}).get("eval_accuracy")
            table.add_row(str(ckpt.id), ckpt.name, ckpt.role, ckpt.status, names.get(ckpt.parent_id, ""),
                          str(ckpt.round_id or ""), "" if accuracy is None else f"{accuracy:.1%}", ckpt.path)
        console.print(table)


# --- rounds --------------------------------------------------------------------------------------


@cli.group("round", cls=Group)
def round_() -> None:
    """Start and follow rounds."""


@round_.command("start")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML round config; flags override it.")
@click.option("--stage", type=click.Choice(["sft", "preference", "weak-sft"]),
              help="sft: stage I vote + fine-tune; preference: stage II pairs + DPO/ORPO; weak-sft: train a weak model on gold.")
@click.option("--iteration", type=int, help="Stage I iteration (1: weak + strong-ICL; 2: two fine-tuned students).")
@click.option("--weak", help="Weak voter (registered model name).")
@click.option("--strong", help="Strong voter (registered model name).")
@click.option("--student", help="Model to fine-tune (default: the strong voter).")
@click.option("--pool", help="Unlabelled question pool.")
@click.option("--pool-limit", type=int, help="Use only the first N pool questions.")
@click.option("--train", "train_set", help="weak-sft: labelled dataset with gold solutions.")
@click.option("--train-limit", type=int, help="weak-sft: train on the first N questions only.")
@click.option("--eval", "eval_set", help="Labelled dataset for the promotion gate.")
@click.option("--eval-limit", type=int, help="Evaluate on the first N questions only.")
@click.option("--demonstrations", type=int, help="In-context demonstrations for the strong voter (ref: 4).")
@click.option("--variants", help="Comma-separated training sets: weak,icl,hybrid.")
@click.option("--loss", type=click.Choice(["dpo", "orpo"]), help="Stage II preference loss.")
@click.option("--samples", type=int, help="Stage II: answers the student samples per question (ref: 10).")
@click.option("--seed", type=int)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other config field, dotted: --set training.epochs=3 --set generation.batch_size=32.")
@click.option("--name", help="A name for the round, unique: starting a round of that name again returns it "
              "(safe to retry after an error) instead of making a second one.")
@click.option("--wait/--no-wait", default=None, help="Wait for the round to end (default: yes when embedded).")
@pass_app
def round_start(app: App, config_file: Path | None, wait: bool | None, sets: tuple[str, ...], name: str | None,
                **flags: Any) -> None:
    """Validate a round config, write the round and its first jobs, enqueue them."""
    from services.registry import validate_name
    from services.rounds import named_round, start_round
    from workers.dispatch import SendFailed, enqueue

    overrides = _overrides(flags, sets)
    config = load_round_config_file(config_file, overrides) if config_file else parse_round_config(overrides, "round flags")
    if name is not None:
        validate_name(name, "--name")
    with app.session() as session:
        existed = name is not None and named_round(session, name) is not None
        round_obj, job_ids = start_round(session, config, name=name)
        round_id, state = round_obj.id, round_obj.state
    try:
        enqueue(job_ids)
    except SendFailed as exc:
        raise click.ClickException(
            f"round {round_id} is recorded but its {len(job_ids)} queued job(s) could not be sent ({exc}); "
            "the control worker's reconciliation sends them once the broker is back (W2S_RECONCILE_S), "
            f"or run `w2sctl round resume {round_id}`; do not start it again") from None
    if existed:
        console.print(f"round {round_id} ({name}) already exists, {state}: {len(job_ids)} queued jobs sent again")
    else:
        console.print(f"round {round_id} started: {config.stage}, {len(job_ids)} jobs queued")
    if wait is None:
        wait = app.settings.embedded
    if wait:
        _wait_for_round(app, round_id)
        _print_status(app, round_id)


def _overrides(flags: dict[str, Any], sets: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    simple = {"stage": "stage", "iteration": "iteration", "weak": "weak", "strong": "strong", "student": "student",
              "pool": "pool", "pool_limit": "pool_limit", "train_set": "train", "train_limit": "train_limit", "demonstrations": "demonstrations",
              "seed": "seed"}
    for flag, field in simple.items():
        if flags.get(flag) is not None:
            out[field] = flags[flag]
    if flags.get("loss"):
        out.setdefault("training", {})["loss"] = flags["loss"]
    if flags.get("samples") is not None:
        out.setdefault("sampling", {})["samples"] = flags["samples"]
    if flags.get("variants"):
        out["variants"] = [v.strip() for v in flags["variants"].split(",") if v.strip()]
    if flags.get("eval_set") is not None or flags.get("eval_limit") is not None:
        out["eval"] = {k: v for k, v in (("dataset", flags.get("eval_set")), ("limit", flags.get("eval_limit"))) if v is not None}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        import yaml

        target = out
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)
    return out


def _wait_for_round(app: App, round_id: int) -> None:
    """Embedded: run the jobs here. Distributed: poll the database until the round ends."""
    from workers.dispatch import drain

    if app.settings.embedded:
        def show(job_id: int) -> None:
            with app.session() as session:
                job = session.get(Job, job_id)
                took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else 0
                mark = {"done": "[green]✓[/]", "failed": "[red]✗[/]"}.get(job.state, "[yellow]↻[/]")
                console.print(f"  {mark} round {round_id} {job.key:<22} {job.state:<8} {took:6.1f}s {_brief(job.result)}")

        drain(on_job_done=show)
        return
    with console.status(f"waiting for round {round_id}"):
        while True:
            with app.session() as session:
                if session.get(Round, round_id).state in ("done", "failed", "cancelled"):
                    return
            time.sleep(2)


def _brief(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    keys = ("kept", "generated", "accuracy", "examples", "outcome", "skipped")
    parts = []
    for key in keys:
        if key in result and result[key] is not None:
            value = result[key]
            parts.append(f"{key}={value:.1%}" if key == "accuracy" else f"{key}={value}")
    return " ".join(parts)


@round_.command("status")
@click.argument("round_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with --watch: one JSON line per refresh).")
@click.option("--watch", is_flag=True, help="Live view, one progress bar per step, until the round ends.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between refreshes of --watch.")
@pass_app
def round_status(app: App, round_id: int, as_json: bool, watch: bool, interval: float) -> None:
    """Per-step job counts and progress and, when the round is done, its report."""
    if watch:
        from services.cli_ops import watch_round

        watch_round(app, round_id, as_json, interval)
        if as_json:
            return
    _print_status(app, round_id, as_json)


def _print_status(app: App, round_id: int, as_json: bool = False) -> None:
    from services.report import job_counts, round_report
    from services.rounds import get_round

    with app.session() as session:
        round_obj = get_round(session, round_id)
        counts = job_counts(session, round_id)
        report = round_obj.report or round_report(session, round_obj)
        status = {"round": round_id, "stage": round_obj.stage, "iteration": round_obj.iteration,
                  "state": round_obj.state, "outcome": round_obj.outcome, "error": round_obj.error,
                  "jobs": counts, "report": report}
        from services.monitor import overall_progress, round_progress

        steps = round_progress(session, round_obj)
        status.update(progress=overall_progress(round_obj.state, steps), steps=[s.as_dict() for s in steps])
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
        return
    console.print(f"[bold]round {round_id}[/] {status['stage']} iteration {status['iteration']}: "
                  f"[bold]{status['state']}[/]" + (f" ({status['outcome']})" if status["outcome"] else ""))
    if status["error"]:
        console.print(f"[red]error:[/] {status['error']}")
    table = Table("step", "queued", "running", "done", "failed", "cancelled")
    for step, by_state in counts.items():
        table.add_row(step, *(str(by_state.get(s, 0)) for s in ("queued", "running", "done", "failed", "cancelled")))
    console.print(table)
    if status["state"] == "running":
        from services.cli_ops import progress_table

        console.print(progress_table(status["steps"]))
    console.print(render_report(report))


def render_report(report: dict[str, Any]) -> Table:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    table = Table("", "value", title="report", show_header=False)
    if "pool" in report:
        table.add_row("pool questions", str(report["pool"]))
        table.add_row("answered (weak / strong)", f"{report['weak_answered']} / {report['strong_answered']}")
        table.add_row("kept by the vote", f"{report['kept']} ({pct(report['kept_share'])})")
        if report.get("dropped_by_step_score"):
            table.add_row("dropped by step score", str(report["dropped_by_step_score"]))
        if report.get("has_gold"):
            table.add_row("weak accuracy, all pool", pct(report.get("weak_accuracy")))
            table.add_row("strong accuracy, all pool", pct(report.get("strong_accuracy")))
            table.add_row("pseudo-label accuracy, kept set", pct(report.get("kept_accuracy")))
            if report.get("kept_by_gold_steps"):
                mix = ", ".join(f"{k} steps: {v}" for k, v in report["kept_by_gold_steps"].items())
                table.add_row("kept set by solution length", mix)
        else:
            table.add_row("accuracies", "the pool has no gold answers")
    if "pairs" in report:
        table.add_row("questions sampled", str(report["sampled_questions"]))
        skipped = report.get("skipped") or {}
        table.add_row("skipped", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()) or "none")
        by_case = report.get("pairs_by_case") or {}
        table.add_row("pairs", f"{report['pairs']} (" + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in by_case.items()) + ")")
        if report.get("pass_at_k"):
            passk = report["pass_at_k"]
            table.add_row(f"pass@{passk['k']} on the eval set", ", ".join(
                f"{name}: {pct(value)}" for name, value in passk.items() if name != "k"))
        if report.get("chosen_accuracy") is not None:
            table.add_row("accuracy of chosen / rejected", f"{pct(report['chosen_accuracy'])} / {pct(report['rejected_accuracy'])}")
    if report.get("student_before"):
        before = report["student_before"]
        table.add_row("student before", f"{before['name']} {pct(before['accuracy'])}")
    for variant, entry in (report.get("variants") or {}).items():
        if entry.get("skipped"):
            table.add_row(f"variant {variant}", f"{entry['examples']} examples — skipped: {entry['skipped']}")
        elif entry.get("checkpoint"):
            loss = entry.get("train_loss")
            unit = "pairs" if variant in ("dpo", "orpo") else "examples"
            table.add_row(f"variant {variant}", f"{entry['examples']} {unit} → {entry['checkpoint']} "
                          f"{pct(entry.get('accuracy'))} ({entry.get('status')})"
                          + (f", final train loss {loss:.3f}" if loss is not None else ""))
        else:
            table.add_row(f"variant {variant}", f"{entry['examples']} examples, training {entry['state']}")
    if report.get("outcome"):
        colour = "green" if report["outcome"] == "promoted" else "yellow"
        table.add_row("decision", f"[{colour}]{report['outcome']}[/]: {report['reason']}")
    return table


@round_.command("list")
@pass_app
def round_list(app: App) -> None:
    with app.session() as session:
        table = Table("id", "stage", "iter", "state", "outcome", "created")
        for r in session.scalars(select(Round).order_by(Round.id)):
            table.add_row(str(r.id), r.stage, str(r.iteration), r.state, r.outcome or "", f"{r.created_at:%Y-%m-%d %H:%M}")
        console.print(table)


@round_.command("resume")
@click.argument("round_id", type=int)
@click.option("--wait/--no-wait", default=None)
@pass_app
def round_resume(app: App, round_id: int, wait: bool | None) -> None:
    """Re-plan whatever is missing and re-send queued jobs. Safe to repeat."""
    from services.rounds import resume_round
    from workers.dispatch import enqueue

    with app.session() as session:
        job_ids = resume_round(session, round_id)
        state = session.get(Round, round_id).state
    enqueue(job_ids)
    if state != "running":
        console.print(f"round {round_id} is {state}: nothing to resume")
        return
    console.print(f"round {round_id}: {len(job_ids)} queued jobs sent")
    if wait if wait is not None else app.settings.embedded:
        _wait_for_round(app, round_id)
        _print_status(app, round_id)


@round_.command("cancel")
@click.argument("round_id", type=int)
@pass_app
def round_cancel(app: App, round_id: int) -> None:
    """Cancel a running round: queued jobs are revoked, running ones stopped. Returns once they have."""
    from workers.cancel import cancel

    stopped = cancel(app.settings, round_id)
    console.print(f"round {round_id} cancelled: {stopped.queued} queued job(s) revoked, "
                  f"{stopped.running} running job(s) stopped")
    if stopped.unconfirmed:
        console.print(f"not confirmed stopped (their workers are unreachable; their writes are refused): "
                      f"jobs {', '.join(map(str, stopped.unconfirmed))}")


# --- pipelines -----------------------------------------------------------------------------------


@cli.group(cls=Group)
def pipeline() -> None:
    """Chains of rounds: (weak-sft) → stage I iteration 1 → iteration 2 → stage II, each gated."""


@pipeline.command("start")
@click.option("--config", "config_file", type=click.Path(path_type=Path), required=True, help="YAML pipeline config.")
@click.option("--wait/--no-wait", default=None, help="Wait for the chain to end (default: yes when embedded).")
@pass_app
def pipeline_start(app: App, config_file: Path, wait: bool | None) -> None:
    """Start the first round of a pipeline; each round that ends starts the next."""
    from services.config import read_config_file
    from services.pipeline import parse_pipeline_config, start_pipeline
    from workers.dispatch import enqueue

    config = parse_pipeline_config(read_config_file(config_file), str(config_file))
    with app.session() as session:
        pipe, job_ids = start_pipeline(session, config)
        pipeline_id = pipe.id
    enqueue(job_ids)
    console.print(f"pipeline {pipeline_id} started: {' → '.join(config.steps())}")
    if wait if wait is not None else app.settings.embedded:
        if app.settings.embedded:
            from workers.dispatch import drain

            drain()
        else:
            with console.status(f"waiting for pipeline {pipeline_id}"):
                while True:
                    with app.session() as session:
                        from services.pipeline import get_pipeline

                        if get_pipeline(session, pipeline_id).state != "running":
                            break
                    time.sleep(5)
        _print_pipeline(app, pipeline_id)


@pipeline.command("status")
@click.argument("pipeline_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def pipeline_status(app: App, pipeline_id: int, as_json: bool) -> None:
    """The chain: each round's step, state, outcome and promoted checkpoint."""
    _print_pipeline(app, pipeline_id, as_json)


def _print_pipeline(app: App, pipeline_id: int, as_json: bool = False) -> None:
    from services.pipeline import PipelineConfig, get_pipeline, pipeline_rounds

    with app.session() as session:
        pipe = get_pipeline(session, pipeline_id)
        steps = PipelineConfig.model_validate(pipe.config).steps()
        rounds = [{"round": r.id, "step": r.pipeline_step, "state": r.state, "outcome": r.outcome,
                   "promoted": (r.report or {}).get("promoted"), "reason": (r.report or {}).get("reason") or r.error}
                  for r in pipeline_rounds(session, pipeline_id)]
        status = {"pipeline": pipeline_id, "state": pipe.state, "reason": pipe.reason, "steps": steps, "rounds": rounds}
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    console.print(f"[bold]pipeline {pipeline_id}[/]: {status['state']}" + (f" — {status['reason']}" if status["reason"] else ""))
    table = Table("step", "round", "state", "outcome", "promoted", "why")
    done = {r["step"]: r for r in rounds}
    for step in steps:
        r = done.get(step)
        table.add_row(step, *((str(r["round"]), r["state"], r["outcome"] or "", r["promoted"] or "", r["reason"] or "")
                              if r else ("", "not started", "", "", "")))
    console.print(table)


# --- jobs ----------------------------------------------------------------------------------------


@cli.group("jobs", cls=Group, invoke_without_command=True)
@click.option("--round", "round_id", type=int, help="Only this round's jobs.")
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed", "cancelled"]))
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh the table until none of the listed jobs is queued or running.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@pass_app
def jobs(app: App, round_id: int | None, state: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """The job table; `jobs show ID` and `jobs retry ID` for one job."""
    if click.get_current_context().invoked_subcommand:
        return
    if watch and not as_json:
        from services.cli_ops import watch_jobs

        watch_jobs(lambda: _job_rows(app, round_id, state), _jobs_table, interval)
        return
    rows = _job_rows(app, round_id, state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    console.print(_jobs_table(rows))


def _job_rows(app: App, round_id: int | None, state: str | None) -> list[dict[str, Any]]:
    from services.rounds import get_round

    with app.session() as session:
        query = select(Job).order_by(Job.id)
        if round_id is not None:
            get_round(session, round_id)
            query = query.where(Job.round_id == round_id)
        if state:
            query = query.where(Job.state == state)
        return [{"id": j.id, "round": j.round_id, "key": j.key, "queue": j.queue, "state": j.state,
                 "attempts": j.attempts, "progress": j.progress, "owner": j.owner, "error": j.error}
                for j in session.scalars(query)]


def _jobs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "round", "key", "queue", "state", "attempts", "progress", "owner", "error")
    for r in rows:
        table.add_row(str(r["id"]), str(r["round"]), r["key"], r["queue"], r["state"], str(r["attempts"]),
                      f"{r['progress']:.0%}", r["owner"] or "", (r["error"] or "")[:80])
    return table


# --- export --------------------------------------------------------------------------------------


@cli.command("export")
@click.option("--round", "round_id", type=int, required=True)
@click.option("--format", "fmt", type=click.Choice(["trl", "llama-factory"]), default="trl", show_default=True)
@click.option("--variant", help="Stage I: only this training set (weak, icl, hybrid, gold).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSONL file to write.")
@pass_app
def export(app: App, round_id: int, fmt: str, variant: str | None, out: Path) -> None:
    """A round's training examples or preference pairs, for other trainers, with provenance ids."""
    from services.export import export_round

    with app.session() as session:
        count = export_round(session, round_id, fmt, out, variant)
    console.print(f"wrote {count} rows to {out}")


# --- worker --------------------------------------------------------------------------------------


@cli.command("worker")
@click.option("--role", "roles", default=None, help="weak, strong, train or control (comma-separated for several).")
@click.option("--queues", default=None, help=f"Queues to consume, instead of --role (default: {','.join(QUEUES)}).")
@click.option("--gpus", default=None, help="GPU indices, e.g. 0,1: model roles run one process per GPU.")
@click.option("--concurrency", type=int, default=None, help="Processes (default: 1 per GPU for model roles, else 1).")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: celery@<host>).")
@pass_app
def worker(app: App, roles: str | None, queues: str | None, gpus: str | None, concurrency: int | None,
           loglevel: str, hostname: str | None) -> None:
    """Consume jobs from the broker (W2S_BROKER_URL)."""
    import os

    from celery.utils.nodenames import default_nodename, host_format

    from workers.delivery import load_delivery
    from workers.roles import apply_gpus, celery_argv, plan_worker, start_watchdog

    if app.settings.embedded:
        raise click.ClickException("W2S_BROKER_URL is not set: embedded mode runs jobs in-process, no worker needed")
    plan = plan_worker(roles=roles, queues=queues, gpus=gpus, concurrency=concurrency)
    delivery = load_delivery()
    ensure_schema(app.settings.database_url)
    apply_gpus(plan)
    os.environ["W2S_WORKER_NAME"] = host_format(default_nodename(hostname))  # job owners name the node
    from workers.app import app as celery_app

    if plan.watchdog:
        start_watchdog(delivery.watchdog_s)
    celery_app.worker_main(celery_argv(plan, loglevel=loglevel, hostname=hostname))


# --- demo ----------------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("w2s-demo"), show_default=True,
              help="Where the demo keeps its models, data and database.")
@click.option("--scale", type=click.Choice(["full", "tiny"]), default="full", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(workdir: Path, scale: str, seed: int) -> None:
    """Build tiny models locally and run a whole stage I round on them, embedded."""
    from services.demo import run_demo

    run_demo(workdir, scale=scale, seed=seed, console=console)


from services.cli_eval import eval_group, solve_command  # noqa: E402  (LECO: solve, eval run/compare)

cli.add_command(solve_command)
cli.add_command(eval_group)
import services.cli_ops  # noqa: E402,F401  (monitoring: queues, jobs show/retry, round report, metrics)
from services.cli_checkpoint import checkpoint_group  # noqa: E402  (LoRA: checkpoint merge)

cli.add_command(checkpoint_group)

if __name__ == "__main__":
    main()
