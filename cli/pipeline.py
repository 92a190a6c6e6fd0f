"""`w2sctl pipeline`: chains of rounds, each gated."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from cli.context import App, Group, console, pass_app


@click.group(cls=Group)
def pipeline() -> None:
    """Chains of rounds: (weak-sft) → stage I iteration 1 → iteration 2 → stage II, each gated."""


@pipeline.command("start")
@click.option("--config", "config_file", type=click.Path(path_type=Path), required=True, help="YAML pipeline config.")
@click.option("--wait/--no-wait", default=None, help="Wait for the chain to end (default: yes when embedded).")
@pass_app
def pipeline_start(app: App, config_file: Path, wait: bool | None) -> None:
    """Start the first round of a pipeline; each round that ends starts the next."""
    from services.config import read_config_file
    from services.pipeline import parse_pipeline_config
    from services.rounds import start_pipeline
    from workers.dispatch import SendFailed

    config = parse_pipeline_config(read_config_file(config_file), str(config_file))
    with app.session() as session:
        pipe, job_ids = start_pipeline(session, config, app.settings.delivery)
        pipeline_id = pipe.id
    try:
        app.dispatcher.enqueue(job_ids)
    except SendFailed as exc:
        raise click.ClickException(
            f"pipeline {pipeline_id} is recorded but the {len(job_ids)} queued job(s) of its first round could not be "
            f"sent ({exc}); the control worker's reconciliation sends them once the broker is back "
            "(W2S_RECONCILE_S); do not start it again") from None
    console.print(f"pipeline {pipeline_id} started: {' → '.join(config.steps())}")
    if wait if wait is not None else app.settings.embedded:
        if app.settings.embedded:
            app.dispatcher.drain()
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
