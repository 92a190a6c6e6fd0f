"""The stage I vote's optional step-score threshold (pure) and its figure in the report."""

from __future__ import annotations

import pytest

from services.config import ConfigError, parse_round_config
from services.selection import Vote, dropped_by_step_score, min_step_score, stage1_vote

VOTES = [
    Vote(1, "5", "5", 1.2, 0.9),  # agreed, both confident
    Vote(2, "6", "6", 0.3, 1.5),  # agreed, the first answer has a weak step
    Vote(3, "7", "8", 0.1, 0.1),  # disagreed: never kept, never counted as dropped
    Vote(4, "9", "9", None, 1.1),  # agreed, the first answer unscored: not dropped
    Vote(5, "4", "4", 1.0, 0.5),  # agreed, lowest score exactly at the threshold: kept
]


def test_threshold_off_by_default_keeps_every_agreed_question():
    assert stage1_vote(VOTES, "gsm8k") == [1, 2, 4, 5]
    assert dropped_by_step_score(VOTES, "gsm8k", None) == []


def test_threshold_drops_agreed_questions_with_a_step_below_it():
    assert stage1_vote(VOTES, "gsm8k", 0.5) == [1, 4, 5]
    assert dropped_by_step_score(VOTES, "gsm8k", 0.5) == [2]
    assert stage1_vote(VOTES, "gsm8k", 1.0) == [4]
    assert dropped_by_step_score(VOTES, "gsm8k", 1.0) == [1, 2, 5]


def test_min_step_score_of_stored_step_scores():
    assert min_step_score([{"text": "a", "score": 1.5}, {"text": "b", "score": 0.25}]) == 0.25
    assert min_step_score([]) is None
    assert min_step_score(None) is None


def test_round_config_strategies_and_threshold():
    base = {"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "t"}}
    config = parse_round_config(base)
    assert (config.strategies.weak.strategy, config.strategies.strong.strategy, config.vote.min_step_score) == (
        "cot", "cot", None)
    config = parse_round_config({**base, "strategies": {"weak": {"strategy": "leco", "max_rethinks": 2},
                                                        "strong": {"strategy": "sc", "samples": 5}},
                                 "vote": {"min_step_score": 0.8}})
    assert config.strategies.strong.label() == "sc@5"
    assert config.strategies.weak.max_rethinks == 2 and config.vote.min_step_score == 0.8
    with pytest.raises(ConfigError, match="strategies.weak.strategy: Input should be 'cot', 'sc' or 'leco'"):
        parse_round_config({**base, "strategies": {"weak": {"strategy": "tot"}}})
    with pytest.raises(ConfigError, match="strategies.strong.samples: Input should be greater than or equal to 1"):
        parse_round_config({**base, "strategies": {"strong": {"strategy": "sc", "samples": 0}}})


def test_solve_answers_from_a_replay_backend(tmp_path):
    """The model-free replay backend (benchmarks, failure tests) goes through the same solve():
    it has no context limit, and words for tokens."""
    from models.backends import load_backend
    from models.backends.replay import write_replay
    from models.prompts import zero_shot
    from services.config import StrategyConfig
    from services.evaluation import solve

    prompts = [zero_shot("Tom has 3 apples and buys 5 more. How many?"), zero_shot("What is 2 + 2?")]
    write_replay(tmp_path / "replay", [{"prompt": prompts[0], "response": "3 + 5 = 8.\n#### 8"},
                                       {"prompt": prompts[1], "response": "2 + 2 = 4.\n#### 4"}])
    solutions = solve(load_backend(tmp_path / "replay"), prompts, "gsm8k", StrategyConfig(), max_new_tokens=32)
    assert [s.answer for s in solutions] == ["8", "4"]
