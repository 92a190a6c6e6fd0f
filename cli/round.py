"""`w2sctl round`: start, follow (status, live view, report), resume and cancel rounds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Group as RenderGroup
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from cli.context import App, Group, console, pass_app, print_json
from cli.render import duration, pct, render_report
from db.schema import Job, Round
from services.config import ConfigError, load_round_config_file, parse_round_config
from services.contracts import TERMINAL_ROUND_STATES
from services.contracts.graph import job_summary


@click.group("round", cls=Group)
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
@click.option("--report-on", "report_on", help="A held-out labelled dataset (the test split) evaluated and reported "
              "next to --eval, never deciding promotion.")
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
    from services.rounds import named_round, round_fit_warnings, start_round
    from workers.dispatch import SendFailed

    overrides = _overrides(flags, sets)
    config = load_round_config_file(config_file, overrides) if config_file else parse_round_config(overrides, "round flags")
    if name is not None:
        validate_name(name, "--name")
    with app.session() as session:
        existed = name is not None and named_round(session, name) is not None
        round_obj, job_ids = start_round(session, config, app.settings.delivery, name=name)
        round_id, state = round_obj.id, round_obj.state
        warnings = round_fit_warnings(session, config)
    for line in warnings:
        console.print(Text(line, style="yellow"), soft_wrap=True)
    try:
        app.dispatcher.enqueue(job_ids)
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
        _fail_unless_done(app, round_id)


def _fail_unless_done(app: App, round_id: int) -> None:
    """A waited-for round that failed or was cancelled ends the command non-zero, saying so."""
    with app.session() as session:
        round_obj = session.get(Round, round_id)
        state, error = round_obj.state, round_obj.error
    if state != "done":
        raise click.ClickException(f"round {round_id} {state}" + (f": {error}" if error else ""))


def _overrides(flags: dict[str, Any], sets: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    simple = {"stage": "stage", "iteration": "iteration", "weak": "weak", "strong": "strong", "student": "student",
              "pool": "pool", "pool_limit": "pool_limit", "train_set": "train", "train_limit": "train_limit",
              "demonstrations": "demonstrations",
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
    evals = (("dataset", flags.get("eval_set")), ("limit", flags.get("eval_limit")), ("report_on", flags.get("report_on")))
    if any(v is not None for _, v in evals):
        out["eval"] = {k: v for k, v in evals if v is not None}
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
    if app.settings.embedded:
        def show(job_id: int) -> None:
            with app.session() as session:
                job = session.get(Job, job_id)
                took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else 0
                mark = {"done": "[green]✓[/]", "failed": "[red]✗[/]"}.get(job.state, "[yellow]↻[/]")
                console.print(f"  {mark} round {round_id} {job.key:<22} {job.state:<8} {took:6.1f}s "
                              f"{job_summary(job.kind, job.result)}")

        app.dispatcher.drain(on_job_done=show)
        return
    with console.status(f"waiting for round {round_id}"):
        while True:
            with app.session() as session:
                if session.get(Round, round_id).state in TERMINAL_ROUND_STATES:
                    return
            time.sleep(2)




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
        watch_round(app, round_id, as_json, interval)
        if as_json:
            return
    _print_status(app, round_id, as_json)


def round_notices(app: App, session, round_obj: Round) -> dict[str, list[str]]:
    """step → what the counts do not say (services.monitor.round_notices); with a broker, what it
    and the live workers hold. An unreachable broker is itself the notice."""
    from services.monitor import BrokerUnreachable, control_app, message_census
    from services.monitor import round_notices as notices_of

    if round_obj.state != "running":
        return {}
    delivery, census = app.settings.delivery, None
    if app.settings.broker_url:
        try:
            with control_app(app.settings.broker_url) as celery_app:
                census = message_census(app.settings.broker_url, celery_app)
        except BrokerUnreachable as exc:
            return {"broker": [str(exc)]}
    return notices_of(session, round_obj, census, reconcile_s=delivery.reconcile_s, grace_s=delivery.reconcile_grace_s)


def print_notices(notices: dict[str, list[str]]) -> None:
    for step, lines in notices.items():
        for line in lines:
            console.print(f"[yellow]![/] {step}: {line}", soft_wrap=True)


def _print_status(app: App, round_id: int, as_json: bool = False) -> None:
    from services.monitor import status_report
    from services.report import job_counts
    from services.rounds import get_round

    with app.session() as session:
        round_obj = get_round(session, round_id)
        counts = job_counts(session, round_id)
        report = status_report(session, round_obj)
        status = {"round": round_id, "stage": round_obj.stage, "iteration": round_obj.iteration,
                  "state": round_obj.state, "outcome": round_obj.outcome, "error": round_obj.error,
                  "jobs": counts, "report": report}
        from services.monitor import overall_progress, round_progress

        steps = round_progress(session, round_obj)
        status.update(progress=overall_progress(round_obj.state, steps), steps=[s.as_dict() for s in steps],
                      notices=round_notices(app, session, round_obj))
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
    print_notices(status["notices"])
    if status["state"] == "running":
        console.print(progress_table(status["steps"]))
    console.print(render_report(report))


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

    with app.session() as session:
        job_ids = resume_round(session, round_id, app.settings.delivery)
        state = session.get(Round, round_id).state
    app.dispatcher.enqueue(job_ids)
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

@round_.command("report")
@click.argument("round_id", type=int)
@click.option("--plot", "plot", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw accuracy along the lineage, kept share and pseudo-label accuracy (PNG).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def round_report_command(app: App, round_id: int, plot: Path | None, as_json: bool) -> None:
    """The round's full report; for a pipeline, every round of it and the lineage of checkpoints."""
    from services.monitor import full_report, save_report_plot

    with app.session() as session:
        report = full_report(session, round_id)
    if plot is not None:
        save_report_plot(report, plot)
    if as_json:
        print_json(report)
        return
    console.print(f"[bold]round {round_id}[/] {report['stage']} iteration {report['iteration']}: {report['state']}"
                  + (f" ({report['outcome']})" if report["outcome"] else "")
                  + (f", pipeline {report['pipeline']}" if report["pipeline"] else ""))
    if report["error"]:
        console.print(Text("error: ", style="red") + Text(report["error"]))
    console.print(render_report(report["report"]))
    console.print(rounds_table(report["rounds"]))
    console.print(lineage_table(report["lineage"]))
    if plot is not None:
        console.print(f"plot written to {plot}")


def rounds_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table("round", "step", "stage", "state", "outcome", "kept share", "pseudo-label acc", "pairs",
                  "student before", "candidates", title="rounds")
    for r in rounds:
        before = r["baseline"] or {}
        candidates = ", ".join(f"{c['checkpoint']} {pct(c['accuracy'])} ({c['status']})" for c in r["candidates"])
        table.add_row(str(r["round"]), r["step"] or "", f"{r['stage']} it{r['iteration']}", r["state"], r["outcome"] or "",
                      pct(r["kept_share"]), pct(r["kept_accuracy"]), "" if r["pairs"] is None else str(r["pairs"]),
                      f"{before.get('checkpoint', '')} {pct(before.get('accuracy'))}", candidates or "—")
    return table


def lineage_table(chain: list[dict[str, Any]]) -> Table:
    table = Table("checkpoint", "round", "status", "eval accuracy", "questions", title="lineage")
    for c in chain:
        table.add_row(c["checkpoint"], str(c["round"] or ""), c["status"], pct(c["accuracy"]),
                      str(c.get("eval_questions") or ""))
    return table

def round_snapshot(app: App, round_id: int, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the live view shows, read in one session. The report (which grades the whole
    pool) is recomputed only when a job changed state since the `previous` snapshot."""
    from services.monitor import known_metrics, overall_progress, round_progress
    from services.report import job_counts
    from services.rounds import get_round

    with app.session() as session:
        round_ = get_round(session, round_id)
        steps = round_progress(session, round_)
        counts = job_counts(session, round_id)
        unchanged = previous is not None and previous["jobs"] == counts and previous["state"] == round_.state
        metrics = {k: previous[k] for k in ("report", "eval_accuracy")} if unchanged else known_metrics(session, round_)
        return {"round": round_id, "stage": round_.stage, "iteration": round_.iteration, "state": round_.state,
                "outcome": round_.outcome, "error": round_.error,
                "progress": overall_progress(round_.state, steps), "steps": [s.as_dict() for s in steps],
                "jobs": counts, "notices": round_notices(app, session, round_), **metrics}


def progress_table(steps: list[dict[str, Any]]) -> Table:
    table = Table("step", "progress", "done", "rate", "tokens/s", "ETA", "state", box=None, pad_edge=False)
    for s in steps:
        total = s["total"]
        if s["state"] in ("done", "skipped"):
            bar = ProgressBar(total=1.0, completed=1.0, width=28)
        elif total:
            bar = ProgressBar(total=float(total), completed=float(s["completed"]), width=28)
        else:  # nothing to measure yet: a moving bar while it runs, an empty one before
            bar = ProgressBar(total=None if s["state"] == "running" else 1.0, completed=0.0, width=28,
                              pulse=s["state"] == "running")
        if s["state"] == "waiting" and total is None:
            done = "—"
        else:
            done = f"{s['completed']:g}/{total:g} {s['unit']}" if total is not None else f"{s['completed']:g} {s['unit']}"
        rate = f"{s['rate']:.2f} {s['unit']}/s" if s["rate"] and s["unit"] != "jobs" else "—"
        tokens = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "—"
        colour = {"done": "green", "failed": "red", "running": "yellow", "skipped": "dim",
                  "waiting": "dim"}.get(s["state"], "white")
        table.add_row(s["step"], bar, done, rate, tokens, duration(s["eta_s"]) if s["state"] == "running" else "",
                      Text(s["state"], style=colour))
    return table


def render_snapshot(snapshot: dict[str, Any]):
    header = Text.from_markup(
        f"[bold]round {snapshot['round']}[/] {snapshot['stage']} iteration {snapshot['iteration']}: "
        f"[bold]{snapshot['state']}[/] — {snapshot['progress']:.0%}"
        + (f" ({snapshot['outcome']})" if snapshot["outcome"] else ""))
    parts: list[Any] = [header, progress_table(snapshot["steps"])]
    parts += [Text(f"! {step}: {line}", style="yellow") for step, lines in snapshot["notices"].items() for line in lines]
    accuracies = {k: v for k, v in snapshot["eval_accuracy"].items() if v is not None}
    if accuracies:
        parts.append(Text("eval accuracy so far: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracies.items())))
    parts.append(render_report(snapshot["report"]))
    if snapshot["error"]:
        parts.append(Text(f"error: {snapshot['error']}", style="red"))
    return RenderGroup(*parts)


def snapshot_lines(snapshot: dict[str, Any]) -> list[str]:
    """--watch into a pipe: one line for the round and its steps under way, one per notice."""
    steps = ", ".join(f"{s['step']} {s['state']}" + (f" {s['completed']:g}/{s['total']:g}" if s["total"] else "")
                      for s in snapshot["steps"] if s["state"] not in ("waiting", "done", "skipped"))
    head = (f"{time.strftime('%H:%M:%S')} round {snapshot['round']} {snapshot['state']} {snapshot['progress']:.0%}"
            + (f" ({snapshot['outcome']})" if snapshot["outcome"] else "") + (f": {steps}" if steps else ""))
    return [head] + [f"  ! {step}: {line}" for step, lines in snapshot["notices"].items() for line in lines]


def watch_round(app: App, round_id: int, as_json: bool, interval: float) -> None:
    """Refresh until the round ends; JSON: one snapshot per line (JSON Lines) for scripts."""
    from services.rounds import TERMINAL_ROUND_STATES

    snapshot = round_snapshot(app, round_id)
    if as_json:
        while True:
            click.echo(json.dumps(snapshot, default=str))
            if snapshot["state"] in TERMINAL_ROUND_STATES:
                break
            time.sleep(interval)
            snapshot = round_snapshot(app, round_id, snapshot)
    elif not console.is_terminal:  # a pipe or a file: a line whenever something changed, as it goes
        printed = None
        while True:
            lines = snapshot_lines(snapshot)
            if [line.split(" ", 1)[-1] for line in lines] != printed:  # what changed, not the clock
                for line in lines:
                    click.echo(line)
                printed = [line.split(" ", 1)[-1] for line in lines]
            if snapshot["state"] in TERMINAL_ROUND_STATES:
                console.print(render_snapshot(snapshot))  # the ended round in full: every step, the report
                break
            time.sleep(interval)
            snapshot = round_snapshot(app, round_id, snapshot)
    else:
        with Live(render_snapshot(snapshot), console=console, refresh_per_second=4) as live:
            while snapshot["state"] not in TERMINAL_ROUND_STATES:
                time.sleep(interval)
                snapshot = round_snapshot(app, round_id, snapshot)
                live.update(render_snapshot(snapshot))
    if snapshot["state"] != "done":
        raise click.ClickException(f"round {round_id} {snapshot['state']}: {snapshot['error'] or 'no reason recorded'}")
