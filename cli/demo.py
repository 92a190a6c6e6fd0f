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
@click.option("--seeds", help="Comma-separated seeds (0,1,2): the whole chain once per seed, each in WORKDIR/seed<N>, "
              "then every headline figure as mean ± sd with the per-seed values.")
@click.option("--deterministic", is_flag=True, help="Pin torch's CPU kernels, one thread, deterministic algorithms "
              "(models/determinism.py): the same figures on every x86-64 machine with the same packages, slower.")
@pass_app
def demo(app: App, workdir: Path, scale: str, seed: int, seeds: str | None, deterministic: bool) -> None:
    """Build small models locally and run the chain on them (stage I twice, stage II), embedded:
    each round decides on the dev split and reports on the test split."""
    if deterministic:
        import os
        import sys

        from models.determinism import pin_determinism, pinned_environment

        if "torch" in sys.modules:  # the kernel choice is read once, when torch loads
            raise click.UsageError("--deterministic: torch was imported before the pins could be set")
        os.environ.update(pinned_environment())  # this process (torch loads next) and the training ranks
        pin_determinism()
    from cli.render import render_report
    from services.demo import demo_settings, headline_figures, run_demo
    from workers.dispatch import JobDispatcher

    if seeds is None:
        settings = demo_settings(workdir, app.settings)
        result = run_demo(workdir, scale=scale, seed=seed, console=console, settings=settings,
                          dispatcher=JobDispatcher(settings), render_report=render_report)
        if scale == "full":
            console.print(expected_figures_table(headline_figures(result)))
        return
    try:
        chosen = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: expected comma-separated integers such as 0,1,2", param_hint="--seeds") from None
    if not chosen or len(set(chosen)) != len(chosen):
        raise click.BadParameter(f"{seeds!r}: give each seed once", param_hint="--seeds")
    per_seed = {}
    for each in chosen:
        seed_dir = workdir / f"seed{each}"
        settings = demo_settings(seed_dir, app.settings)
        result = run_demo(seed_dir, scale=scale, seed=each, console=console, settings=settings,
                          dispatcher=JobDispatcher(settings), render_report=render_report)
        per_seed[each] = headline_figures(result)
    console.print(seed_figures_table(per_seed))


def seed_figures_table(per_seed):
    """The headline figures over seeds: mean ± sd, then each seed's value."""
    from rich.table import Table

    from services.demo import seed_table

    seeds = list(per_seed)
    table = Table("figure", "mean ± sd", *(f"seed {s}" for s in seeds), title=f"headline figures over seeds {seeds}")
    for name, mean, spread, values in seed_table(per_seed):
        table.add_row(name, f"{mean:.1%} ± {spread:.1%}", *(f"{values[s]:.1%}" if s in values else "—" for s in seeds))
    return table


def expected_figures_table(figures):
    """This run's headline figures beside the README's (mean ± sd over seeds 0, 1, 2)."""
    from rich.table import Table

    from services.demo import against_expected

    table = Table("figure", "this run", "expected (seeds 0,1,2)", "",
                  title="this run against the README's figures (mean ± sd over three seeds)")
    for name, value, mean, spread, inside in against_expected(figures):
        table.add_row(name, f"{value:.1%}", f"{mean:.1%} ± {spread:.1%}",
                      "" if inside else "[yellow]outside ± 2 sd[/]")
    return table

