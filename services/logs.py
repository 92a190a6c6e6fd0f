"""Logs with the round and job on every line: text by default, one JSON object per line with
W2S_LOG_FORMAT=json (for Loki, Elasticsearch, `jq`).

The job runner binds the ids it is working for (`bind_job`); a filter copies them onto every
record logged in that context, whichever library logged it (Celery, transformers, ours).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("round_id", "job_id", "attempt")

_context: ContextVar[dict[str, Any]] = ContextVar("w2s_log_context", default={})

# Attributes every LogRecord has; anything else on a record came from `extra=` and is kept in JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def bind_job(**ids: Any) -> None:
    """Set (or, with None, drop) ids for the log lines of the job running in this context."""
    current = {**_context.get(), **ids}
    _context.set({k: v for k, v in current.items() if v is not None})


def clear_job() -> None:
    _context.set({})


class JobContextFilter(logging.Filter):
    """Copy the bound ids onto the record; ids given with `extra=` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get()
        for field in CONTEXT_FIELDS:
            if getattr(record, field, None) is None:
                setattr(record, field, ids.get(field))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for field in CONTEXT_FIELDS:
            entry[field] = getattr(record, field, None)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [round=%(round_id)s job=%(job_id)s] %(message)s"


def configure_logging(level: int | str = logging.INFO, fmt: str = "text", stream=None) -> logging.Handler:
    """One handler on the root logger, in the chosen format (W2S_LOG_FORMAT: settings.log_format),
    with the job ids on every record."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format: {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(JobContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_w2s", False)]:
        root.removeHandler(old)
    handler._w2s = True  # type: ignore[attr-defined]  # replaced, not duplicated, on a second call
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
