"""The model-backend seam: both backends satisfy the protocol, the loader picks the right one, and
the shared code above them (generation front, strategies, step scores, the context check) runs
unchanged over the transformers backend on the tiny demo model and over a replay of its answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from models.backends import CheckpointError, ModelBackend, backend_for, default_cache, load_backend
from models.backends.replay import write_replay
from models.generation import generate
from models.prompts import step_by_step, zero_shot
from services.config import StrategyConfig
from services.errors import InputError
from services.evaluation import check_prompts_fit, solve

REPO = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def strong(demo_assets):
    return default_cache().get(demo_assets.strong_model)


@pytest.fixture(scope="module")
def prompts(demo_assets) -> list[str]:
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:5]]
    return [step_by_step(row["question"], "gsm8k", shots=0) for row in rows]


@pytest.fixture(scope="module")
def recorded(strong, prompts, tmp_path_factory):
    """A replay of the transformers backend's own greedy answers to the prompts."""
    completions = generate(strong, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
    records = [{"prompt": p, "response": c[0].text.removeprefix(" ")} for p, c in zip(prompts, completions)]
    assert all(c[0].text.startswith(" ") for c in completions)  # replays answer with the leading space
    return load_backend(write_replay(tmp_path_factory.mktemp("replay") / "strong", records))


def test_both_backends_satisfy_the_protocol(strong, recorded):
    for backend, name in ((strong, "transformers"), (recorded, "replay")):
        assert isinstance(backend, ModelBackend) and backend.name == name
        assert backend.path.is_absolute() and backend.fingerprint
    assert strong.context_length == strong.model.config.max_position_embeddings
    assert recorded.context_length is None


def test_the_loader_recognises_the_backend_and_obeys_an_explicit_one(demo_assets, recorded, tmp_path):
    assert backend_for(demo_assets.strong_model) == "transformers"
    assert backend_for(recorded.path) == "replay"
    with pytest.raises(CheckpointError, match="w2s-replay.json is missing"):
        load_backend(demo_assets.strong_model, backend="replay")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_backend(recorded.path, backend="transformers")
    with pytest.raises(CheckpointError, match=r"unknown backend 'tgi', expected one of transformers, replay, vllm"):
        load_backend(demo_assets.strong_model, backend="tgi")
    (tmp_path / "w2s-replay.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unreadable replay files") as error:
        load_backend(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("strategy", ["cot", "leco"])
def test_the_same_solve_over_both_backends_gives_the_same_answers(strong, recorded, prompts, strategy):
    # one rethink is enough here: what is compared is the original attempt (LECO's depth: test_leco_models)
    config = StrategyConfig(strategy=strategy, max_rethinks=1)
    live = solve(strong, prompts, "gsm8k", config, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
    replayed = solve(recorded, prompts, "gsm8k", config, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
    if strategy == "cot":  # the replay holds the greedy answers: same texts, same answers
        assert [s.text for s in replayed] == [s.text for s in live]
        assert [s.answer for s in replayed] == [s.answer for s in live]
    else:  # LECO over a replay: the original attempt only (no token probabilities, no step to doubt)
        assert [s.leco.attempts[0].text for s in replayed] == [s.leco.attempts[0].text for s in live]
        assert all(s.leco.stop_reason == "no_candidates" and len(s.leco.attempts) == 1 for s in replayed)
    # step scores come from the shared score_steps over the token probabilities a backend has
    assert all(s.samples[0].steps and all("score" in step for step in s.samples[0].steps) for s in live)
    assert all(s.samples[0].steps == [] for s in replayed)
    # token counts: tokens for the model, words for the replay
    for solutions in (live, replayed):
        assert all(s.input_tokens > 0 and s.output_tokens > 0 for s in solutions)


def test_the_context_check_asks_the_backend(strong, recorded):
    too_long = zero_shot(" ".join(["What is 1 + 1 ?"] * strong.context_length))
    with pytest.raises(InputError, match=r"prompt 1 of .*: prompt too long: \d+ prompt tokens \+ max_new_tokens 8 exceed "
                                         r"the model's context of \d+ tokens"):
        check_prompts_fit(strong, [too_long], 8)
    check_prompts_fit(recorded, [too_long], 8)  # a replay reads nothing: no limit
    # The answer's room counts: a prompt that fits alone does not fit with max_new_tokens past the end.
    short = zero_shot("What is 1 + 1 ?")
    room = strong.context_length - strong.count_tokens([short])[0]
    check_prompts_fit(strong, [short], room)
    with pytest.raises(InputError, match=f"max_new_tokens {room + 1} exceed"):
        check_prompts_fit(strong, [short], room + 1)


def test_leco_rethinks_never_generate_past_the_context(strong, monkeypatch):
    """A prompt that leaves exactly max_new_tokens free: the original answer fits, and each rethink
    (kept steps + new tokens) is cut to what is left of the context, not given max_new_tokens more."""
    context, budget = strong.context_length, 40
    words = "Sam has 3 beads and 2 more"
    question = words
    while strong.count_tokens([zero_shot(question + " " + words)])[0] + budget <= context:
        question += " " + words
    prompt = zero_shot(question)
    assert strong.count_tokens([prompt])[0] + budget <= context
    calls = []
    original = strong.model.generate

    def recording(*args, **kwargs):
        calls.append((int(kwargs["attention_mask"].sum(dim=1).max()), kwargs["max_new_tokens"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(strong.model, "generate", recording)
    [solution] = solve(strong, [prompt], "gsm8k", StrategyConfig(strategy="leco", max_rethinks=3), max_new_tokens=budget)
    assert calls and all(tokens + new <= context for tokens, new in calls), calls
    assert solution.leco is not None


def test_no_production_module_names_a_backend():
    """Above models/backends/, code holds a ModelBackend and never asks which one."""
    offenders = []
    for folder in ("services", "workers", "models", "db"):
        for path in (REPO / folder).rglob("*.py"):
            if path.is_relative_to(REPO / "models" / "backends"):
                continue
            text = path.read_text()
            if re.search(r"replay|TransformersBackend|VllmBackend|models\.backends\.(hf|replay|vllm)", text, re.IGNORECASE):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
