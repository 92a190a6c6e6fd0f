"""The bulk write paths keep their guarantees on SQLite (the embedded database): a redelivered
job writes nothing twice, a stale attempt writes nothing (tests/bulk_support.py)."""

from __future__ import annotations

from tests.bulk_support import (
    check_bulk_paths,
    check_insert_ignore_pages,
    check_named_start_stores_the_ids_once,
    check_round_questions,
    check_round_questions_migration,
)


def test_bulk_generation_and_vote_are_idempotent_and_fenced_on_sqlite(tmp_path, monkeypatch):
    check_bulk_paths(f"sqlite:///{tmp_path}/w2s.db", tmp_path, monkeypatch)


def test_insert_ignore_over_many_pages_on_sqlite(tmp_path):
    check_insert_ignore_pages(f"sqlite:///{tmp_path}/w2s.db", tmp_path)


def test_round_questions_are_stored_once_and_chunked_in_order_on_sqlite(tmp_path):
    check_round_questions(f"sqlite:///{tmp_path}/w2s.db", tmp_path)


def test_a_named_start_stores_the_pool_ids_once_on_sqlite(tmp_path):
    check_named_start_stores_the_ids_once(f"sqlite:///{tmp_path}/w2s.db", tmp_path)


def test_round_questions_migration_up_and_down_on_sqlite(tmp_path):
    check_round_questions_migration(f"sqlite:///{tmp_path}/migrated.db")
