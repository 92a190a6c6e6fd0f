"""Datasets and models: import, register, look up by name. Each write is all-or-nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Dataset, Question
from models.backends import CheckpointError, check_checkpoint_dir
from models.hf_layout import has_chat_template
from models.prompts import PROMPT_FORMATS
from services.contracts import CheckpointStatus
from services.dataset_files import TASKS, FieldMapping, export_format, parse_questions, read_records, write_records
from services.errors import InputError
from services.lookup import get_by_id, get_by_name

ROLES = ("weak", "strong")


def import_dataset(session: Session, path: Path, *, name: str, task: str, labelled: bool,
                   mapping: FieldMapping | None = None, split: str | None = None) -> Dataset:
    """Read and validate the whole file (services.dataset_files), then write it in one go."""
    validate_name(name, "dataset name")
    if session.scalar(select(Dataset).where(Dataset.name == name)) is not None:
        raise InputError(f"a dataset named {name!r} already exists")
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    records = read_records(path, split=split)
    if not records:
        raise InputError(f"{path}: no questions found")
    questions = parse_questions(records, mapping or FieldMapping(), task)
    if labelled:
        missing = next((r.where for r, q in zip(records, questions) if q.gold_answer is None), None)
        if missing is not None:
            raise InputError(f"{missing}: no gold answer; import with --unlabelled for a question pool"
                             + ("" if mapping and mapping.answer else ", or name the answer's field with --answer"))
    dataset = Dataset(name=name, task=task, labelled=labelled, source=str(path.resolve()), size=len(questions))
    session.add(dataset)
    session.flush()
    session.execute(
        Question.__table__.insert(),  # type: ignore[attr-defined]  # a Table: the ORM types it as a FromClause
        [
            {"dataset_id": dataset.id, "index": i, "text": q.text, "gold_answer": q.gold_answer,
             "gold_solution": q.gold_solution, "source_id": q.source_id}
            for i, q in enumerate(questions)
        ],
    )
    return dataset


def export_dataset(session: Session, name: str, path: Path, fmt: str | None = None) -> int:
    """Write a dataset out (JSONL, a JSON array, CSV, parquet or a save_to_disk directory) with the
    fields `id`, `question`, `answer`, `solution`: `dataset import` reads it back as it is."""
    dataset = get_dataset(session, name)
    fmt = export_format(path, fmt)
    rows = [{"id": q.source_id if q.source_id is not None else str(q.index), "question": q.text,
             "answer": q.gold_answer, "solution": q.gold_solution}
            for q in session.scalars(select(Question).where(Question.dataset_id == dataset.id).order_by(Question.index))]
    write_records(rows, path, fmt)
    return len(rows)


def register_model(session: Session, *, name: str, path: Path, role: str, prompt_format: str = "plain",
                   decoding: dict[str, Any] | None = None) -> Checkpoint:
    """A base checkpoint; ``decoding``: generation_config.json fields written over whenever it
    loads (``models.backends.decoding``)."""
    validate_name(name, "model name")
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"unknown prompt format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    if session.scalar(select(Checkpoint).where(Checkpoint.name == name)) is not None:
        raise InputError(f"a model named {name!r} already exists")
    try:
        resolved = check_checkpoint_dir(path)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    if prompt_format == "chat" and not has_chat_template(resolved):
        raise InputError(f"--prompt-format chat: the tokenizer of {resolved} has no chat template "
                         "(no chat_template in tokenizer_config.json, nor chat_template.jinja); register it as plain")
    checkpoint = Checkpoint(name=name, path=str(Path(resolved).resolve()), role=role, status=CheckpointStatus.BASE,
                            metrics={}, prompt_format=prompt_format, decoding=dict(decoding or {}))
    session.add(checkpoint)
    return checkpoint


def validate_name(name: str, what: str) -> None:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "-_." for c in name):
        raise InputError(f"{what} {name!r}: use 1-200 letters, digits, '-', '_' or '.'")


def get_dataset(session: Session, name: str) -> Dataset:
    dataset: Dataset = get_by_name(session, Dataset, name, "dataset", "none imported yet")
    return dataset


def get_checkpoint(session: Session, name: str) -> Checkpoint:
    checkpoint: Checkpoint = get_by_name(session, Checkpoint, name, "model", "none registered yet")
    return checkpoint


def lineage_root(checkpoint: Checkpoint) -> int:
    return checkpoint.lineage_root_id or checkpoint.id


def current_student(session: Session, checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint a new candidate must beat: the newest promoted one of the lineage, else its root."""
    root = lineage_root(checkpoint)
    promoted = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.lineage_root_id == root, Checkpoint.status == CheckpointStatus.PROMOTED)
        .order_by(Checkpoint.promoted_at.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    return promoted or get_by_id(session, Checkpoint, root, "checkpoint")


def split_indices(size: int, dev: int, seed: int) -> tuple[list[int], list[int]]:
    """(dev, test) question indices: `dev` of `size` drawn with `seed` (random.Random(seed).sample,
    the same on every machine and Python 3 version), the rest the test split; each in file order."""
    import random

    if not 0 < dev < size:
        raise InputError(f"--dev {dev}: must be between 1 and {size - 1} (the dataset has {size} questions)")
    chosen = set(random.Random(seed).sample(range(size), dev))
    return sorted(chosen), [i for i in range(size) if i not in chosen]


def split_dataset(session: Session, name: str, *, dev: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """NAME-dev (`dev` questions drawn with `seed`) and NAME-test (the rest), copies of NAME's
    questions in its order: the dev split decides promotion (eval.dataset), the test split is
    only reported (eval.report_on). Both written in one go, or neither."""
    source = get_dataset(session, name)
    questions = list(session.scalars(select(Question).where(Question.dataset_id == source.id).order_by(Question.index)))
    dev_indices, test_indices = split_indices(len(questions), dev, seed)
    made = []
    for suffix, indices in (("dev", dev_indices), ("test", test_indices)):
        split_name = f"{name}-{suffix}"
        validate_name(split_name, "split name")
        if session.scalar(select(Dataset).where(Dataset.name == split_name)) is not None:
            raise InputError(f"a dataset named {split_name!r} already exists: split {name!r} once")
        dataset = Dataset(name=split_name, task=source.task, labelled=source.labelled, size=len(indices),
                          source=f"{source.source} ({suffix} split of {name}: --dev {dev} --seed {seed})")
        session.add(dataset)
        session.flush()
        session.execute(Question.__table__.insert(), [  # type: ignore[attr-defined]  # a Table, typed as a FromClause
            {"dataset_id": dataset.id, "index": i, "text": questions[j].text, "gold_answer": questions[j].gold_answer,
             "gold_solution": questions[j].gold_solution,
             "source_id": questions[j].source_id if questions[j].source_id is not None else str(questions[j].index)}
            for i, j in enumerate(indices)])
        made.append(dataset)
    return made[0], made[1]
