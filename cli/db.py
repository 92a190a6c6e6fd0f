"""`w2sctl db`: the SQL store."""

from __future__ import annotations

import click

from cli.context import App, Group, console, pass_app
from db.session import upgrade


@click.group(cls=Group)
def db() -> None:
    """The SQL store."""


@db.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Apply Alembic migrations to W2S_DATABASE_URL."""
    upgrade(app.settings.database_url)
    console.print(f"database at head: {app.settings.redacted_database_url()}")
