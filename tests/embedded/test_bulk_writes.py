"""The bulk write paths keep their guarantees on SQLite (the embedded database): a redelivered
job writes nothing twice, a stale attempt writes nothing (tests/bulk_support.py)."""

from __future__ import annotations

from tests.bulk_support import check_bulk_paths, check_insert_ignore_pages


def test_bulk_generation_and_vote_are_idempotent_and_fenced_on_sqlite(tmp_path, monkeypatch):
    check_bulk_paths(f"sqlite:///{tmp_path}/w2s.db", tmp_path, monkeypatch)


def test_insert_ignore_over_many_pages_on_sqlite(tmp_path):
    check_insert_ignore_pages(f"sqlite:///{tmp_path}/w2s.db", tmp_path)
