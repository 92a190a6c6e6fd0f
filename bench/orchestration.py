"""What the orchestration costs: stage I generation over the 7,000-question GSM8K pool, with a
model-free backend that replays the recorded weak outputs (models/backends/replay.py), so every second
measured is the service's own (claims, heartbeats, database writes, the broker, worker processes).

    python bench/orchestration.py [--questions 7000] [--workers 1 2] [--redis URL] [--postgres URL]

Four ways of doing the same work (every pool question answered by the weak and the strong voter,
answers extracted, 14,000 generations):

- compute: replay + clean + answer extraction in a loop, no database, no broker (the floor);
- in-process: the round's generation jobs run one after another in this process through the job
  runner (claim, heartbeat, fenced writes to PostgreSQL), no Celery;
- N workers: the round planned and sent as `w2sctl round start` does → Redis → N `w2sctl worker --role weak,strong` processes →
  PostgreSQL, timed from the planning until every generation job is done.

Orchestration overhead per question = (wall time − compute wall time) / questions.
Needs the real PostgreSQL and Redis (the test servers: 127.0.0.1:5432 and :6379).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
POOL = SHARED / "gsm8k" / "train_2.jsonl"
WEAK_OUTPUTS = SHARED / "reference" / "weak_outputs" / "gsm8k_train_2.llama2_7b.jsonl"
W2SCTL = [sys.executable, "-m", "cli"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=7000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--redis", default=f"redis://127.0.0.1:6379/{os.environ.get('W2S_TEST_REDIS_DB', '15')}")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args(argv)
    for path in (POOL, WEAK_OUTPUTS):
        if not path.is_file():
            sys.exit(f"missing {path} (../shared/data beside the repository)")

    import psycopg
    import redis

    work = Path(tempfile.mkdtemp(prefix="w2s-bench-orch-"))
    db_name = f"w2s_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    url = args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{db_name}"
    redis.Redis.from_url(args.redis).flushdb()
    env = {"W2S_DATABASE_URL": url, "W2S_BROKER_URL": args.redis, "W2S_HOME": str(work / "home"),
           "W2S_CHECKPOINT_DIR": str(work / "checkpoints"), "W2S_WATCHDOG_S": "0"}
    os.environ.update(env)
    try:
        setup(work, args.questions)
        n = args.questions
        results = {"compute": compute_only(work, n)}
        results["in-process"] = in_process(n)
        for count in args.workers:
            results[f"{count} worker{'s' if count > 1 else ''}"] = distributed(work, count, n, env)
    finally:
        from db.session import dispose_engines

        dispose_engines()
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    floor = results["compute"]["wall_s"]
    print(f"\nstage I generation, {n} questions x 2 voters (replayed weak outputs), chunk 256, "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':<12} {'wall s':>8} {'questions/s':>12} {'overhead ms/question':>21} {'jobs':>5}")
    for name, r in results.items():
        overhead = (r["wall_s"] - floor) / n * 1000
        print(f"{name:<12} {r['wall_s']:>8.2f} {n / r['wall_s']:>12.1f} {overhead:>21.3f} {r.get('jobs', '-'):>5}")


def setup(work: Path, questions: int) -> None:
    from db.session import session_scope, upgrade
    from models.backends.replay import write_replay
    from services.registry import import_dataset, register_model

    records = [json.loads(line) for line in WEAK_OUTPUTS.read_text().splitlines() if line.strip()]
    replay = write_replay(work / "replay-weak", records)
    pool = work / "pool.jsonl"
    pool.write_text("".join(line + "\n" for line in POOL.read_text().splitlines()[:questions]))
    # The promotion gate's eval set must be labelled and differ from the pool: ten pool questions
    # with their gold answers (the replay knows them); the bench stops before it matters.
    evaluation = work / "eval.jsonl"
    evaluation.write_text("".join(line + "\n" for line in POOL.read_text().splitlines()[:10]))
    upgrade(os.environ["W2S_DATABASE_URL"])
    with session_scope(os.environ["W2S_DATABASE_URL"]) as session:
        import_dataset(session, pool, name="pool", task="gsm8k", labelled=False)
        import_dataset(session, evaluation, name="eval", task="gsm8k", labelled=True)
        register_model(session, name="weak", path=replay, role="weak")
        register_model(session, name="strong", path=replay, role="strong")


ROUND = {"stage": "sft", "weak": "weak", "strong": "strong", "pool": "pool", "eval": {"dataset": "eval", "limit": 10},
         "demonstrations": 0, "variants": ["weak"]}


def compute_only(work: Path, n: int) -> dict:
    from models.answers import extract_answer
    from models.backends import load_backend
    from models.generation import generate
    from models.prompts import clean_response, zero_shot

    questions = [json.loads(line)["question"] for line in POOL.read_text().splitlines()[:n]]
    start = time.perf_counter()
    loaded = load_backend(work / "replay-weak")
    for _voter in ("weak", "strong"):
        for completions in generate(loaded, [zero_shot(q) for q in questions], max_new_tokens=1024):
            text = clean_response(completions[0].text)
            extract_answer(text, "gsm8k")
    return {"wall_s": time.perf_counter() - start}


def in_process(n: int) -> dict:
    from sqlalchemy import select

    from db.schema import Job
    from db.session import session_scope
    from services.config import parse_round_config
    from services.rounds import cancel_round, start_round
    from services.settings import load_settings
    from workers.runner import run_job
    from workers.steps import run_generate

    settings = load_settings()
    url = settings.database_url
    start = time.perf_counter()
    with session_scope(url) as session:
        round_, _ = start_round(session, parse_round_config({**ROUND, "pool_limit": n}), settings.delivery)
        round_id = round_.id
        jobs = list(session.scalars(select(Job.id).where(Job.round_id == round_id, Job.kind == "generate")))
    for job_id in jobs:
        assert run_job(job_id, run_generate, settings=settings, enqueue=lambda *a, **k: None) == "done"
    wall = time.perf_counter() - start
    with session_scope(url) as session:
        cancel_round(session, round_id, settings.delivery, "benchmark: generation measured")
    return {"wall_s": wall, "jobs": len(jobs)}


def distributed(work: Path, count: int, n: int, env: dict) -> dict:
    from sqlalchemy import func, select

    from db.schema import Job
    from db.session import session_scope
    from services.config import parse_round_config
    from services.rounds import cancel_round, start_round
    from services.settings import load_settings
    from workers.dispatch import JobDispatcher

    settings = load_settings({**os.environ, **env})
    url, enqueue = settings.database_url, JobDispatcher(settings).enqueue
    logs, workers = [], []
    for i in range(count):
        log = work / f"worker{count}-{i}.log"
        logs.append(log)
        workers.append(subprocess.Popen([*W2SCTL, "worker", "--role", "weak,strong", "--hostname", f"bench{i}@%h",
                                         "--loglevel", "warning"],
                                        env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=REPO))
    try:
        wait_ready(count)
        start = time.perf_counter()
        # What `w2sctl round start` does, minus the interpreter's start-up: plan, commit, send.
        with session_scope(url) as session:
            round_, job_ids = start_round(session, parse_round_config({**ROUND, "pool_limit": n}), settings.delivery)
            round_id = round_.id
        enqueue(job_ids)
        while True:
            with session_scope(url) as session:
                states = dict(session.execute(select(Job.state, func.count()).where(
                    Job.round_id == round_id, Job.kind == "generate").group_by(Job.state)).all())
            if set(states) == {"done"}:
                break
            if "failed" in states:
                sys.exit(f"a generation job failed; see {logs}")
            time.sleep(0.05)
        wall = time.perf_counter() - start
        with session_scope(url) as session:
            cancel_round(session, round_id, settings.delivery, "benchmark: generation measured")
        return {"wall_s": wall, "jobs": sum(states.values())}
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def wait_ready(count: int) -> None:
    """Until `count` workers answer a ping: their start-up is not part of the figures."""
    from workers.app import app

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return
    sys.exit("workers did not start within 120 s")


if __name__ == "__main__":
    main()
