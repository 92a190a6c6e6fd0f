"""The progressive chain: the pure next-step rule, and a pipeline run embedded on the tiny models."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from services.config import ConfigError
from services.pipeline import PipelineConfig, StepOutcome, next_step, parse_pipeline_config

BASE = {"weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "t"}}


def promoted(step, candidates, winner):
    return StepOutcome(step, "done", "promoted", candidates, winner)


def test_chain_goes_iteration1_iteration2_preference():
    config = PipelineConfig.model_validate(BASE)
    assert config.steps() == ["iteration1", "iteration2", "preference"]
    step, first = next_step(config, [])
    assert step == "iteration1" and first["stage"] == "sft" and first["weak"] == "w" and first["strong"] == "s"
    one = promoted("iteration1", {"weak": "r1-weak", "icl": "r1-icl"}, "r1-icl")
    step, second = next_step(config, [one])
    assert step == "iteration2"
    assert (second["weak"], second["strong"], second["student"]) == ("r1-weak", "r1-icl", "s")
    assert second["variants"] == ["hybrid"] and second["demonstrations"] == 0 and second["iteration"] == 2
    two = promoted("iteration2", {"hybrid": "r2-hybrid"}, "r2-hybrid")
    step, third = next_step(config, [one, two])
    assert step == "preference" and third["student"] == "r2-hybrid" and third["weak"] == "w"
    assert next_step(config, [one, two, promoted("preference", {"dpo": "r3"}, "r3")]) == "every step promoted a checkpoint"


def test_a_rejected_or_failed_round_stops_the_chain():
    config = PipelineConfig.model_validate(BASE)
    rejected = StepOutcome("iteration1", "done", "rejected", {"weak": "a", "icl": "b"}, None)
    assert "iteration1 round rejected" in next_step(config, [rejected])
    assert next_step(config, [StepOutcome("iteration1", "failed", None, {}, None)]) == "iteration1 round failed"


def test_a_chain_can_name_its_iteration2_voters_and_continue_after_a_rejection():
    config = PipelineConfig.model_validate({**BASE, "iteration1": {"variants": ["weak", "hybrid"]},
                                            "iteration2_voters": ["weak", "hybrid"], "after_rejection": "continue"})
    rejected = StepOutcome("iteration1", "done", "rejected", {"weak": "r1-weak", "hybrid": "r1-hybrid"}, None)
    step, second = next_step(config, [rejected])  # a rejected round does not stop this chain
    assert step == "iteration2" and (second["weak"], second["strong"], second["student"]) == ("r1-weak", "r1-hybrid", "s")
    two = StepOutcome("iteration2", "done", "rejected", {"hybrid": "r2-hybrid"}, None)
    assert next_step(config, [rejected, two]) == "no stage I candidate was promoted: stage II needs a promoted student"
    one = promoted("iteration1", {"weak": "r1-weak", "hybrid": "r1-hybrid"}, "r1-hybrid")
    step, third = next_step(config, [one, two])  # stage II from the newest promoted stage I student
    assert step == "preference" and third["student"] == "r1-hybrid"
    assert next_step(config, [one, two, promoted("preference", {"dpo": "r3"}, "r3")]) == "every step ran; rejected: iteration2"
    assert next_step(config, [StepOutcome("iteration1", "failed", None, {}, None)]) == "iteration1 round failed"
    only_hybrid = promoted("iteration1", {"hybrid": "r1-hybrid"}, "r1-hybrid")  # the weak set kept nothing
    assert next_step(config, [only_hybrid]) == "iteration2: iteration1 trained no weak candidate to vote"
    with pytest.raises(ConfigError, match="iteration1's weak and icl variants"):
        parse_pipeline_config({**BASE, "iteration1": {"variants": ["weak", "hybrid"]}})


def test_the_demo_chain_is_a_pipeline_config():
    from services.demo import demo_pipeline_config

    full = parse_pipeline_config(demo_pipeline_config("full", 0))
    assert full.steps() == ["iteration1", "iteration2", "preference"] and full.after_rejection == "continue"
    step, first = next_step(full, [])
    assert first["variants"] == ["weak", "hybrid"] and first["demonstrations"] == 0
    assert first["training"]["learning_rate"] == 3e-4 and first["training"]["max_seq_len"] == 128
    # The gate decides on the dev split; the test split is reported, never decides.
    assert (first["eval"]["dataset"], first["eval"]["report_on"]) == ("demo-dev", "demo-test")
    one = promoted("iteration1", {"weak": "r1-weak", "hybrid": "r1-hybrid"}, "r1-hybrid")
    step, second = next_step(full, [one])
    assert (second["weak"], second["strong"], second["variants"]) == ("r1-weak", "r1-hybrid", ["hybrid"])
    tiny = parse_pipeline_config(demo_pipeline_config("tiny", 0))
    assert tiny.steps() == ["iteration1"] and next_step(tiny, [])[1]["variants"] == ["hybrid"]


def test_weak_sft_feeds_the_promoted_weak_model_downstream():
    config = PipelineConfig.model_validate({**BASE, "weak_sft": {"train": "gold"}, "iteration2": None,
                                            "preference": {"training": {"loss": "orpo"}}})
    assert config.steps() == ["weak-sft", "iteration1", "preference"]
    step, data = next_step(config, [])
    assert step == "weak-sft" and data["train"] == "gold" and data["weak"] == "w"
    ws = promoted("weak-sft", {"gold": "w-ft"}, "w-ft")
    step, data = next_step(config, [ws])
    assert step == "iteration1" and data["weak"] == "w-ft"
    step, data = next_step(config, [ws, promoted("iteration1", {"weak": "x", "icl": "y"}, "y")])
    assert step == "preference" and data["weak"] == "w-ft" and data["student"] == "y" and data["training"]["loss"] == "orpo"


def test_config_errors_name_the_step_and_field():
    with pytest.raises(ConfigError, match="iteration2: the two fine-tuned students"):
        parse_pipeline_config({**BASE, "iteration1": {"variants": ["hybrid"]}})
    with pytest.raises(ConfigError, match="iteration1.*demonstrations"):
        parse_pipeline_config({**BASE, "iteration1": {"demonstrations": -1}})
    with pytest.raises(ConfigError, match="colour: unknown field"):
        parse_pipeline_config({**BASE, "colour": "red"})


def test_pipeline_embedded(w2s_home, cli_runner, demo_assets, tmp_path):
    """Runs until the chain ends; every round records its parent, and the chain stops exactly at
    the first round that was not promoted."""
    from db.schema import Checkpoint, Round
    from db.session import session_scope
    from services.settings import load_settings

    cli_runner("dataset", "import", demo_assets.pool, "--name", "pool", "--unlabelled")
    cli_runner("dataset", "import", demo_assets.test, "--name", "test")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    cli_runner("model", "register", "strong", "--path", demo_assets.strong_model, "--role", "strong")
    small = {"generation": {"max_new_tokens": 48}, "training": {"epochs": 1, "max_seq_len": 128, "learning_rate": 1e-4}}
    config = {"weak": "weak", "strong": "strong", "pool": "pool", "eval": {"dataset": "test", "limit": 40},
              "iteration1": {"pool_limit": 60, "demonstrations": 0, **small},
              "iteration2": {"pool_limit": 60, **small},
              "preference": {"pool_limit": 30, "sampling": {"samples": 4, "temperature": 0.7},
                             "pairs": {"floor": 0.5, "tau": 0.75}, **small}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    cli_runner("pipeline", "start", "--config", path)
    status = json.loads(cli_runner("pipeline", "status", "1", "--json").output)
    assert status["state"] in ("done", "stopped"), status
    rounds = status["rounds"]
    assert [r["step"] for r in rounds] == status["steps"][: len(rounds)]
    for r in rounds[:-1]:
        assert r["outcome"] == "promoted"
    if status["state"] == "stopped":
        assert rounds[-1]["outcome"] != "promoted" and "rejected" in status["reason"]
    with session_scope(load_settings().database_url) as session:
        for r in rounds:
            round_ = session.get(Round, r["round"])
            assert round_.pipeline_id == 1
            for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.round_id == round_.id)):
                assert checkpoint.parent_id == round_.resolved["student_id"]
