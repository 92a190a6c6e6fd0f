"""Model loads during a stage I round: must be one per model per worker process.

    python bench/round_loads.py [--scale tiny|full] [--workdir DIR]

Runs a demo round embedded (one process plays every worker) and prints how many times a
checkpoint was loaded from disk against how many distinct checkpoints the round used, plus the
wall time of each step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path("w2s-demo"), help="where the demo models are (re)used")
    parser.add_argument("--pool-limit", type=int, default=None)
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="w2s-bench-"))
    os.environ.update({"W2S_HOME": str(home), "W2S_DATABASE_URL": f"sqlite:///{home / 'w2s.sqlite'}",
                       "W2S_CHECKPOINT_DIR": str(home / "checkpoints")})
    os.environ.pop("W2S_BROKER_URL", None)

    from sqlalchemy import select

    from db.schema import Generation, Job
    from db.session import ensure_schema, session_scope
    from models.backends import default_cache
    from models.demo import build_demo
    from services.config import parse_round_config
    from services.demo import demo_round_config
    from services.registry import import_dataset, register_model
    from services.rounds import start_round
    from services.settings import load_settings
    from workers.dispatch import JobDispatcher

    assets = build_demo(args.workdir.absolute() / "assets", scale=args.scale, seed=0)
    settings = load_settings()
    url, dispatcher = settings.database_url, JobDispatcher(settings)
    ensure_schema(url)
    with session_scope(url) as session:
        import_dataset(session, assets.pool, name="demo-pool", task="gsm8k", labelled=False)
        import_dataset(session, assets.dev, name="demo-dev", task="gsm8k", labelled=True)
        import_dataset(session, assets.test, name="demo-test", task="gsm8k", labelled=True)
        register_model(session, name="demo-weak", path=assets.weak_model, role="weak")
        register_model(session, name="demo-strong", path=assets.strong_model, role="strong")
    config = demo_round_config(args.scale, 0)
    if args.pool_limit:
        config["pool_limit"] = args.pool_limit
    with session_scope(url) as session:
        round_, job_ids = start_round(session, parse_round_config(config), settings.delivery)
        round_id = round_.id
    dispatcher.enqueue(job_ids)
    started = time.perf_counter()
    dispatcher.drain()
    wall = time.perf_counter() - started

    with session_scope(url) as session:
        jobs = session.scalars(select(Job).where(Job.round_id == round_id)).all()
        used = {job.payload["checkpoint_id"] for job in jobs if job.kind == "evaluate"}
        used |= set(session.scalars(select(Generation.checkpoint_id).where(Generation.round_id == round_id)))
        per_step = defaultdict(float)
        for job in jobs:
            if job.started_at and job.finished_at:
                per_step[job.step] += (job.finished_at - job.started_at).total_seconds()
    loads = default_cache().loads
    print(f"round {round_id}: {len(jobs)} jobs in {wall:.1f}s")
    for step, seconds in per_step.items():
        print(f"  {step:<16} {seconds:7.1f}s")
    print(f"distinct checkpoints used: {len(used)}")
    print(f"model loads:               {loads}  ({'one per model' if loads == len(used) else 'MORE THAN ONE PER MODEL'})")


if __name__ == "__main__":
    main()
