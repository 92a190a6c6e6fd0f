"""Engines and sessions. The URL comes from the caller (services.config.Settings)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ColumnElement, Engine, Text, and_, bindparam, cast, create_engine, event, false, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.schema import Base

_engines: dict[str, Engine] = {}
_engine_pid: dict[str, int] = {}


class SchemaOutOfDate(RuntimeError):
    pass


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show no part that could hold a password
        return url.split("://", 1)[0] + "://…"


def database_error_line(exc: DBAPIError, url: str) -> str | None:
    """One line for a database that cannot be used at all (down, not created, not migrated), with
    the fix; None for other errors (a bug, not the operator's to fix)."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason = reason[0] if reason else type(exc).__name__
    where = f"the database {redact(url)} (W2S_DATABASE_URL)"
    lowered = reason.lower()
    if "database" in lowered and "does not exist" in lowered:
        return f"{where} does not exist: create it (e.g. `createdb`), then run `w2sctl db upgrade`"
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"{where} has no w2s tables ({reason}): run `w2sctl db upgrade`"
    if isinstance(exc, (OperationalError, InterfaceError)):
        return f"{where} is unreachable: {reason}; start the database server or fix W2S_DATABASE_URL"
    return None


def get_engine(url: str) -> Engine:
    """One engine per URL per process; a forked worker gets a fresh pool, never the parent's sockets."""
    engine = _engines.get(url)
    if engine is not None and _engine_pid[url] == os.getpid():
        return engine
    if engine is not None:  # inherited across fork: drop the parent's connections without closing them
        engine.dispose(close=False)
    if url.startswith("sqlite"):
        _make_sqlite_dir(url)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    _engines[url] = engine
    _engine_pid[url] = os.getpid()
    return engine


def _make_sqlite_dir(url: str) -> None:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _engine_pid.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = sessionmaker(get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def among(column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """`column IN ids`, bounded by the ids' range as well. Where `column` follows equality columns
    in an index (the generations' unique key: round, voter, question), PostgreSQL's planner without
    statistics on the table (never analysed: autovacuum off, or a table that grew since) estimates
    a few rows for the equality part and tests the IN list as a filter over every row of it: a
    chunk's check read the voter's whole round, O(pool) per chunk (issue #15). A range is always
    an index bound: the scan reads the chunk's stretch of the index (pool ids are consecutive in a
    chunk or a page), whatever the plan. Same rows either way."""
    ids = list(ids)
    if not ids:
        return false()
    return and_(column.in_(ids), column.between(min(ids), max(ids)))


def insert_ignore(session: Session, model: type[Base], rows: Iterable[dict[str, Any]]) -> list[int]:
    """INSERT … ON CONFLICT DO NOTHING, in bulk; returns the ids of the rows actually inserted (for a
    table without an `id`, such as `round_questions`, the last column of its primary key).

    This is what makes a re-run job write nothing twice: the unique keys decide. Nothing is
    committed here: the rows go in the caller's transaction, with whatever fences it.

    PostgreSQL: one statement whatever the number of rows, `INSERT … SELECT FROM unnest(arrays)`,
    one array parameter per column, so the statement text never changes (the driver converts
    and caches it once; a multi-row VALUES of 64 generations has 800 parameters to convert on
    every call, most of a chunk's write time). SQLite: a Core executemany, which SQLAlchemy sends
    as multi-row INSERTs of up to 1,000 rows ("insertmanyvalues", RETURNING included).
    """
    rows = list(rows)
    if not rows:
        return []
    table = model.__table__
    if session.get_bind().dialect.name == "postgresql":
        return _insert_ignore_unnest(session, table, rows)
    stmt = sqlite.insert(table).on_conflict_do_nothing().returning(_returned_key(table))
    return list(session.connection().execute(stmt, rows).scalars())


def _insert_ignore_unnest(session: Session, table: Any, rows: list[dict[str, Any]]) -> list[int]:
    columns, values = [], {}
    for column in table.c:
        if column.name in rows[0]:
            values[column.name] = [row[column.name] for row in rows]
        elif column.default is not None and not column.primary_key:  # created_at, sample_index, ...
            default = column.default
            value = default.arg(None) if default.is_callable else default.arg  # type: ignore[attr-defined]
            values[column.name] = [value] * len(rows)
        else:
            continue
        columns.append(column)
    params = []
    for column in columns:
        if isinstance(column.type, JSON):  # as text[], cast back per row: psycopg adapts no json[] of dicts
            params.append(bindparam(f"v_{column.name}", [json.dumps(v) for v in values[column.name]],
                                    type_=postgresql.ARRAY(Text)))
        else:
            params.append(bindparam(f"v_{column.name}", values[column.name], type_=postgresql.ARRAY(column.type)))
    unnested = func.unnest(*params).table_valued(*(column.name for column in columns)).render_derived()
    selected = [cast(unnested.c[column.name], column.type) if isinstance(column.type, JSON) else unnested.c[column.name]
                for column in columns]
    stmt = (postgresql.insert(table).from_select([column.name for column in columns], select(*selected))
            .on_conflict_do_nothing().returning(_returned_key(table)))
    return list(session.connection().execute(stmt).scalars())


def _returned_key(table: Any) -> Any:
    return table.c.id if "id" in table.c else list(table.primary_key.columns)[-1]


def insert_ignore_batches(session: Session, model: type[Base], rows: Iterable[dict[str, Any]],
                          batch: int = 5000) -> int:
    """`insert_ignore` over a stream of rows, `batch` at a time (bounded memory); returns how many
    were inserted. Same transaction as the caller's: nothing is committed here."""
    inserted, pending = 0, []
    for row in rows:
        pending.append(row)
        if len(pending) >= batch:
            inserted += len(insert_ignore(session, model, pending))
            pending = []
    return inserted + len(insert_ignore(session, model, pending))


# --- migrations -------------------------------------------------------------------------------

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if url.startswith("sqlite"):
        _make_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def ensure_schema(url: str) -> None:
    """SQLite (the embedded default) is migrated automatically; a server database must be
    migrated on purpose (`w2sctl db upgrade`), so a stale schema is an error, not a surprise."""
    if url.startswith("sqlite"):
        upgrade(url)
        return
    current, head = current_revision(url), head_revision(url)
    if current != head:
        raise SchemaOutOfDate(
            f"the database {redact(url)} (W2S_DATABASE_URL) has schema revision {current or 'none'}, "
            f"the code needs {head}: run `w2sctl db upgrade`"
        )
