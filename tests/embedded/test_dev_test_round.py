"""Decide on dev, report on test, with a training grid: a weak-sft round on the tiny demo models,
embedded (SQLite, in-process jobs). Its gold answers make it the cheapest round that trains, and
the suite's one weak-sft round: it also shows what that stage trains (the weak model, on gold)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

from db.session import session_scope
from services.settings import load_settings
from tests.support import invoke_cli

GRID = "training.grid={learning_rate: [0.0001, 0.003]}"  # YAML: 1e-4 would be read as a string
CANDIDATES = ["gold-lr1e-4", "gold-lr3e-3"]
TRAIN_LIMIT = 120


@pytest.fixture(scope="module")
def grid_round(tmp_path_factory, demo_assets):
    """One weak-sft round with a two-setting grid, deciding on test-dev and reporting on test-test."""
    from workers import dispatch

    home = tmp_path_factory.mktemp("devtest") / "home"
    with pytest.MonkeyPatch.context() as patch:
        _env(patch, home)
        dispatch._local_queue.clear()
        invoke_cli("dataset", "import", demo_assets.weak_train, "--name", "weak-train")
        invoke_cli("dataset", "import", demo_assets.test, "--name", "test")
        split = invoke_cli("dataset", "split", "test", "--dev", 40, "--seed", 0)
        invoke_cli("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
        started = invoke_cli("round", "start", "--stage", "weak-sft", "--weak", "weak", "--train", "weak-train",
                             "--train-limit", TRAIN_LIMIT, "--eval", "test-dev", "--report-on", "test-test",
                             "--set", "eval.report_limit=40", "--set", "generation.max_new_tokens=48",
                             "--set", "training.epochs=1", "--set", "training.max_seq_len=128", "--set", GRID)
        yield {"home": home, "split": split.output, "started": started.output}


def _env(patch: pytest.MonkeyPatch, home) -> None:
    patch.setenv("W2S_HOME", str(home))
    for var in ("W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR", "W2S_TRACKING_URI", "W2S_TRACKING_BACKEND"):
        patch.delenv(var, raising=False)


@pytest.fixture
def in_home(grid_round, monkeypatch):
    _env(monkeypatch, grid_round["home"])
    return grid_round


def test_dataset_split_makes_disjoint_dev_and_test_sets(in_home):
    from db.schema import Dataset, Question

    assert "'test-dev' 40 questions (decides), 'test-test' 60 questions (reported)" in " ".join(in_home["split"].split())
    with session_scope(load_settings().database_url) as session:
        texts = {}
        for name in ("test", "test-dev", "test-test"):
            dataset = session.scalar(select(Dataset).where(Dataset.name == name))
            texts[name] = session.scalars(select(Question.text).where(Question.dataset_id == dataset.id)
                                          .order_by(Question.index)).all()
    assert not set(texts["test-dev"]) & set(texts["test-test"])
    assert sorted(texts["test-dev"] + texts["test-test"]) == sorted(texts["test"])
    # Both keep the source's order.
    position = {text: i for i, text in enumerate(texts["test"])}
    assert [position[t] for t in texts["test-dev"]] == sorted(position[t] for t in texts["test-dev"])
    result = invoke_cli("dataset", "split", "test", "--dev", 40, ok=False)
    assert result.exit_code != 0 and "a dataset named 'test-dev' already exists" in " ".join(result.output.split())


def test_a_grid_round_trains_one_candidate_per_setting_and_promotes_the_best_on_dev(in_home, cli_runner):
    from db.schema import Checkpoint, Dataset, Evaluation, Job, Round, TrainingExample

    url = load_settings().database_url
    with session_scope(url) as session:
        round_ = session.get(Round, 1)
        assert round_.state == "done", round_.error
        keys = {job.key: job for job in session.scalars(select(Job).where(Job.round_id == 1))}
        assert {k for k in keys if k.startswith("train:")} == {f"train:{c}" for c in CANDIDATES}
        assert keys["train:gold-lr3e-3"].payload == {"variant": "gold", "setting": {"learning_rate": 0.003}}
        for subject in [*CANDIDATES, "baseline"]:
            assert keys[f"evaluate:{subject}"].state == keys[f"evaluate:report-on:{subject}"].state == "done"
        dev, test = (session.scalar(select(Dataset.id).where(Dataset.name == n)) for n in ("test-dev", "test-test"))
        candidates = {c.name: c for c in session.scalars(select(Checkpoint).where(Checkpoint.round_id == 1))}
        assert sorted(candidates) == [f"round1-{c}" for c in CANDIDATES]
        # The job file each launch read carried its own setting.
        for name, checkpoint in candidates.items():
            assert checkpoint.metrics["setting"] == {"learning_rate": 0.0001 if name.endswith("1e-4") else 0.003}
            # weak-sft trains the weak model on gold: its candidates are weak models, children of the student.
            assert checkpoint.role == "weak" and checkpoint.parent_id == round_.resolved["student_id"]
        examples = session.scalars(select(TrainingExample).where(TrainingExample.round_id == 1)).all()
        assert len(examples) == TRAIN_LIMIT and all(e.variant == "gold" and e.generation_id is None for e in examples)
        accuracy = {(e.checkpoint_id, e.dataset_id): e.accuracy for e in session.scalars(select(Evaluation))}
        on_dev = {name: accuracy[(c.id, dev)] for name, c in candidates.items()}
        baseline_dev = accuracy[(round_.resolved["baseline_id"], dev)]
        best = max(on_dev, key=lambda n: (on_dev[n], -sorted(candidates).index(n)))
        expected = best if on_dev[best] > baseline_dev else None
        promoted = [name for name, c in candidates.items() if c.status == "promoted"]
        assert promoted == ([expected] if expected else []) and round_.outcome == ("promoted" if expected else "rejected")
        assert all((c.id, test) in accuracy for c in candidates.values())
        report = round_.report
    assert report["decided_on"] == "test-dev" and report["report_on"] == "test-test"
    for subject in CANDIDATES:
        entry = report["variants"][subject]
        assert entry["setting"]["learning_rate"] in (0.0001, 0.003)
        assert entry["accuracy"] == on_dev[f"round1-{subject}"]
        assert entry["report_accuracy"] == accuracy[(candidates[f"round1-{subject}"].id, test)]
    assert report["reason"].startswith("on test-dev: ")
    assert "report" in cli_runner("round", "status", "1").output
    shown = _rendered(report)
    assert "decided on test-dev; reported on test-test (never decides)" in shown
    for subject in CANDIDATES:
        entry = report["variants"][subject]
        line = next(line for line in shown.splitlines() if f"candidate {subject} " in line)
        assert f"learning_rate={entry['setting']['learning_rate']}" in line
        assert f"{entry['accuracy']:.1%} / {entry['report_accuracy']:.1%}" in line


def _rendered(report: dict) -> str:
    from rich.console import Console

    from cli.render import render_report

    console = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_report(report))
    return console.export_text()


@pytest.mark.parametrize("figures, promoted", [
    # candidate better on test, worse on dev than the student: rejected
    ({"baseline": (0.30, 0.30), "gold-lr1e-4": (0.20, 0.95), "gold-lr3e-3": (0.25, 0.90)}, None),
    # the best on dev is the worst on test: it is the one promoted
    ({"baseline": (0.30, 0.30), "gold-lr1e-4": (0.35, 0.99), "gold-lr3e-3": (0.50, 0.05)}, "round1-gold-lr3e-3"),
])
def test_the_report_on_split_never_decides(in_home, figures, promoted):
    """The round's promote step run again over constructed evaluation figures where dev and test disagree."""
    from db.schema import Checkpoint, Job, Round
    from workers.runner import run_job
    from workers.steps import HANDLERS

    url = load_settings().database_url
    with session_scope(url) as session:
        for subject, (dev, test) in figures.items():
            for key, value in ((f"evaluate:{subject}", dev), (f"evaluate:report-on:{subject}", test)):
                job = session.scalar(select(Job).where(Job.round_id == 1, Job.key == key))
                job.result = {**job.result, "accuracy": value}
        promote_id = session.scalar(select(Job.id).where(Job.round_id == 1, Job.key == "promote"))
        session.execute(update(Job).where(Job.id == promote_id).values(state="queued", attempts=0, result=None))
        session.execute(update(Checkpoint).where(Checkpoint.round_id == 1).values(status="candidate", promoted_at=None))
        session.execute(update(Round).where(Round.id == 1).values(state="running", outcome=None))
    assert run_job(promote_id, HANDLERS["promote"], settings=load_settings(), enqueue=lambda ids, **kw: None) == "done"
    with session_scope(url) as session:
        statuses = {c.name: c.status for c in session.scalars(select(Checkpoint).where(Checkpoint.round_id == 1))}
        round_ = session.get(Round, 1)
        assert [n for n, s in statuses.items() if s == "promoted"] == ([promoted] if promoted else [])
        assert round_.outcome == ("promoted" if promoted else "rejected")
        result = session.get(Job, promote_id).result
    assert result["decided_on"] == "test-dev" and result["report_on"] == "test-test"
    assert result["candidates_report"] == {f"round1-{s}": t for s, (_, t) in figures.items() if s != "baseline"}
    assert json.dumps(round_.report["variants"]["gold-lr1e-4"]["report_accuracy"]) == json.dumps(figures["gold-lr1e-4"][1])
