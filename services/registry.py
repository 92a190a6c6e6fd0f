"""Datasets and models: import, register, look up by name. Each write is all-or-nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.schema import Checkpoint, Dataset, Question
from models.answers import gold_answer_from_solution
from models.loading import CheckpointError, check_checkpoint_dir
from services.errors import InputError, NotFound

TASKS = ("gsm8k", "math")
ROLES = ("weak", "strong")


@dataclass(frozen=True)
class ParsedQuestion:
    text: str
    gold_answer: str | None
    gold_solution: str | None


def parse_question(record: Any, task: str, where: str) -> ParsedQuestion:
    """One record of a question file. Accepted shapes:

    - GSM8K train: ``{"question", "answer": "<solution>\\n#### X"}``
    - GSM8K test / MATH: ``{"question", "solution", "answer": "X"}``
    - SVAMP: ``{"Body", "Question", "Answer"}``
    - unlabelled: ``{"question"}``
    """
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record:
        text = record["question"]
    elif "Body" in record and "Question" in record:  # SVAMP
        text = f"{str(record['Body']).strip()} {str(record['Question']).strip()}"
    else:
        raise InputError(f"{where}: missing field 'question'")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: field 'question' must be a non-empty string")

    solution = record.get("solution")
    raw_answer = record.get("answer", record.get("Answer"))
    if raw_answer is not None and not isinstance(raw_answer, (str, int, float)):
        raise InputError(f"{where}: field 'answer' must be a string or a number")
    if solution is not None and not isinstance(solution, str):
        raise InputError(f"{where}: field 'solution' must be a string")
    answer = None if raw_answer is None else str(raw_answer)
    if answer is not None and solution is None and "####" in answer:
        solution, answer = answer, gold_answer_from_solution(answer, task)  # GSM8K train style
    elif answer is None and solution is not None:
        answer = gold_answer_from_solution(solution, task)
    if isinstance(raw_answer, float) and raw_answer.is_integer():
        answer = str(int(raw_answer))
    if answer is not None and not answer.strip():
        raise InputError(f"{where}: the gold answer is empty")
    return ParsedQuestion(text.strip(), answer.strip() if answer else None, solution)


def read_question_file(path: Path, task: str) -> list[ParsedQuestion]:
    """Parse the whole file before anything is written; errors name the file and line."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array (SVAMP ships this way)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
        questions = [parse_question(r, task, f"{path}: item {i}") for i, r in enumerate(records)]
    else:
        questions = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            questions.append(parse_question(record, task, f"{path}:{lineno}"))
    if not questions:
        raise InputError(f"{path}: no questions found")
    return questions


def import_dataset(session: Session, path: Path, *, name: str, task: str, labelled: bool) -> Dataset:
    validate_name(name, "dataset name")
    if session.scalar(select(Dataset).where(Dataset.name == name)) is not None:
        raise InputError(f"a dataset named {name!r} already exists")
    questions = read_question_file(path, task)
    if labelled and any(q.gold_answer is None for q in questions):
        missing = next(i for i, q in enumerate(questions) if q.gold_answer is None)
        raise InputError(
            f"{path}: question {missing} has no gold answer; import with --unlabelled for a question pool"
        )
    dataset = Dataset(name=name, task=task, labelled=labelled, source=str(path.resolve()), size=len(questions))
    session.add(dataset)
    session.flush()
    session.execute(
        Question.__table__.insert(),
        [
            {"dataset_id": dataset.id, "index": i, "text": q.text, "gold_answer": q.gold_answer, "gold_solution": q.gold_solution}
            for i, q in enumerate(questions)
        ],
    )
    return dataset


def register_model(session: Session, *, name: str, path: Path, role: str) -> Checkpoint:
    validate_name(name, "model name")
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if session.scalar(select(Checkpoint).where(Checkpoint.name == name)) is not None:
        raise InputError(f"a model named {name!r} already exists")
    try:
        resolved = check_checkpoint_dir(path)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    checkpoint = Checkpoint(name=name, path=str(Path(resolved).resolve()), role=role, status="base", metrics={})
    session.add(checkpoint)
    return checkpoint


def validate_name(name: str, what: str) -> None:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "-_." for c in name):
        raise InputError(f"{what} {name!r}: use 1-200 letters, digits, '-', '_' or '.'")


def get_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        known = session.scalars(select(Dataset.name).order_by(Dataset.name)).all()
        raise NotFound(f"unknown dataset {name!r}" + (f" (known: {', '.join(known)})" if known else " (none imported yet)"))
    return dataset


def get_checkpoint(session: Session, name: str) -> Checkpoint:
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.name == name))
    if checkpoint is None:
        known = session.scalars(select(Checkpoint.name).order_by(Checkpoint.name)).all()
        raise NotFound(f"unknown model {name!r}" + (f" (known: {', '.join(known)})" if known else " (none registered yet)"))
    return checkpoint


def lineage_root(checkpoint: Checkpoint) -> int:
    return checkpoint.lineage_root_id or checkpoint.id


def current_student(session: Session, checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint a new candidate must beat: the newest promoted one of the lineage, else its root."""
    root = lineage_root(checkpoint)
    promoted = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.lineage_root_id == root, Checkpoint.status == "promoted")
        .order_by(Checkpoint.promoted_at.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    return promoted or session.get(Checkpoint, root)


def question_count(session: Session, dataset: Dataset) -> int:
    return session.scalar(select(func.count()).select_from(Question).where(Question.dataset_id == dataset.id)) or 0
