"""`w2sctl dataset`: import and list question sets."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from sqlalchemy import select

from cli.context import App, Group, console, pass_app
from db.schema import Dataset


@click.group(cls=Group)
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
