"""What every command module shares: the console, the context object and the error-handling group."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import click
from rich.console import Console
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.session import SchemaOutOfDate, database_error_line, ensure_schema, session_scope
from models.backends import CheckpointError
from services.dispatch import Dispatcher
from services.errors import W2SError
from services.settings import apply_torch_threads, load_settings

console = Console(highlight=False)


class App:
    """The context object: the settings (read here, once, for the whole command), sessions on a
    migrated database, and the dispatcher that sends jobs (or runs them here, embedded)."""

    def __init__(self) -> None:
        self.settings = load_settings()
        self.torch_threads = apply_torch_threads(self.settings)  # (count, where it comes from)
        self._schema_checked = False

    @cached_property
    def dispatcher(self) -> Dispatcher:
        from workers.dispatch import JobDispatcher

        return JobDispatcher(self.settings)

    @contextmanager
    def session(self) -> Iterator[Session]:
        if not self._schema_checked:
            ensure_schema(self.settings.database_url)
            self._schema_checked = True
        with session_scope(self.settings.database_url) as session:
            yield session


pass_app = click.make_pass_decorator(App, ensure=True)


class Group(click.Group):
    """Every user-fixable error becomes one clear line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (W2SError, CheckpointError, SchemaOutOfDate) as exc:
            raise click.ClickException(str(exc)) from None
        except DBAPIError as exc:  # the database is down, not created or not migrated: say which and the fix
            line = database_error_line(exc, load_settings().database_url)
            if line is None:
                raise
            raise click.ClickException(line) from None


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
