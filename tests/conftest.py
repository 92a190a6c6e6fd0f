"""Shared fixtures: an isolated embedded home per test, real PostgreSQL and Redis for integration
tests (they fail, never skip, when a server is down), and the tiny demo models built once."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
POSTGRES_ADMIN_URL = os.environ.get("W2S_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("W2S_TEST_REDIS", "redis://127.0.0.1:6379")
# The tiny demo models are cached across test runs here (the build is idempotent and checked).
DEMO_CACHE = Path(os.environ.get("W2S_TEST_CACHE", REPO / ".w2s-test-cache"))
# Each test folder is a marker of the same name (registered in pyproject.toml), so `-m` selects by
# what a test needs: `make test-fast` runs the folders that need no server and no DeepSpeed launch.
FOLDER_MARKERS = ("unit", "models", "train", "embedded", "cluster", "conformance", "vllm")
TESTS = Path(__file__).resolve().parent
# DeepSpeed compiles a small op on a training launch's first use into TORCH_EXTENSIONS_DIR. The
# Makefile gives each checkout's venv its own; a bare `pytest` would share ~/.cache/torch_extensions
# with every other venv on the machine, and each venv's build replaces the other's (about 50 s of CPU
# per rebuild, paid by whichever launch comes next). Launches and workers inherit this environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# tests/vllm needs vLLM, which lives in its own environment (make venv-vllm / make test-vllm): the
# default install never has it, so there the folder is not collected (nothing imports vLLM).
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]


# The tiny models run many small ops: torch's default of one thread per core spends most of its time
# synchronising threads, and on a shared 2-core machine that measured 3-4x slower (CPU and wall)
# than one thread (tests/models: 25 s against 8 s of CPU). Set in this process only, once torch is
# loaded; subprocesses (training launches, workers) choose their own.
TORCH_THREADS = int(os.environ.get("W2S_TEST_TORCH_THREADS", "1"))


def _limit_torch_threads() -> None:
    torch = sys.modules.get("torch")  # never imported here: tests that need no model stay light
    if torch is not None and hasattr(torch, "get_num_threads") and torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


def pytest_fixture_setup(fixturedef, request):
    _limit_torch_threads()  # a module or session fixture may generate before any test runs


def pytest_runtest_call(item):
    _limit_torch_threads()


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else None
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture
def w2s_home(tmp_path, monkeypatch) -> Path:
    """Embedded mode in a fresh directory: SQLite, in-process tasks."""
    home = tmp_path / "home"
    monkeypatch.setenv("W2S_HOME", str(home))
    for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    from workers import dispatch

    dispatch._local_queue.clear()
    return home


@pytest.fixture
def cli_runner():
    from tests.support import invoke_cli

    return invoke_cli


@pytest.fixture(scope="session")
def demo_assets():
    from models.demo import build_demo

    return build_demo(DEMO_CACHE / "tiny", scale="tiny", seed=0)


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """Tiny Llama, Qwen2, Mistral and Gemma checkpoints with real-shaped tokenizers (tests/real_models.py)."""
    from tests.real_models import build_real_models

    return build_real_models(DEMO_CACHE / "real-models")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh database on the real PostgreSQL server, dropped at the end of the session."""
    from tests.support import drop_database, fresh_database

    url, name = fresh_database(POSTGRES_ADMIN_URL)
    yield url
    drop_database(POSTGRES_ADMIN_URL, name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database number of its own on the real server, flushed before use."""
    import redis

    # W2S_TEST_REDIS_DB lets two test runs on one machine keep their queues apart.
    url = f"{REDIS_URL}/{os.environ.get('W2S_TEST_REDIS_DB', '13')}"
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc} (start it: see .ci/run)")
    return url
