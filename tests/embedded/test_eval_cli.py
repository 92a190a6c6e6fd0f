"""`w2sctl eval run / eval compare / solve` on the tiny demo models, embedded; and their bad input."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.schema import Evaluation
from db.session import session_scope
from services.settings import load_settings

FAST = ["--limit", 4, "--shots", 0, "--max-new-tokens", 30, "--batch-size", 4]


@pytest.fixture
def registered(w2s_home, cli_runner, demo_assets):
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    return load_settings().database_url


def _evaluations(url: str) -> dict[str, Evaluation]:
    with session_scope(url) as session:
        rows = session.scalars(select(Evaluation)).all()
        session.expunge_all()
    return {row.strategy: row for row in rows}


def _first_column(table: str) -> str:
    """The words of a printed table's first column, top to bottom (a wrapped cell reads as one line)."""
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    return " ".join(cell for cell in cells if cell)


def test_eval_run_each_strategy_then_compare(registered, cli_runner):
    for strategy in ("cot", "leco"):
        cli_runner("eval", "run", "--model", "strong", "--dataset", "test", "--strategy", strategy, *FAST)
    cli_runner("eval", "run", "--model", "strong", "--dataset", "test", "--strategy", "sc", "--samples", 3, *FAST)

    stored = _evaluations(registered)
    # The labels carry the generation settings: figures at another budget are another measurement.
    cot_label, sc_label, leco_label = "cot/0-shot/30-new", "sc@3/0-shot/30-new/t0.7/p1", "leco/0-shot/30-new/top5/3-rethinks/divert"
    assert set(stored) == {cot_label, sc_label, leco_label}
    for e in stored.values():
        assert e.n_questions == 4 and e.accuracy == e.correct / 4 and e.wall_s > 0 and e.round_id is None
        assert e.output_tokens > 0
    cot, sc, leco = stored[cot_label], stored[sc_label], stored[leco_label]
    assert sc.input_tokens == 3 * cot.input_tokens  # the same prompts, encoded once per sample
    assert cot.input_tokens <= leco.input_tokens <= cot.input_tokens + 4 * 3  # + one token per rethink, 3 at most
    assert leco.output_tokens >= cot.output_tokens  # the original answer is CoT's, then the rethinks

    result = cli_runner("eval", "compare", "--model", "strong", "--dataset", "test")
    column = _first_column(result.output)
    for label in stored:  # the method, then under it its generation settings
        method, settings = label.split("/", 2)[:2], label.split("/", 2)[2]
        assert f"{'/'.join(method)} {settings.replace('/', ' ')}" in column, column
    assert f"{sc.input_tokens:,}" in result.output

    # a new run of the same strategy replaces its figures instead of adding a row
    cli_runner("eval", "run", "--model", "strong", "--dataset", "test", "--strategy", "cot", *FAST)
    assert len(_evaluations(registered)) == 3
    # ... and one at another max_new_tokens is a new row, under its own label, side by side in compare
    cli_runner("eval", "run", "--model", "strong", "--dataset", "test", "--strategy", "cot",
               *FAST[:-4], "--max-new-tokens", 20, "--batch-size", 4)
    assert set(_evaluations(registered)) == {cot_label, sc_label, leco_label, "cot/0-shot/20-new"}
    result = cli_runner("eval", "compare", "--model", "strong", "--dataset", "test")
    assert "cot/0-shot 30-new" in _first_column(result.output) and "cot/0-shot 20-new" in _first_column(result.output)


def test_solve_shows_steps_scores_rethinks_and_the_vote(registered, cli_runner, demo_assets):
    question = demo_assets.test.read_text().splitlines()[2].split('"question": "')[1].split('"')[0]
    result = cli_runner("solve", "--model", "strong", "--shots", 0, "--max-new-tokens", 40, question)
    out = result.output
    for needle in ("original", "avg", "trans", "diver", "score", "<- suspected error", "stopped:", "vote (original 1.5",
                   "final answer:", "input tokens"):
        assert needle in out, out
    result = cli_runner("solve", "--model", demo_assets.strong_model, "--strategy", "sc", "--samples", 2, "--shots", 0,
                        "--max-new-tokens", 20, question)
    assert "sample 2" in result.output and "(majority)" in result.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--strategy", "tot"], 2, "Invalid value for '--strategy': 'tot' is not one of 'cot', 'sc', 'leco'"),
        (["--strategy", "sc", "--samples", 0], 2, "Invalid value for '--samples': 0 is not in the range 1<=x<=256"),
        (["--dataset", "pool"], 1, "dataset 'pool' has no gold answers"),
        (["--dataset", "nope"], 1, "nope"),
        (["--model", "nobody"], 1, "nobody"),
    ],
)
def test_eval_bad_input_is_a_clear_error_and_writes_nothing(registered, cli_runner, args, code, message):
    base = {"--model": "strong", "--dataset": "test"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    result = cli_runner("eval", "run", *argv, *FAST, ok=False)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    with session_scope(registered) as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 0


def test_solve_and_compare_bad_input(registered, cli_runner):
    result = cli_runner("solve", "--model", "strong", "--strategy", "sc", "--samples", 0, "q", ok=False)
    assert result.exit_code == 2 and "--samples" in result.output
    result = cli_runner("eval", "compare", "--model", "strong", "--dataset", "test", ok=False)
    assert result.exit_code == 1 and "no evaluations of 'strong' on 'test'" in result.output


def test_a_prompt_longer_than_the_model_context_is_refused(w2s_home, cli_runner, demo_assets):
    # The tiny models read 256 positions; four step-by-step demonstrations take more than that.
    result = cli_runner("solve", "--model", demo_assets.strong_model, "--shots", 4, "Tom has 3 apples.", ok=False)
    assert result.exit_code == 1
    assert "prompt too long" in result.output and "context of 256 tokens" in result.output and "--shots" in result.output


@pytest.mark.parametrize("strategy", [["--strategy", "cot"], ["--strategy", "sc", "--samples", 3]],
                         ids=["cot", "sc"])
def test_the_gate_and_eval_run_measure_the_same_accuracy(registered, cli_runner, demo_assets, strategy):
    """One evaluation path: a round's gate (its evaluate:baseline job) and `eval run` with the same
    checkpoint, dataset, strategy, prompt and generation budget give the same number, stored under
    one label. A vote threshold above any step score keeps nothing, so the round ends after its gate."""
    from db.schema import Job

    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    sets = ["--set", "generation.max_new_tokens=30", "--set", "generation.batch_size=4", "--set", "vote.min_step_score=2.5"]
    if strategy[1] == "sc":
        sets += ["--set", "eval.strategy.strategy=sc", "--set", "eval.strategy.samples=3"]
    cli_runner("round", "start", "--stage", "sft", "--weak", "weak", "--strong", "strong", "--pool", "pool",
               "--eval", "test", "--pool-limit", 4, "--eval-limit", 12, "--demonstrations", 0, "--variants", "hybrid",
               *sets)
    with session_scope(registered) as session:
        gate = session.scalar(select(Job).where(Job.round_id == 1, Job.key == "evaluate:baseline"))
        assert gate.state == "done" and not gate.result["reused"], gate.result
        gate_accuracy = gate.result["accuracy"]
    label = "cot/0-shot/30-new" if strategy[1] == "cot" else "sc@3/0-shot/30-new/t0.7/p1"
    gated = _evaluations(registered)[label]
    assert gated.round_id == 1 and gated.n_questions == 12 and gated.accuracy == gate_accuracy

    result = cli_runner("eval", "run", "--model", "strong", "--dataset", "test", *strategy, "--shots", 0,
                        "--max-new-tokens", 30, "--batch-size", 4, "--limit", 12)
    stored = _evaluations(registered)
    assert list(stored) == [label]  # one measurement, one row: eval run measured it again and replaced it
    assert stored[label].round_id is None and stored[label].id == gated.id
    assert stored[label].accuracy == gate_accuracy and stored[label].correct == gated.correct
    assert stored[label].output_tokens == gated.output_tokens  # the same answers, token for token
    assert f"{gate_accuracy:.1%}" in result.output
