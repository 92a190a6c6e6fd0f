"""`w2sctl queues`: queue depths, consumers and waiting jobs."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from cli.context import App, console, pass_app, print_json
from cli.render import duration


@click.command("queues")
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
        print_json(status)
        return
    if status["broker"] is None:
        console.print("no broker: W2S_BROKER_URL is not set, so jobs run in-process (embedded mode). "
                      "Jobs waiting in the database:")
    else:
        console.print(f"broker {status['broker']}")
    table = Table("queue", "depth", "queued jobs", "oldest wait", "consumers")
    for q in status["queues"]:
        table.add_row(q["queue"], "—" if q["depth"] is None else str(q["depth"]), str(q["queued_jobs"]),
                      duration(q["oldest_waiting_s"]) + (f" (job {q['oldest_job']})" if q["oldest_job"] else ""),
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
