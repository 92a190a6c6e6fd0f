"""The pure rules: the stage I vote, the promotion gate, the round config."""

from __future__ import annotations

import pytest

from services.config import ConfigError, parse_round_config
from services.promotion import gate
from services.selection import Vote, accuracy, agreed, stage1_vote, variant_sources
from services.settings import load_settings


def test_vote_keeps_non_empty_equivalent_answers():
    votes = [Vote(1, "72", "72"), Vote(2, "72", "72.0"), Vote(3, "5", "6"), Vote(4, "", ""), Vote(5, "3", ""),
             Vote(6, "1,000", "1000")]
    assert stage1_vote(votes, "gsm8k") == [1, 2, 6]


def test_vote_uses_math_equivalence():
    assert agreed(Vote(1, "\\frac{1}{2}", "0.5"), "math")
    assert not agreed(Vote(1, "\\frac{1}{3}", "0.5"), "math")


def test_variant_sources():
    assert variant_sources("weak") == ("first",)
    assert variant_sources("icl") == ("second",)
    assert variant_sources("hybrid") == ("first", "second")


def test_accuracy_ignores_questions_without_gold():
    assert accuracy({1: "3", 2: "4", 3: "5"}, {1: "3", 2: "5", 3: None}, "gsm8k") == 0.5
    assert accuracy({1: "3"}, {1: None}, "gsm8k") is None


def test_gate_promotes_only_a_strictly_better_candidate():
    assert gate("base", 0.40, {"a": 0.45, "b": 0.42}).promoted == "a"
    assert gate("base", 0.40, {"a": 0.40}).promoted is None
    assert gate("base", 0.40, {"a": 0.39}).promoted is None
    assert gate("base", 0.40, {}).promoted is None
    # a margin to clear
    assert gate("base", 0.40, {"a": 0.42}, min_improvement=0.05).promoted is None
    assert gate("base", 0.40, {"a": 0.46}, min_improvement=0.05).promoted == "a"
    # ties between candidates go to the first listed
    assert gate("base", 0.1, {"x": 0.5, "y": 0.5}).promoted == "x"
    assert "does not beat" in gate("base", 0.40, {"a": 0.30}).reason


def _sft(**extra):
    return {"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "t"}, **extra}


def test_round_config_defaults_follow_the_reference():
    config = parse_round_config(_sft())
    assert config.demonstrations == 4
    assert config.variants == ["weak", "icl"]
    assert config.generation.max_new_tokens == 1024
    assert config.student is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"promotion": {"min_improvement": -0.1}}, "promotion.min_improvement"),
        ({"variants": ["weak", "weak"]}, "each variant at most once"),
        ({"variants": []}, "variants"),
        ({"training": {"zero_stage": 1}}, "training.zero_stage"),
        ({"pool_limit": 0}, "pool_limit"),
        ({"colour": "blue"}, "colour: unknown field"),
    ],
)
def test_round_config_errors_name_the_field(extra, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_round_config(_sft(**extra))


def test_stage_is_required():
    with pytest.raises(ConfigError, match="stage"):
        parse_round_config({"weak": "w"})


def test_settings_default_to_embedded(tmp_path):
    settings = load_settings({"W2S_HOME": str(tmp_path)})
    assert settings.embedded
    assert settings.database_url == f"sqlite:///{tmp_path / 'w2s.sqlite'}"
    remote = load_settings({"W2S_DATABASE_URL": "postgresql+psycopg://u:secret@db/w2s", "W2S_BROKER_URL": "redis://:pw@r:6379/0"})
    assert not remote.embedded
    assert "secret" not in remote.redacted_database_url()
    assert "pw" not in remote.redacted_broker_url()


def test_a_step_is_refused_a_round_config_of_another_stage():
    from db.schema import Round
    from services.config import PreferenceRoundConfig, SFTRoundConfig
    from services.errors import InputError
    from services.rounds import load_config

    round_ = Round(id=12, stage="sft", config=_sft())
    assert isinstance(load_config(round_), SFTRoundConfig)
    assert load_config(round_, SFTRoundConfig).variants == ["weak", "icl"]
    with pytest.raises(InputError, match=r"round 12 is a sft round, not the stage this step needs \(PreferenceRoundConfig\)"):
        load_config(round_, PreferenceRoundConfig)
