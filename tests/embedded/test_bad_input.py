"""Every bad input: one clear message naming what and where, a non-zero exit, nothing written."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from db.schema import Base


def table_counts() -> dict[str, int]:
    from db.session import ensure_schema, session_scope
    from services.settings import load_settings

    url = load_settings().database_url
    ensure_schema(url)
    with session_scope(url) as session:
        return {t.name: session.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


@pytest.fixture
def registered(w2s_home, cli_runner, demo_assets):
    """A database with a pool, a test set and two models, as a user would have it."""
    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    return table_counts()


def fails_with(cli_runner, args, *fragments):
    before = table_counts()
    result = cli_runner(*args, ok=False)
    assert result.exit_code != 0, result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"
    assert "Traceback" not in result.output
    assert table_counts() == before, "a failed command wrote to the database"
    return result


def test_malformed_jsonl_line_names_file_and_line(w2s_home, cli_runner, tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n" + json.dumps({"question": "b?", "answer": "2"})
                    + "\n{\"question\": \"c?\", \"answer\": \n")
    fails_with(cli_runner, ["dataset", "import", path, "--name", "broken"], f"{path}:3", "malformed JSON")


def test_missing_field_names_line_and_field(w2s_home, cli_runner, tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n" + json.dumps({"prompt": "b?"}) + "\n")
    fails_with(cli_runner, ["dataset", "import", path, "--name", "broken"], f"{path}:2", "missing field 'question'")


def test_labelled_import_without_gold_is_refused(w2s_home, cli_runner, tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "a?"}) + "\n")
    fails_with(cli_runner, ["dataset", "import", path, "--name", "nogold"], "no gold answer", "--unlabelled")


def test_model_path_that_is_not_a_checkpoint(w2s_home, cli_runner, tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with(cli_runner, ["model", "register", "m", "--path", tmp_path / "empty", "--role", "weak"],
               str(tmp_path / "empty"), "config.json")
    fails_with(cli_runner, ["model", "register", "m", "--path", tmp_path / "missing", "--role", "weak"],
               str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--pool", "nope"], ["unknown dataset 'nope'"]),
        (["--weak", "nobody"], ["unknown model 'nobody'"]),
        (["--set", "promotion.min_improvement=1.5"], ["promotion.min_improvement", "less than or equal to 1"]),
        (["--demonstrations", "-1"], ["demonstrations", "greater than or equal to 0"]),
        (["--variants", "weak,bogus"], ["variants"]),
        (["--set", "training.learnin_rate=0.1"], ["training.learnin_rate", "unknown field"]),
        (["--eval", "pool"], ["eval.dataset 'pool' has no gold answers"]),
    ],
)
def test_round_start_bad_config(registered, cli_runner, flags, fragments):
    base = {"--stage": "sft", "--weak": "weak", "--strong": "strong", "--pool": "pool", "--eval": "test"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    args = ["round", "start"] + [x for pair in base.items() for x in pair]
    fails_with(cli_runner, args, *fragments)


def test_round_config_file_errors_name_the_file(registered, cli_runner, tmp_path):
    path = tmp_path / "round.yaml"
    path.write_text("stage: sft\nweak: weak\nstrong: strong\npool: pool\neval: {dataset: test}\ngeneration: {batch_size: 0}\n")
    fails_with(cli_runner, ["round", "start", "--config", path], str(path), "generation.batch_size")
    path.write_text("stage: sft\n  weak: [\n")
    fails_with(cli_runner, ["round", "start", "--config", path], str(path), "not valid YAML")


def test_unknown_round_id(w2s_home, cli_runner):
    fails_with(cli_runner, ["round", "status", "99"], "round 99 does not exist")
    fails_with(cli_runner, ["jobs", "--round", "99"], "round 99 does not exist")
    fails_with(cli_runner, ["round", "resume", "99"], "round 99 does not exist")
