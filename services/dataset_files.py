"""Dataset files in and out: the formats people keep question sets in, and the field mapping.

Reading (`read_records`) gives plain records, each with where it came from (file and line, or row);
the mapping rules (`FieldMapping`, `map_record`, `check_unique_ids`) are pure functions over those
records, so an import parses and validates the whole file before anything is written.

Formats, by the path: ``.jsonl`` / ``.ndjson`` (one object a line), ``.json`` (an array, or JSON
lines), ``.csv``, ``.tsv``, ``.parquet``, ``.arrow`` and a directory written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, with a split). The tabular and Arrow
formats are read with Hugging Face ``datasets``; JSON text is read line by line here, because
errors must name the line (``datasets``' JSON reader, pyarrow's, names none and refuses a field
whose type changes from row to row, as MATH's answers do). See docs/design-notes.md.
"""

from __future__ import annotations

import json
import math
import shutil
import string
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from models.answers import gold_answer_from_solution, normalize_gsm8k
from models.jsonl import JsonlError, parse_jsonl
from services.errors import InputError

TASKS = ("gsm8k", "math")
NUMERIC_TASKS = ("gsm8k",)  # gold answers must be numbers
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABULAR_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
EXPORT_FORMATS = ("jsonl", "json", "csv", "parquet", "disk")


@dataclass(frozen=True)
class Record:
    where: str  # "<file>:<line>" for JSON text, "<file>: row <n>" for tabular formats
    fields: dict[str, Any]


@dataclass(frozen=True)
class ParsedQuestion:
    text: str
    gold_answer: str | None
    gold_solution: str | None
    source_id: str | None = None


# --- reading -------------------------------------------------------------------------------------


def read_records(path: Path, *, split: str | None = None) -> list[Record]:
    """Every record of a dataset file or directory; errors name the file and the line or row."""
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_json_text(path, decode_utf8(path))
    if suffix in TABULAR_SUFFIXES:
        return _read_tabular(path, suffix)
    known = ", ".join([*TEXT_SUFFIXES, *TABULAR_SUFFIXES])
    raise InputError(f"{path}: unknown format {suffix or '(no suffix)'!r}: expected {known}, "
                     "or a directory written by datasets' save_to_disk")


def decode_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is named with the line and column of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                         "convert the file to UTF-8") from None


def _read_json_text(path: Path, text: str) -> list[Record]:
    if text.lstrip().startswith("["):  # a JSON array (SVAMP ships this way)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        return [_record(f"{path}: item {i}", item) for i, item in enumerate(items)]
    try:
        return [Record(f"{path}:{lineno}", item) for lineno, item in parse_jsonl(text, path)]
    except JsonlError as exc:
        raise InputError(str(exc)) from None


def _record(where: str, item: Any) -> Record:
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return Record(where, item)


def _quiet_datasets():
    """The ``datasets`` module, without its progress bars on the terminal."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _read_tabular(path: Path, suffix: str) -> list[Record]:
    datasets = _quiet_datasets()

    kind = TABULAR_SUFFIXES[suffix]
    if kind == "csv":
        decode_utf8(path)  # a bad byte is named by its line here; pandas would name a byte offset
    try:
        if kind == "arrow":
            rows = datasets.Dataset.from_file(str(path)).to_list()
        else:
            options = _csv_options(path, suffix) if kind == "csv" else {}
            with tempfile.TemporaryDirectory(prefix="w2s-import-") as cache:  # no copy left in ~/.cache
                rows = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache,
                                             keep_in_memory=True, **options).to_list()
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many kinds; one line names the file
        raise InputError(f"{path}: cannot read as {kind}: {_first_line(exc)}") from None
    return [Record(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _csv_options(path: Path, suffix: str) -> dict[str, Any]:
    """Every CSV cell as text: "007" stays "007", an empty cell is "" (not NaN), a number's text is kept."""
    import csv

    import datasets

    sep = "\t" if suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise InputError(f"{path}:1: no header line (the first line names the columns)")
    return {"sep": sep, "keep_default_na": False,
            "features": datasets.Features({column: datasets.Value("string") for column in header})}


def _read_saved_dataset(path: Path, split: str | None) -> list[Record]:
    datasets = _quiet_datasets()

    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise InputError(f"{path}: a directory, but not one written by datasets' save_to_disk "
                         "(no dataset_info.json or dataset_dict.json)")
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the saved dataset: {_first_line(exc)}") from None
    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise InputError(f"{path}: " + (f"no split {split!r}" if split else "several splits")
                             + f" (splits: {', '.join(splits)}); choose one with --split")
        loaded, where = loaded[split], f"{path}[{split}]"
    elif split is not None:
        raise InputError(f"{path}: --split {split!r} given, but the saved dataset has no splits")
    return [Record(f"{where}: row {i}", row) for i, row in enumerate(loaded.to_list(), start=1)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- the mapping (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldMapping:
    """Which fields make each part of a question. A value is a template over the record's fields
    (``"{Body} {Question}"``) or a bare field name (``Answer``, the same as ``"{Answer}"``).

    ``answer`` and ``solution`` None: the record's ``answer`` / ``solution`` fields when present
    (a GSM8K-style ``solution #### X`` answer is split in two). ``id`` None: the ``id`` field
    when present.
    """

    question: str = "question"
    answer: str | None = None
    solution: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        for option in ("question", "answer", "solution", "id"):
            template = getattr(self, option)
            if template is not None:
                template_fields(template, f"--{option}")  # raises on an empty or broken template


def template_fields(template: str, option: str) -> list[str]:
    """The fields a template names; a bare name is one field. Errors name the option."""
    if not template.strip():
        raise InputError(f"{option}: the template is empty; give a field name or a template like \"{{Body}} {{Question}}\"")
    if "{" not in template and "}" not in template:
        return [template.strip()]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"{option}: not a valid template {template!r}: {exc}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    if not names:
        raise InputError(f"{option}: the template {template!r} names no field (write fields as {{name}})")
    for name in names:
        if not name or not name.isidentifier():
            raise InputError(f"{option}: {{{name}}} in {template!r} is not a field name")
    return names


def render(template: str, record: Record, option: str) -> str:
    """The template filled from the record; a missing field names the row, the option and the field."""
    names = template_fields(template, option)
    values = {}
    for name in names:
        if name not in record.fields:
            known = ", ".join(sorted(map(str, record.fields))) or "none"
            raise InputError(f"{record.where}: missing field {name!r} (for {option}; the record has: {known})")
        values[name] = _text(record.fields[name])
    if "{" not in template and "}" not in template:
        return values[names[0]]
    return template.format_map(values)


def _text(value: Any) -> str:
    """A field's value as text: 51.0 → "51" (SVAMP stores integers as floats), None → ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def map_record(record: Record, mapping: FieldMapping, task: str) -> ParsedQuestion:
    """One record → a question, by the mapping. Errors name the row and the field."""
    text = render(mapping.question, record, "--question").strip()
    if not text:
        raise InputError(f"{record.where}: the question is empty (--question {mapping.question!r})")

    fields = record.fields
    if mapping.answer is not None:
        answer: str | None = render(mapping.answer, record, "--answer")
    else:
        raw = fields.get("answer")
        if raw is not None and not isinstance(raw, (str, int, float)):
            raise InputError(f"{record.where}: field 'answer' must be a string or a number")
        answer = None if raw is None else _text(raw)
    if mapping.solution is not None:
        solution: str | None = render(mapping.solution, record, "--solution")
    else:
        raw = fields.get("solution")
        if raw is not None and not isinstance(raw, str):
            raise InputError(f"{record.where}: field 'solution' must be a string")
        solution = raw
    if answer is not None and solution is None and "####" in answer:  # GSM8K train: "<solution> #### X"
        solution, answer = answer, gold_answer_from_solution(answer, task)
    elif answer is None and solution:
        answer = gold_answer_from_solution(solution, task)
    if answer is not None:
        answer = answer.strip()
        option = f"--answer {mapping.answer!r}" if mapping.answer else "field 'answer'"
        if not answer:
            raise InputError(f"{record.where}: the gold answer is empty ({option})")
        if task in NUMERIC_TASKS and not is_number(answer):
            raise InputError(f"{record.where}: the gold answer {answer!r} is not a number ({option}); "
                             f"a {task} dataset needs numeric answers (use --task math for other answers)")

    source_id = None
    if mapping.id is not None:
        source_id = render(mapping.id, record, "--id")
        if not source_id:
            raise InputError(f"{record.where}: the id is empty (--id {mapping.id!r})")
    elif fields.get("id") is not None:
        source_id = _text(fields["id"])
    return ParsedQuestion(text, answer, solution, source_id)


def is_number(answer: str) -> bool:
    """Whether a gold answer is a number the numeric grader can compare ("1,200", "-2.5", "3/4")."""
    try:
        Fraction(normalize_gsm8k(answer))
    except (ValueError, ZeroDivisionError):
        return False
    return True


def check_unique_ids(questions: Iterable[tuple[str, str | None]]) -> None:
    """(where, id) pairs: refuse an id that occurs twice, naming every place it occurs."""
    seen: dict[str, list[str]] = {}
    for where, source_id in questions:
        if source_id is not None:
            seen.setdefault(source_id, []).append(where)
    duplicates = {source_id: places for source_id, places in seen.items() if len(places) > 1}
    if duplicates:
        source_id, places = next(iter(duplicates.items()))
        more = f" ({len(duplicates) - 1} more duplicated ids)" if len(duplicates) > 1 else ""
        raise InputError(f"duplicate id {source_id!r} at {', '.join(places)}{more}: ids must be unique in a dataset")


def parse_questions(records: list[Record], mapping: FieldMapping, task: str) -> list[ParsedQuestion]:
    """The whole file, validated: every row mapped, ids unique."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    questions = [map_record(record, mapping, task) for record in records]
    check_unique_ids((record.where, q.source_id) for record, q in zip(records, questions))
    return questions


# --- writing -------------------------------------------------------------------------------------


def export_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
        return fmt
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.suffix.lower() in by_suffix:
        return by_suffix[path.suffix.lower()]
    raise InputError(f"{path}: cannot tell the format from the name; give --format ({', '.join(EXPORT_FORMATS)})")


def write_records(rows: list[dict[str, Any]], path: Path, fmt: str) -> None:
    """Write rows with ``datasets``' writers, to a temporary name first: a failed export leaves nothing."""
    datasets = _quiet_datasets()

    if path.exists():
        raise InputError(f"{path}: already exists; refusing to overwrite")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such directory")
    table = datasets.Dataset.from_list(rows)
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
    try:
        if fmt == "disk":
            table.save_to_disk(str(partial))
        elif fmt in ("jsonl", "json"):
            table.to_json(str(partial), lines=fmt == "jsonl", force_ascii=False,
                          **({} if fmt == "jsonl" else {"orient": "records"}))
        elif fmt == "csv":
            table.to_csv(str(partial), index=False)
        else:
            table.to_parquet(str(partial))
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        raise
