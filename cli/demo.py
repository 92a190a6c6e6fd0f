"""`w2sctl demo`: tiny models built locally, a whole stage I round on them, embedded."""

from __future__ import annotations

from pathlib import Path

import click

from cli.context import App, console, pass_app


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("w2s-demo"), show_default=True,
              help="Where the demo keeps its models, data and database.")
@click.option("--scale", type=click.Choice(["full", "tiny"]), default="full", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@pass_app
def demo(app: App, workdir: Path, scale: str, seed: int) -> None:
    """Build tiny models locally and run a whole stage I round on them, embedded."""
    from cli.render import render_report
    from services.demo import demo_settings, run_demo
    from workers.dispatch import JobDispatcher

    settings = demo_settings(workdir, app.settings)
    run_demo(workdir, scale=scale, seed=seed, console=console, settings=settings,
             dispatcher=JobDispatcher(settings), render_report=render_report)
