"""The bulk write paths keep their guarantees on the real PostgreSQL server: a redelivered job
writes nothing twice, a stale attempt writes nothing (tests/bulk_support.py)."""

from __future__ import annotations

from tests.bulk_support import (
    check_bulk_paths,
    check_heartbeat_during_vote,
    check_insert_ignore_pages,
    check_named_start_stores_the_ids_once,
    check_round_questions,
    check_round_questions_migration,
)
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import drop_database, fresh_database


def test_bulk_generation_and_vote_are_idempotent_and_fenced_on_postgresql(postgres_url, tmp_path, monkeypatch):
    check_bulk_paths(postgres_url, tmp_path, monkeypatch)


def test_the_heartbeat_gets_through_while_the_vote_transaction_is_open_on_postgresql(postgres_url, tmp_path,
                                                                                    monkeypatch):
    check_heartbeat_during_vote(postgres_url, tmp_path, monkeypatch)


def test_insert_ignore_over_many_pages_on_postgresql(postgres_url, tmp_path):
    check_insert_ignore_pages(postgres_url, tmp_path)


def test_round_questions_are_stored_once_and_chunked_in_order_on_postgresql(postgres_url, tmp_path):
    check_round_questions(postgres_url, tmp_path)


def test_a_named_start_stores_the_pool_ids_once_on_postgresql(postgres_url, tmp_path):
    check_named_start_stores_the_ids_once(postgres_url, tmp_path)


def test_round_questions_migration_up_and_down_on_postgresql():
    url, name = fresh_database(POSTGRES_ADMIN_URL, prefix="w2s_test_migration")
    try:
        check_round_questions_migration(url)
    finally:
        drop_database(POSTGRES_ADMIN_URL, name)
