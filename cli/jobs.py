"""`w2sctl jobs`: the job table, one job's detail (`jobs show`) and a fresh attempt (`jobs retry`)."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from cli.context import App, Group, console, pass_app, print_json
from cli.render import duration
from db.schema import Job
from services.contracts import JobState


@click.group("jobs", cls=Group, invoke_without_command=True)
@click.option("--round", "round_id", type=int, help="Only this round's jobs.")
@click.option("--state", type=click.Choice([str(state) for state in JobState]))
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh the table until none of the listed jobs is queued or running.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@pass_app
def jobs(app: App, round_id: int | None, state: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """The job table; `jobs show ID` and `jobs retry ID` for one job."""
    if click.get_current_context().invoked_subcommand:
        return
    if watch and not as_json:
        _watch_jobs(lambda: _job_rows(app, round_id, state), _jobs_table, interval)
        return
    rows = _job_rows(app, round_id, state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if len(rows) > PLAIN_ROWS:  # rich measures every cell: seconds for a big round's thousands of chunks
        click.echo(_plain_jobs_table(rows))
        return
    console.print(_jobs_table(rows))


PLAIN_ROWS = 300


def _plain_jobs_table(rows: list[dict[str, Any]]) -> str:
    """The same columns as the rich table, as fixed-width text."""
    lines = [f"{'id':>8} {'round':>5} {'key':<28} {'queue':<7} {'state':<9} {'att':>3} {'prog':>5} {'owner':<24} error"]
    lines += [f"{r['id']:>8} {r['round']:>5} {r['key']:<28} {r['queue']:<7} {r['state']:<9} {r['attempts']:>3} "
              f"{r['progress']:>5.0%} {(r['owner'] or ''):<24} {(r['error'] or '')[:80]}" for r in rows]
    return "\n".join(lines)


def _job_rows(app: App, round_id: int | None, state: str | None) -> list[dict[str, Any]]:
    from services.rounds import get_round

    with app.session() as session:
        # The listed columns only: a job's payload (its chunk's question ids) stays in the database.
        query = select(Job.id, Job.round_id, Job.key, Job.queue, Job.state, Job.attempts, Job.progress, Job.owner,
                       Job.error).order_by(Job.id)
        if round_id is not None:
            get_round(session, round_id)
            query = query.where(Job.round_id == round_id)
        if state:
            query = query.where(Job.state == state)
        return [{"id": j.id, "round": j.round_id, "key": j.key, "queue": j.queue, "state": j.state,
                 "attempts": j.attempts, "progress": j.progress, "owner": j.owner, "error": j.error}
                for j in session.execute(query)]


def _jobs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "round", "key", "queue", "state", "attempts", "progress", "owner", "error")
    for r in rows:
        table.add_row(str(r["id"]), str(r["round"]), r["key"], r["queue"], r["state"], str(r["attempts"]),
                      f"{r['progress']:.0%}", r["owner"] or "", (r["error"] or "")[:80])
    return table

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
        print_json(detail)
        return
    colour = {"done": "green", "failed": "red", "running": "yellow"}.get(detail["state"], "white")
    console.print(f"[bold]job {detail['id']}[/] {detail['key']} (round {detail['round']}, queue {detail['queue']}): "
                  f"[{colour}]{detail['state']}[/] {detail['progress']:.0%}")
    table = Table("", "", show_header=False, box=None)
    table.add_row("attempts", f"{detail['attempts']} of {detail['max_attempts']}")
    table.add_row("worker", detail["owner"] or "—")
    table.add_row("created", str(detail["created_at"]))
    table.add_row("started", f"{detail['started_at'] or '—'} (waited {duration(detail['waited_s'])})")
    table.add_row("finished", f"{detail['finished_at'] or '—'} (ran {duration(detail['ran_s'])})")
    if detail["heartbeat_age_s"] is not None:
        table.add_row("last heartbeat", f"{duration(detail['heartbeat_age_s'])} ago")
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

    with app.session() as session:
        to_send = retry_job(session, job_id, app.settings.delivery, attempts)
    app.dispatcher.enqueue(to_send)
    console.print(f"job {job_id} queued again ({attempts} more attempt{'s' if attempts != 1 else ''}); "
                  f"{len(to_send)} job(s) of its round sent")
    if app.settings.embedded:
        app.dispatcher.drain()


def _watch_jobs(rows_of, table_of, interval: float) -> None:
    """`jobs --watch`: the job table, refreshed until none of the listed jobs is queued or running."""
    rows = rows_of()
    with Live(table_of(rows), console=console, refresh_per_second=4) as live:
        while any(r["state"] in ("queued", "running") for r in rows):
            time.sleep(interval)
            rows = rows_of()
            live.update(table_of(rows))
