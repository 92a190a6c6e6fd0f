"""JSON Lines files, read in one place for the whole project (dataset import, training files,
recorded-response checkpoints, the demo's splits).

One JSON object per line; blank lines are skipped. A bad line is a ``JsonlError`` (a
``ValueError``) whose message names the file and the line: ``train.jsonl:3: malformed JSON: ...``.
The standard library's ``json`` does the parsing; what is ours is only the error messages, which
``datasets``' JSON loader would not give per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any


class JsonlError(ValueError):
    """A line of a JSONL file that is not what it should be; the message names file and line."""


def parse_jsonl(text: str, source: str | os.PathLike, *, strings: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``text`` read from ``source`` (named in
    errors). ``strings``: fields every object must have, each a string."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonlError(f"{source}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise JsonlError(f"{source}:{lineno}: expected a JSON object, got {type(record).__name__}")
        for field in strings:
            if not isinstance(record.get(field), str):
                raise JsonlError(f"{source}:{lineno}: field {field!r} must be a string")
        yield lineno, record


def iter_jsonl(path: str | os.PathLike, *, strings: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """``parse_jsonl`` of a UTF-8 file (a byte-order mark is skipped)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    yield from parse_jsonl(text, path, strings=strings)


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None, strings: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The objects of a JSONL file in order (the first ``limit`` only, if given)."""
    rows: list[dict[str, Any]] = []
    for _, record in iter_jsonl(path, strings=strings):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(record)
    return rows
