"""`w2sctl dataset`: import, export and list question sets."""

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
@click.option("--question", "question_field", default="question", show_default=True,
              help='The question: a field, or a template over fields such as "{Body} {Question}".')
@click.option("--answer", "answer_field", help="The gold answer's field or template (default: 'answer', "
              "with GSM8K's 'solution #### X' split).")
@click.option("--solution", "solution_field", help="The gold solution's field or template (default: 'solution').")
@click.option("--id", "id_field", help="Each question's id, unique in the file (default: the 'id' field, if any).")
@click.option("--split", help="The split of a saved DatasetDict directory.")
@pass_app
def dataset_import(app: App, path: Path, name: str, task: str, unlabelled: bool, question_field: str,
                   answer_field: str | None, solution_field: str | None, id_field: str | None,
                   split: str | None) -> None:
    """Import questions from JSONL, a JSON array, CSV, TSV, parquet, Arrow or a save_to_disk directory."""
    from services.dataset_files import FieldMapping
    from services.registry import import_dataset

    mapping = FieldMapping(question=question_field, answer=answer_field, solution=solution_field, id=id_field)
    with app.session() as session:
        ds = import_dataset(session, path, name=name, task=task, labelled=not unlabelled, mapping=mapping, split=split)
        console.print(f"imported {ds.size} questions as dataset {ds.name!r} ({task}, "
                      f"{'labelled' if ds.labelled else 'unlabelled pool'})")


@dataset.command("split")
@click.argument("name")
@click.option("--dev", "dev", type=int, required=True, help="Questions in the dev split (the rest: the test split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which questions go to dev (random.Random(seed)).")
@pass_app
def dataset_split(app: App, name: str, dev: int, seed: int) -> None:
    """Split NAME into NAME-dev (decides promotion: --eval) and NAME-test (only reported: --report-on).

    The same NAME, --dev and --seed give the same splits on every machine; each split keeps NAME's
    order, and a question's id is its id (or line) in NAME."""
    from services.registry import split_dataset

    with app.session() as session:
        dev_set, test_set = split_dataset(session, name, dev=dev, seed=seed)
        console.print(f"split {name!r}: {dev_set.name!r} {dev_set.size} questions (decides), "
                      f"{test_set.name!r} {test_set.size} questions (reported)")


@dataset.command("export")
@click.argument("name")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="The file (or directory) to write.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "csv", "parquet", "disk"]),
              help="Default: from the file's suffix; disk: a datasets save_to_disk directory.")
@pass_app
def dataset_export(app: App, name: str, out: Path, fmt: str | None) -> None:
    """Write a dataset out with the fields id, question, answer, solution (`dataset import` reads it back)."""
    from services.registry import export_dataset

    with app.session() as session:
        count = export_dataset(session, name, out, fmt)
    console.print(f"wrote {count} questions of dataset {name!r} to {out}")


@dataset.command("list")
@pass_app
def dataset_list(app: App) -> None:
    with app.session() as session:
        table = Table("name", "task", "questions", "labelled", "source")
        for ds in session.scalars(select(Dataset).order_by(Dataset.id)):
            table.add_row(ds.name, ds.task, str(ds.size), "yes" if ds.labelled else "no", ds.source)
        console.print(table)
