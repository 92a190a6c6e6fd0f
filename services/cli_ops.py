"""Operator commands: `queues`, `jobs show` / `jobs retry`, `round report`, `metrics serve`, and the
live views behind `round status --watch` and `jobs --watch`. Parse, call services.monitor, print.

Imported at the end of services/cli.py, which it adds its commands to.
"""

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

from services.cli import App, Group, cli, console, jobs, pass_app, render_report, round_

DEFAULT_METRICS_PORT = 9464  # any free port will do; workers take their own with W2S_METRICS_PORT


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --- queues --------------------------------------------------------------------------------------


@cli.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", type=click.FloatRange(0.1, 30), default=1.0, show_default=True,
              help="Seconds to wait for workers to answer.")
@pass_app
def queues(app: App, as_json: bool, timeout: float) -> None:
    """Per queue: depth in the broker, consuming workers (host, GPUs, active and reserved jobs), oldest wait."""
    from services.monitor import queue_status

    with app.session() as session:
        status = queue_status(session, app.settings.broker_url, timeout=timeout)
    if as_json:
        _json(status)
        return
    if status["broker"] is None:
        console.print("no broker: W2S_BROKER_URL is not set, so jobs run in-process (embedded mode). "
                      "Jobs waiting in the database:")
    else:
        console.print(f"broker {status['broker']}")
    table = Table("queue", "depth", "queued jobs", "oldest wait", "consumers")
    for q in status["queues"]:
        table.add_row(q["queue"], "—" if q["depth"] is None else str(q["depth"]), str(q["queued_jobs"]),
                      _duration(q["oldest_waiting_s"]) + (f" (job {q['oldest_job']})" if q["oldest_job"] else ""),
                      ", ".join(q["consumers"]) or ("[red]none[/]" if status["broker"] else "—"))
    console.print(table)
    if status["broker"] is None:
        return
    if not status["workers"]:
        console.print(f"[yellow]no worker answered within {timeout:g}s[/]")
        return
    workers = Table("worker", "host", "GPUs", "queues", "active", "reserved", "scheduled")

    def jobs_text(entries: list[dict[str, Any]]) -> str:
        return ", ".join(f"{e['job']} {e.get('key') or ''}".strip() for e in entries) or "—"

    for w in status["workers"]:
        gpus = w["gpus"]
        workers.add_row(w["worker"], w["host"], "?" if gpus is None else (",".join(gpus) or "none"),
                        ",".join(w["queues"]), jobs_text(w["active"]), jobs_text(w["reserved"]), jobs_text(w["scheduled"]))
    console.print(workers)


# --- jobs show / retry ---------------------------------------------------------------------------


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--lines", type=click.IntRange(0, 10_000), default=40, show_default=True, help="Log lines to show.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def jobs_show(app: App, job_id: int, lines: int, as_json: bool) -> None:
    """One job: attempts, host, timings, error, result and the tail of its log."""
    from services.monitor import job_detail

    with app.session() as session:
        detail = job_detail(session, job_id, lines)
    if as_json:
        _json(detail)
        return
    colour = {"done": "green", "failed": "red", "running": "yellow"}.get(detail["state"], "white")
    console.print(f"[bold]job {detail['id']}[/] {detail['key']} (round {detail['round']}, queue {detail['queue']}): "
                  f"[{colour}]{detail['state']}[/] {detail['progress']:.0%}")
    table = Table("", "", show_header=False, box=None)
    table.add_row("attempts", f"{detail['attempts']} of {detail['max_attempts']}")
    table.add_row("worker", detail["owner"] or "—")
    table.add_row("created", str(detail["created_at"]))
    table.add_row("started", f"{detail['started_at'] or '—'} (waited {_duration(detail['waited_s'])})")
    table.add_row("finished", f"{detail['finished_at'] or '—'} (ran {_duration(detail['ran_s'])})")
    if detail["heartbeat_age_s"] is not None:
        table.add_row("last heartbeat", f"{_duration(detail['heartbeat_age_s'])} ago")
    table.add_row("payload", json.dumps(detail["payload"], default=str))
    console.print(table)
    if detail["error"]:
        console.print(Text("error: ", style="red") + Text(detail["error"]), soft_wrap=True)
    result = dict(detail["result"] or {})
    launch = result.pop("launch", None)
    if result:
        console.print("result: " + json.dumps(result, indent=2, default=str), markup=False, highlight=False)
    if launch:
        console.print(launch_table(launch))
    if detail["log_path"]:
        console.print(f"log: {detail['log_path']}", markup=False, soft_wrap=True)
        if detail["log_tail"] is None:
            console.print("  (not readable from this machine)")
        else:
            console.print("\n".join(detail["log_tail"]), markup=False, highlight=False, soft_wrap=True)


def launch_table(launch: dict[str, Any]) -> Table:
    """A training launch as the job recorded it: the command, how each rank ended, why it failed."""
    table = Table("", "", title="training launch", show_header=False, box=None, title_justify="left")
    command = launch.get("command")
    # Every recorded value is plain text: gloo errors hold "[/path...]", which rich would read as markup.
    table.add_row("command", Text(" ".join(map(str, command)) if isinstance(command, list) else str(command or "—")))
    for key in ("attempt", "world_size", "returncode", "timed_out", "duration_s", "resumed_from_step", "log_path"):
        if launch.get(key) is not None:
            table.add_row(key.replace("_", " "), Text(str(launch[key])))
    for index, rank in enumerate(launch.get("ranks") or []):  # one record per rank, in rank order
        where = f" on {rank['host']}" if rank.get("host") else ""
        why = f": {rank['error']}" if rank.get("error") else ""
        oom = " (out of memory)" if rank.get("out_of_memory") else ""
        table.add_row(f"rank {rank.get('rank', index)}", Text(f"{rank.get('status')}{where}{why}{oom}"))
    if launch.get("failure"):
        table.add_row("failure", Text(str(launch["failure"]), style="red"))
    return table


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.option("--attempts", type=int, default=1, show_default=True, help="Attempts the job gets from now.")
@pass_app
def jobs_retry(app: App, job_id: int, attempts: int) -> None:
    """Give a failed job a fresh attempt and send it again; its round (and pipeline) resume."""
    from services.operations import retry_job
    from workers.dispatch import drain, enqueue

    with app.session() as session:
        to_send = retry_job(session, job_id, attempts)
    enqueue(to_send)
    console.print(f"job {job_id} queued again ({attempts} more attempt{'s' if attempts != 1 else ''}); "
                  f"{len(to_send)} job(s) of its round sent")
    if app.settings.embedded:
        drain()


# --- round report --------------------------------------------------------------------------------


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
        _json(report)
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


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def rounds_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table("round", "step", "stage", "state", "outcome", "kept share", "pseudo-label acc", "pairs",
                  "student before", "candidates", title="rounds")
    for r in rounds:
        before = r["baseline"] or {}
        candidates = ", ".join(f"{c['checkpoint']} {_pct(c['accuracy'])} ({c['status']})" for c in r["candidates"])
        table.add_row(str(r["round"]), r["step"] or "", f"{r['stage']} it{r['iteration']}", r["state"], r["outcome"] or "",
                      _pct(r["kept_share"]), _pct(r["kept_accuracy"]), "" if r["pairs"] is None else str(r["pairs"]),
                      f"{before.get('checkpoint', '')} {_pct(before.get('accuracy'))}", candidates or "—")
    return table


def lineage_table(chain: list[dict[str, Any]]) -> Table:
    table = Table("checkpoint", "round", "status", "eval accuracy", "questions", title="lineage")
    for c in chain:
        table.add_row(c["checkpoint"], str(c["round"] or ""), c["status"], _pct(c["accuracy"]),
                      str(c.get("eval_questions") or ""))
    return table


# --- metrics -------------------------------------------------------------------------------------


@cli.group(cls=Group)
def metrics() -> None:
    """Prometheus metrics of the service (workers export their own with W2S_METRICS_PORT)."""


@metrics.command("serve")
@click.option("--host", default="0.0.0.0", show_default=True, envvar="W2S_METRICS_ADDR")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_METRICS_PORT, show_default=True)
@click.option("--no-inspect", is_flag=True, help="Do not ask workers (Celery inspect) at each scrape.")
@pass_app
def metrics_serve(app: App, host: str, port: int, no_inspect: bool) -> None:
    """Serve /metrics: jobs by state and queue, queue depth, round progress, tokens/s, eval accuracy."""
    from services.logs import configure_logging
    from services.metrics import serve

    configure_logging()
    with app.session():
        pass  # the schema check, once, before the first scrape
    try:
        server, _thread = serve(app.settings, host, port, inspect_workers=not no_inspect)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    console.print(f"serving metrics on http://{host}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@metrics.command("show")
@click.option("--no-inspect", is_flag=True, help="Do not ask workers (Celery inspect).")
@pass_app
def metrics_show(app: App, no_inspect: bool) -> None:
    """Print what one scrape of `metrics serve` would return."""
    from services.metrics import render

    with app.session():
        pass
    click.echo(render(app.settings, inspect_workers=not no_inspect), nl=False)


# --- live views ----------------------------------------------------------------------------------


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
                "jobs": counts, **metrics}


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
        colour = {"done": "green", "failed": "red", "running": "yellow", "skipped": "dim", "waiting": "dim"}.get(s["state"], "white")
        table.add_row(s["step"], bar, done, rate, tokens, _duration(s["eta_s"]) if s["state"] == "running" else "",
                      Text(s["state"], style=colour))
    return table


def render_snapshot(snapshot: dict[str, Any]):
    header = Text.from_markup(
        f"[bold]round {snapshot['round']}[/] {snapshot['stage']} iteration {snapshot['iteration']}: "
        f"[bold]{snapshot['state']}[/] — {snapshot['progress']:.0%}"
        + (f" ({snapshot['outcome']})" if snapshot["outcome"] else ""))
    parts: list[Any] = [header, progress_table(snapshot["steps"])]
    accuracies = {k: v for k, v in snapshot["eval_accuracy"].items() if v is not None}
    if accuracies:
        parts.append(Text("eval accuracy so far: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracies.items())))
    parts.append(render_report(snapshot["report"]))
    if snapshot["error"]:
        parts.append(Text(f"error: {snapshot['error']}", style="red"))
    return RenderGroup(*parts)


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
    else:
        with Live(render_snapshot(snapshot), console=console, refresh_per_second=4) as live:
            while snapshot["state"] not in TERMINAL_ROUND_STATES:
                time.sleep(interval)
                snapshot = round_snapshot(app, round_id, snapshot)
                live.update(render_snapshot(snapshot))
    if snapshot["state"] != "done":
        raise click.ClickException(f"round {round_id} {snapshot['state']}: {snapshot['error'] or 'no reason recorded'}")


def watch_jobs(rows_of, table_of, interval: float) -> None:
    """`jobs --watch`: the job table, refreshed until none of the listed jobs is queued or running."""
    rows = rows_of()
    with Live(table_of(rows), console=console, refresh_per_second=4) as live:
        while any(r["state"] in ("queued", "running") for r in rows):
            time.sleep(interval)
            rows = rows_of()
            live.update(table_of(rows))

