"""Issue #12's fast half: the reconciliation rule, `round start --name` as an idempotency key, and
one line (naming the database with its password hidden, and the fix) for a database that is
down, not created or not migrated."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.monitor import MessageCensus, job_of_task_id
from tests.cluster_support import free_port, write_questions, write_replay_models
from tests.conftest import POSTGRES_ADMIN_URL
from workers.reconcile import jobs_to_resend


def census(waiting=(), held=(), taken=()) -> MessageCensus:
    return MessageCensus(waiting=set(waiting), taken=set(taken), held=set(held), consumers={})


def test_a_job_is_resent_only_after_a_whole_grace_period_without_a_message():
    # First seen without a message at t=10: not yet.
    due, missing = jobs_to_resend([1, 2, 3], census(waiting=[1], held=[2]), {}, now=10.0, grace_s=5.0)
    assert due == [] and missing == {3: 10.0}
    # Still missing at t=14: not yet; at t=15: sent, and its grace period starts again.
    due, missing = jobs_to_resend([1, 2, 3], census(waiting=[1], held=[2]), missing, now=14.0, grace_s=5.0)
    assert due == [] and missing == {3: 10.0}
    due, missing = jobs_to_resend([1, 2, 3], census(waiting=[1], held=[2]), missing, now=15.0, grace_s=5.0)
    assert due == [3] and missing == {3: 15.0}
    # A message seen again (taken by a worker in between) resets the count.
    due, missing = jobs_to_resend([3], census(held=[3]), missing, now=16.0, grace_s=5.0)
    assert due == [] and missing == {}


def test_a_message_taken_by_a_dead_worker_does_not_count():
    # In Redis `unacked` (handed out) but held by no live worker: stranded until the visibility timeout.
    due, _ = jobs_to_resend([7], census(taken=[7]), {7: 0.0}, now=100.0, grace_s=5.0)
    assert due == [7]


def test_a_reconciler_needs_a_broker(tmp_path):
    from services.settings import Settings
    from workers.reconcile import Reconciler

    with pytest.raises(ValueError, match="name no broker"):
        Reconciler(Settings(home=tmp_path, broker_url=None), grace_s=5.0)
    assert Reconciler(Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0"), grace_s=5.0).broker_url == \
        "redis://127.0.0.1:1/0"


def test_task_ids_name_their_job():
    from workers.dispatch import task_id

    assert job_of_task_id(task_id(42)) == 42
    assert job_of_task_id("celery-something") is None and job_of_task_id(None) is None


@pytest.fixture
def embedded_data(w2s_home, tmp_path, cli_runner):
    pool_file, test_file = write_questions(tmp_path / "data", 4, 2)
    weak, strong = write_replay_models(tmp_path / "models", 4, 2, agree=False, delay_s=0.0)
    cli_runner("dataset", "import", pool_file, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", test_file, "--name", "test")
    cli_runner("model", "register", "weak", "--path", weak, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", strong, "--role", "strong")
    return w2s_home


START = ("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool", "--eval", "test",
         "--demonstrations", 0, "--variants", "hybrid", "--no-wait")


def test_round_start_with_a_name_is_idempotent(embedded_data, cli_runner):
    from sqlalchemy import func, select

    from db.schema import Round
    from db.session import session_scope
    from services.settings import load_settings

    first = cli_runner(*START, "--name", "nightly").output
    assert "round 1 started" in first, first
    again = cli_runner(*START, "--name", "nightly").output
    assert "round 1 (nightly) already exists" in again, again
    other = cli_runner(*START, "--name", "nightly", "--seed", 7, ok=False)
    assert other.exit_code == 1 and "round 1 already has that name, with another config" in other.output
    assert len(other.output.strip().splitlines()) == 1, other.output
    with session_scope(load_settings().database_url) as session:
        assert session.scalar(select(func.count()).select_from(Round)) == 1
    assert "round 2 started" in cli_runner(*START, "--name", "nightly-2").output


def _one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def test_unreachable_database_is_one_line(w2s_home, monkeypatch, cli_runner):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("W2S_DATABASE_URL", f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/w2s")
    for command in (("dataset", "list"), ("round", "status", 1), ("model", "list")):
        line = _one_error_line(cli_runner(*command, ok=False))
        assert f"postgres:***@127.0.0.1:{port}/w2s" in line and "s3cret" not in line, line
        assert "is unreachable" in line and "start the database server" in line, line


def test_database_not_created_or_not_migrated_is_one_line(postgres_url, w2s_home, monkeypatch, cli_runner):
    from tests.support import drop_database, fresh_database

    host = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    monkeypatch.setenv("W2S_DATABASE_URL", f"{host}/w2s_never_created")
    line = _one_error_line(cli_runner("dataset", "list", ok=False))
    assert "w2s_never_created" in line and "does not exist" in line and "w2sctl db upgrade" in line, line

    url, name = fresh_database(POSTGRES_ADMIN_URL)  # created, never migrated
    try:
        monkeypatch.setenv("W2S_DATABASE_URL", url)
        line = _one_error_line(cli_runner("round", "list", ok=False))
        assert name in line and "revision none" in line and "w2sctl db upgrade" in line, line
    finally:
        drop_database(POSTGRES_ADMIN_URL, name)


# --- model register: the weights are checked before the model is accepted -----------------------


@pytest.fixture
def weak_copy(tmp_path) -> Path:
    """A checkpoint directory shaped like a small Llama (2 layers, vocabulary 32, hidden size 8),
    written with safetensors' numpy API: the checks read headers only, so no model is needed."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "weak-copy"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32, "hidden_size": 8,
                                                  "num_hidden_layers": 2}))
    (path / "tokenizer.json").write_text("{}")
    tensors = {"model.embed_tokens.weight": np.zeros((32, 8), np.float32), "lm_head.weight": np.zeros((32, 8), np.float32)}
    for layer in range(2):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = np.ones((16, 8), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_register_refuses_a_truncated_safetensors_file(w2s_home, weak_copy, cli_runner):
    weights = weak_copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 1000)  # an interrupted copy
    line = _one_error_line(cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak", ok=False))
    assert str(weak_copy) in line and "model.safetensors" in line and "incomplete or corrupt" in line, line
    assert "weak" not in cli_runner("model", "list").output.split("path", 1)[1]  # nothing registered


def test_register_refuses_weights_of_another_shape(w2s_home, weak_copy, cli_runner):
    import json

    config = json.loads((weak_copy / "config.json").read_text())
    (weak_copy / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 7}))
    line = _one_error_line(cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak", ok=False))
    assert str(weak_copy) in line and "belong to another model" in line, line
    (weak_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    line = _one_error_line(cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak", ok=False))
    assert "layer(s) but config.json says" in line, line


def test_register_checks_a_sharded_checkpoint_against_its_index(w2s_home, weak_copy, cli_runner):
    import json

    from safetensors import safe_open

    with safe_open(weak_copy / "model.safetensors", framework="numpy") as weights:
        names = list(weights.keys())
    index = weak_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**{n: "model.safetensors" for n in names},
                                                                "lm_head.extra": "model-00002-of-00002.safetensors"}}))
    line = _one_error_line(cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak", ok=False))
    assert "model-00002-of-00002.safetensors" in line and "missing" in line, line
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**{n: "model.safetensors" for n in names},
                                                                "lm_head.extra": "model.safetensors"}}))
    line = _one_error_line(cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak", ok=False))
    assert "no shard holds" in line and "lm_head.extra" in line, line
    index.unlink()
    assert "registered weak model" in cli_runner("model", "register", "weak", "--path", weak_copy, "--role", "weak").output


def test_a_model_that_does_not_load_is_named_in_the_job_error(weak_copy):
    from models.backends import CheckpointError
    from workers.steps import load_named

    weights = weak_copy / "model.safetensors"  # registered whole, truncated since (a disk filled up)
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError) as caught:
        load_named("weak-teacher", str(weak_copy))
    message = str(caught.value)
    assert "'weak-teacher' does not load" in message and str(weak_copy) in message and "\n" not in message, message
    assert "model.safetensors" in message and "incomplete or corrupt" in message, message
