"""The bulk write paths keep their guarantees on the real PostgreSQL server: a redelivered job
writes nothing twice, a stale attempt writes nothing (tests/bulk_support.py)."""

from __future__ import annotations

from tests.bulk_support import check_bulk_paths, check_insert_ignore_pages


def test_bulk_generation_and_vote_are_idempotent_and_fenced_on_postgresql(postgres_url, tmp_path, monkeypatch):
    check_bulk_paths(postgres_url, tmp_path, monkeypatch)


def test_insert_ignore_over_many_pages_on_postgresql(postgres_url, tmp_path):
    check_insert_ignore_pages(postgres_url, tmp_path)
