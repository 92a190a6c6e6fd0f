"""The embedded demo: tiny models built here, then the whole chain on them, in-process:
stage I iteration 1 → stage I iteration 2 → stage II (DPO), each round gated."""

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
    """Returns every round's report. The demo keeps its own embedded state under `workdir/home`."""
    from models.demo import build_demo

    workdir = workdir.absolute()
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)  # a fresh database each run; the built models are reused
    os.environ.update({"W2S_HOME": str(home), "W2S_DATABASE_URL": f"sqlite:///{home / 'w2s.sqlite'}",
                       "W2S_CHECKPOINT_DIR": str(home / "checkpoints")})
    os.environ.pop("W2S_BROKER_URL", None)

    from db.session import ensure_schema, session_scope
    from services.config import load_settings
    from services.registry import import_dataset, register_model

    started = time.perf_counter()
    console.rule("[bold]w2s demo[/]: weak-to-strong reasoning on models built here")
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

    reports = []
    # Stage I, iteration 1: the weak model and the strong model vote.
    console.print("3. stage I, iteration 1: the weak and the strong model answer the pool; agreed answers "
                  "train the strong model; each candidate is evaluated and gated")
    first = _run_round(settings.database_url, demo_round_config(scale, seed), console)
    reports.append(first)
    candidates = {v: e.get("checkpoint") for v, e in first["report"].get("variants", {}).items()}
    # Stage I, iteration 2: the two fine-tuned students vote; hybrid training restarts from the base.
    if candidates.get("weak") and candidates.get("hybrid") and first["state"] == "done":
        console.print("4. stage I, iteration 2: the two fine-tuned students answer the pool and vote")
        second = _run_round(settings.database_url, {
            **demo_round_config(scale, seed), "iteration": 2, "weak": candidates["weak"],
            "strong": candidates["hybrid"], "student": "demo-strong", "variants": ["hybrid"]}, console)
        reports.append(second)
        # Stage II starts from the best student so far: M_plus if the gate promoted it.
        m_plus = _current_student(settings.database_url, "demo-strong")
        if m_plus == "demo-strong":
            console.print("   no stage I candidate was promoted: stage II needs a promoted student, the chain stops here")
        else:
            console.print(f"5. stage II: {m_plus} samples answers; confident majorities pair against the weak "
                          "model's stage I responses; DPO")
            reports.append(_run_round(settings.database_url, demo_preference_config(scale, seed, m_plus), console))

    console.rule("the chain")
    for entry in reports:
        report = entry["report"]
        name = f"round {entry['round_id']} {report.get('stage')} iteration {report.get('iteration')}"
        console.print(f"[bold]{name}[/]: {entry['state']}" + (f" — {report.get('reason')}" if report.get("reason") else ""))
    console.print(f"{time.perf_counter() - started:.0f}s in all; state kept in {home} — try: "
                  f"W2S_HOME={home} w2sctl round list")
    return {"rounds": reports}


def _current_student(database_url: str, base: str) -> str:
    from db.session import session_scope
    from services.registry import current_student, get_checkpoint

    with session_scope(database_url) as session:
        return current_student(session, get_checkpoint(session, base)).name


def demo_preference_config(scale: str, seed: int, student: str) -> dict[str, Any]:
    return {"stage": "preference", "student": student, "weak": "demo-weak", "pool": "demo-pool",
            "eval": {"dataset": "demo-test"}, "seed": seed,
            "sampling": {"samples": 10},
            "generation": {"max_new_tokens": 64, "batch_size": 320, "chunk_size": 1000 if scale == "full" else 100},
            # TRL's DPO default (1e-6) does not move a model this small in one epoch.
            "training": {"loss": "dpo", "beta": 0.1, "learning_rate": 5e-5, "epochs": 1, "micro_batch_size": 8,
                         "max_seq_len": 128}}


def _run_round(database_url: str, config_data: dict[str, Any], console: Console) -> dict[str, Any]:
    from db.schema import Job, Round
    from db.session import session_scope
    from cli.render import render_report
    from services.config import parse_round_config
    from services.report import job_counts
    from services.rounds import start_round
    from workers.dispatch import drain, enqueue

    config = parse_round_config(config_data, "demo round")
    with session_scope(database_url) as session:
        round_, job_ids = start_round(session, config)
        round_id = round_.id
    enqueue(job_ids)

    def show(job_id: int) -> None:
        with session_scope(database_url) as session:
            job = session.get(Job, job_id)
            took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else 0.0
            console.print(f"   {job.key:<22} {job.state:<7} {took:6.1f}s")

    drain(on_job_done=show)
    with session_scope(database_url) as session:
        round_ = session.get(Round, round_id)
        report, state, error = round_.report or {}, round_.state, round_.error
        counts = job_counts(session, round_id)
    console.print(f"   round {round_id} {state}; jobs: " + ", ".join(f"{step} {sum(c.values())}" for step, c in counts.items()))
    if error:
        console.print(f"[red]error:[/] {error}")
    console.print(render_report(report))
    return {"round_id": round_id, "state": state, "report": report}
