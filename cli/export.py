"""`w2sctl export`: a round's training examples or preference pairs as JSONL."""

from __future__ import annotations

from pathlib import Path

import click

from cli.context import App, console, pass_app


@click.command("export")
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
