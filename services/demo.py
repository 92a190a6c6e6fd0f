"""The embedded demo: tiny models built here, then a whole stage I round on them, in-process."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

# The demo models cannot learn in context (DEMO-NOTES): the strong voter answers zero-shot.
# Real models keep the reference's K = 4.
DEMO_ROUND: dict[str, Any] = {
    "stage": "sft",
    "iteration": 1,
    "weak": "demo-weak",
    "strong": "demo-strong",
    "pool": "demo-pool",
    "eval": {"dataset": "demo-test"},
    "demonstrations": 0,
    "variants": ["weak", "hybrid"],
    "generation": {"max_new_tokens": 64, "batch_size": 64, "chunk_size": 1000},
    # Measured on the full demo (models/demo.py notes): 2 epochs at 3e-4 with batch 8 lifts the
    # strong model on the test split; larger learning rates or batches did worse.
    "training": {"learning_rate": 3e-4, "epochs": 2, "micro_batch_size": 8, "max_seq_len": 128,
                 "warmup_ratio": 0.03},
}


def demo_round_config(scale: str, seed: int) -> dict[str, Any]:
    config = {**DEMO_ROUND, "seed": seed}
    if scale == "tiny":
        config["generation"] = {**config["generation"], "chunk_size": 100}
        config["variants"] = ["hybrid"]
        config["training"] = {**config["training"], "epochs": 2}
    return config


def run_demo(workdir: Path, *, scale: str, seed: int, console: Console) -> dict[str, Any]:
    """Returns the round report. The demo keeps its own embedded state under `workdir/home`."""
    from models.demo import build_demo

    workdir = workdir.absolute()
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)  # a fresh database each run; the built models are reused
    os.environ.update({"W2S_HOME": str(home), "W2S_DATABASE_URL": f"sqlite:///{home / 'w2s.sqlite'}",
                       "W2S_CHECKPOINT_DIR": str(home / "checkpoints")})
    os.environ.pop("W2S_BROKER_URL", None)

    from db.session import ensure_schema, session_scope
    from services.config import load_settings, parse_round_config
    from services.registry import import_dataset, register_model
    from services.report import job_counts
    from services.rounds import start_round
    from workers.dispatch import drain, enqueue

    started = time.perf_counter()
    console.rule("[bold]w2s demo[/]: weak-to-strong stage I on models built here")
    console.print(f"1. building a tokenizer and two small models ({scale} scale, nothing downloaded) in {workdir / 'assets'}")
    assets = build_demo(workdir / "assets", scale=scale, seed=seed, progress=lambda m: console.print(f"   {m}"))

    settings = load_settings()
    ensure_schema(settings.database_url)
    console.print("2. importing datasets and registering the models")
    with session_scope(settings.database_url) as session:
        import_dataset(session, assets.weak_train, name="demo-weak-train", task="gsm8k", labelled=True)
        import_dataset(session, assets.pool, name="demo-pool", task="gsm8k", labelled=False)
        import_dataset(session, assets.test, name="demo-test", task="gsm8k", labelled=True)
        register_model(session, name="demo-weak", path=assets.weak_model, role="weak")
        register_model(session, name="demo-strong", path=assets.strong_model, role="strong")

    config = parse_round_config(demo_round_config(scale, seed), "demo round")
    console.print("3. stage I round: the weak model and the strong model answer the pool; agreed answers "
                  "train the strong model; the candidate is evaluated and gated")
    with session_scope(settings.database_url) as session:
        round_, job_ids = start_round(session, config)
        round_id = round_.id
    enqueue(job_ids)

    from db.schema import Job, Round

    def show(job_id: int) -> None:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else 0.0
            console.print(f"   {job.key:<22} {job.state:<7} {took:6.1f}s")

    drain(on_job_done=show)

    from services.cli import render_report

    with session_scope(settings.database_url) as session:
        round_ = session.get(Round, round_id)
        report, state, error = round_.report or {}, round_.state, round_.error
        counts = job_counts(session, round_id)
    console.print(f"4. round {round_id} {state} in {time.perf_counter() - started:.0f}s total; jobs: "
                  + ", ".join(f"{step} {sum(c.values())}" for step, c in counts.items()))
    if error:
        console.print(f"[red]error:[/] {error}")
    console.print(render_report(report))
    console.print(f"state kept in {home} — try: W2S_HOME={home} w2sctl round status {round_id}")
    return {"round_id": round_id, "state": state, "report": report}
