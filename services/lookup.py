"""Get a row or fail with one line naming what is missing: the lookups every command shares."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import NotFound

Row = TypeVar("Row")


def get_by_id(session: Session, model: type[Row], row_id: int, what: str, *, lock: bool = False) -> Row:
    """`model` row `row_id`, else NotFound("round 7 does not exist"). `lock`: SELECT … FOR UPDATE
    (a row lock on PostgreSQL; SQLite ignores it)."""
    if lock:
        row = session.scalar(select(model).where(model.id == row_id).with_for_update())  # type: ignore[attr-defined,arg-type]
    else:
        row = session.get(model, row_id)
    if row is None:
        raise NotFound(f"{what} {row_id} does not exist")
    return row


def get_by_name(session: Session, model: Any, name: str, what: str, none_yet: str) -> Any:
    """`model` row named `name`, else NotFound listing the known names (or `none_yet` if there are none)."""
    row = session.scalar(select(model).where(model.name == name))
    if row is None:
        known: list[str] = list(session.scalars(select(model.name).order_by(model.name)).all())
        raise NotFound(f"unknown {what} {name!r}" + (f" (known: {', '.join(known)})" if known else f" ({none_yet})"))
    return row
