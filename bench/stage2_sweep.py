"""Stage II settings against the stage I student they start from, on the demo models.

    python bench/stage2_sweep.py [--scale tiny|full] [--seed 0] [--workdir DIR] [--pool-limit N]
                                 [--eval-limit N] [--only NAME,...] [--out FILE.md] [--home DIR]

One stage I round (iteration 1, the hybrid set, deciding on demo-dev and reporting on demo-test)
trains the student; every stage II setting then starts from that same checkpoint, whatever its
gate said. Settings come as rounds, each a training grid (services/config.py `training.grid`):
one round per loss / LoRA / pair-rule combination, its grid over learning rate, β and epochs
(SWEEP). Rounds of the same pool and seed sample the same answers, so their pairs are the same
unless the pair rules differ.

Printed: a row per setting with its pairs (weak-chosen / weak-rejected), the accuracy of chosen
and rejected responses, mean length of each side (words), the candidate's dev and test accuracy
and the change from the stage I student; then the stage I student's own row. --out writes the
table as Markdown. The tiny scale is for trying the script (minutes); the full scale is the
recorded sweep (hours on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name → the preference round's fields (over BASE_PREFERENCE); each grid setting is one row.
SWEEP: dict[str, dict[str, Any]] = {
    "dpo": {"training": {"loss": "dpo", "grid": {"learning_rate": [1e-5, 5e-5], "beta": [0.1, 0.5], "epochs": [1, 2]}}},
    "orpo": {"training": {"loss": "orpo", "grid": {"learning_rate": [5e-5, 2e-4], "beta": [0.1, 0.5]}}},
    "dpo-lora": {"training": {"loss": "dpo", "lora": {"r": 8, "alpha": 16},
                              "grid": {"learning_rate": [1e-4, 5e-4]}}},
    # Pair mix: tau 1.0 keeps weak-as-rejected pairs only where all samples agree (mostly weak-chosen).
    "dpo-tau1": {"pairs": {"tau": 1.0}, "training": {"loss": "dpo", "grid": {"learning_rate": [5e-5], "beta": [0.1, 0.5]}}},
}
BASE_TRAINING = {"micro_batch_size": 8, "max_seq_len": 128}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("w2s-demo"), help="the demo models are (re)used in WORKDIR/assets")
    parser.add_argument("--pool-limit", type=int, default=None, help="stage I and II pool (default: 200 tiny, all full)")
    parser.add_argument("--eval-limit", type=int, default=None, help="dev and test questions (default: all)")
    parser.add_argument("--only", help="comma-separated SWEEP rounds: " + ", ".join(SWEEP))
    parser.add_argument("--out", type=Path, help="write the table as Markdown here")
    parser.add_argument("--home", type=Path, help="keep the state here (default: a new temporary folder); a home "
                        "whose stage I round is done is reused: its student starts every setting again")
    args = parser.parse_args(argv)
    pool_limit = args.pool_limit or (200 if args.scale == "tiny" else None)

    home = args.home.absolute() if args.home else Path(tempfile.mkdtemp(prefix="w2s-stage2-"))
    os.environ.update({"W2S_HOME": str(home), "W2S_DATABASE_URL": f"sqlite:///{home / 'w2s.sqlite'}",
                       "W2S_CHECKPOINT_DIR": str(home / "checkpoints")})
    os.environ.pop("W2S_BROKER_URL", None)

    from sqlalchemy import select

    from db.schema import Dataset
    from db.session import ensure_schema, session_scope
    from models.demo import build_demo
    from services.config import parse_round_config
    from services.demo import GENERATION, PREFERENCE_TRAINING, SFT_TRAINING
    from services.settings import load_settings
    from workers.dispatch import JobDispatcher

    assets = build_demo(args.workdir.absolute() / "assets", scale=args.scale, seed=args.seed,
                        progress=lambda m: print(f"  {m}", flush=True))
    settings = load_settings()
    url, dispatcher = settings.database_url, JobDispatcher(settings)
    ensure_schema(url)
    with session_scope(url) as session:
        if session.scalar(select(Dataset.id).where(Dataset.name == "demo-pool")) is not None:
            print(f"  reusing the datasets and models registered in {home}")
        else:
            _register(session, assets)
    evals = {"dataset": "demo-dev", "report_on": "demo-test",
             **({"limit": args.eval_limit, "report_limit": args.eval_limit} if args.eval_limit else {})}
    generation = {**GENERATION, "chunk_size": 1000 if args.scale == "full" else 100}

    stage1 = parse_round_config({
        "stage": "sft", "weak": "demo-weak", "strong": "demo-strong", "pool": "demo-pool", "pool_limit": pool_limit,
        "eval": evals, "demonstrations": 0, "variants": ["hybrid"], "seed": args.seed, "generation": generation,
        "training": SFT_TRAINING})
    report1 = _done_stage_one(url) or _run_round(url, dispatcher, settings, stage1, "stage I (iteration 1, hybrid)")
    student = report1["variants"]["hybrid"]
    _keep_as_candidate(url, student["checkpoint"])

    rows = []
    dpo_defaults = {k: v for k, v in PREFERENCE_TRAINING.items() if k not in ("loss", "beta", "learning_rate", "epochs")}
    for name in (args.only.split(",") if args.only else SWEEP):
        fields = SWEEP[name]
        config = parse_round_config({
            "stage": "preference", "student": student["checkpoint"], "weak": "demo-weak", "pool": "demo-pool",
            # pass@k would add a sampled evaluation per setting; the table compares greedy accuracy.
            "pool_limit": pool_limit, "eval": evals, "seed": args.seed, "sampling": {"samples": 10, "pass_at_k": False},
            "generation": {"max_new_tokens": 64, "batch_size": 320, "chunk_size": generation["chunk_size"]},
            **{k: v for k, v in fields.items() if k != "training"},
            "training": {**BASE_TRAINING, **dpo_defaults, **fields["training"]}})
        report = _run_round(url, dispatcher, settings, config, f"stage II {name}")
        lengths = _pair_lengths(url, report["round"])
        for candidate, entry in report["variants"].items():
            rows.append({"round": name, "candidate": candidate, "setting": entry.get("setting") or {},
                         "lora": "lora" in fields["training"], "tau": (fields.get("pairs") or {}).get("tau", 0.8),
                         "pairs": report.get("pairs"), "by_case": report.get("pairs_by_case") or {},
                         "chosen_acc": report.get("chosen_accuracy"), "rejected_acc": report.get("rejected_accuracy"),
                         **lengths, "dev": entry.get("accuracy"), "test": entry.get("report_accuracy"),
                         "skipped": entry.get("skipped")})
        _keep_as_candidate(url, student["checkpoint"])  # a promoted setting must not change the next round's start
        if args.out:  # after every round: a sweep stopped part-way keeps the rows it has
            args.out.write_text(_table(rows, student) + "\n")
    print(_table(rows, student))
    if args.out:
        print(f"wrote {args.out}")
    print(f"state kept in {home}")


def _run_round(url: str, dispatcher, settings, config, title: str) -> dict[str, Any]:
    from db.schema import Round
    from db.session import session_scope
    from services.rounds import start_round

    started = time.perf_counter()
    with session_scope(url) as session:
        round_, job_ids = start_round(session, config, settings.delivery)
        round_id = round_.id
    dispatcher.enqueue(job_ids)
    dispatcher.drain()
    with session_scope(url) as session:
        round_ = session.get(Round, round_id)
        if round_.state != "done":
            raise SystemExit(f"{title}: round {round_id} {round_.state}: {round_.error}")
        report = dict(round_.report)
    print(f"{title}: round {round_id} done in {time.perf_counter() - started:.0f}s — {report.get('reason')}", flush=True)
    return report


def _register(session, assets) -> None:
    from services.registry import import_dataset, register_model

    import_dataset(session, assets.pool, name="demo-pool", task="gsm8k", labelled=False)
    import_dataset(session, assets.dev, name="demo-dev", task="gsm8k", labelled=True)
    import_dataset(session, assets.test, name="demo-test", task="gsm8k", labelled=True)
    register_model(session, name="demo-weak", path=assets.weak_model, role="weak")
    register_model(session, name="demo-strong", path=assets.strong_model, role="strong")


def _done_stage_one(url: str) -> dict[str, Any] | None:
    """The report of a finished stage I round already in this home (--home), if any."""
    from sqlalchemy import select

    from db.schema import Round
    from db.session import session_scope

    with session_scope(url) as session:
        for round_ in session.scalars(select(Round).where(Round.state == "done").order_by(Round.id)):
            if (round_.report or {}).get("stage") == "sft":
                print(f"stage I (iteration 1, hybrid): round {round_.id} reused — {round_.report.get('reason')}", flush=True)
                return dict(round_.report)
    return None


def _keep_as_candidate(url: str, name: str) -> None:
    """Every stage II setting starts from the same stage I checkpoint: a rejected one is put back
    to candidate (stage II refuses a rejected student), a promoted one stays promoted."""
    from sqlalchemy import update

    from db.schema import Checkpoint
    from db.session import session_scope

    with session_scope(url) as session:
        session.execute(update(Checkpoint).where(Checkpoint.name == name, Checkpoint.status == "rejected")
                        .values(status="candidate"))


def _pair_lengths(url: str, round_id: int) -> dict[str, float | None]:
    """Mean words of chosen and rejected responses, and how often the chosen one is longer: DPO
    on pairs whose chosen side is systematically longer or shorter learns length as much as
    correctness."""
    from sqlalchemy import select

    from db.schema import PreferencePair
    from db.session import session_scope

    with session_scope(url) as session:
        pairs = session.execute(select(PreferencePair.chosen, PreferencePair.rejected)
                                .where(PreferencePair.round_id == round_id)).all()
    if not pairs:
        return {"chosen_words": None, "rejected_words": None, "chosen_longer": None}
    chosen = [len(c.split()) for c, _ in pairs]
    rejected = [len(r.split()) for _, r in pairs]
    return {"chosen_words": sum(chosen) / len(pairs), "rejected_words": sum(rejected) / len(pairs),
            "chosen_longer": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _delta(value: float | None, base: float | None) -> str:
    return "—" if value is None or base is None else f"{(value - base) * 100:+.1f}"


def _table(rows: list[dict[str, Any]], student: dict[str, Any]) -> str:
    dev0, test0 = student.get("accuracy"), student.get("report_accuracy")
    lines = ["| setting | loss | LoRA | τ | lr | β | epochs | pairs (weak chosen / rejected) | chosen / rejected right "
             "| words chosen / rejected (chosen longer) | dev | Δ dev | test | Δ test |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["setting"]
        loss = r["candidate"].split("-")[0]
        words = "—" if r["chosen_words"] is None else \
            f"{r['chosen_words']:.1f} / {r['rejected_words']:.1f} ({r['chosen_longer']:.0%})"
        pairs = f"{r['pairs']} ({r['by_case'].get('weak_chosen', 0)} / {r['by_case'].get('weak_rejected', 0)})"
        lines.append(f"| {r['round']}: {r['candidate']} | {loss} | {'yes' if r['lora'] else 'no'} | {r['tau']} "
                     f"| {s.get('learning_rate', '')} | {s.get('beta', '')} | {s.get('epochs', '')} | {pairs} "
                     f"| {_pct(r['chosen_acc'])} / {_pct(r['rejected_acc'])} | {words} "
                     f"| {_pct(r['dev'])} | {_delta(r['dev'], dev0)} | {_pct(r['test'])} | {_delta(r['test'], test0)} |")
    lines.append(f"| stage I student {student['checkpoint']} | — | — | — | — | — | — | — | — | — "
                 f"| {_pct(dev0)} | | {_pct(test0)} | |")
    better = [r for r in rows if r["dev"] is not None and dev0 is not None and r["dev"] > dev0
              and r["test"] is not None and test0 is not None and r["test"] > test0]
    lines.append("")
    lines.append(f"{len(better)} of {len(rows)} settings beat the stage I student on both dev and test"
                 + (": " + ", ".join(r["candidate"] for r in better) if better else "."))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
