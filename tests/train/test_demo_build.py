"""The tiny demo build itself (it trains the tiny models, so it lives with the training tests):
its manifest, its checkpoints, its cache, and held-out questions kept out of training."""

from __future__ import annotations

import json
import time

import pytest

from models import demo
from models.answers import gold_answer_from_solution
from models.jsonl import read_jsonl
from models.prompts import training_target, zero_shot


def _questions(path) -> list[str]:
    return [row["question"] for row in read_jsonl(path)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny build (~40 s on 2 cores), shared by the tests below."""
    root = tmp_path_factory.mktemp("demo")  # exists and is empty: the build may take its place
    messages: list[str] = []
    started = time.monotonic()
    assets = demo.build_demo(root, scale="tiny", seed=0, progress=messages.append)
    return assets, messages, time.monotonic() - started



# --- the tiny build ----------------------------------------------------------------------------


def test_manifest_is_complete(tiny):
    assets, messages, seconds = tiny
    manifest = json.loads((assets.root / demo.MANIFEST).read_text())
    assert (manifest["scale"], manifest["seed"]) == ("tiny", 0)
    assert manifest["recipe"] == demo.recipe_fingerprint("tiny")
    spec = demo.SCALE_SPECS["tiny"]
    assert manifest["counts"] == {
        "weak_train": spec.weak_train,
        "pool": spec.pool,
        "test": spec.test,
        "strong_related": spec.strong_related,
    }
    for field, name in manifest["files"].items():
        assert getattr(assets, field) == assets.root / name
        assert getattr(assets, field).exists()
    # non-trivial accuracy, so that the vote agrees on some questions
    assert manifest["accuracy"]["weak"]["test"] >= 0.05
    assert manifest["accuracy"]["strong"]["test"] >= 0.05
    assert any("test accuracy" in m for m in messages)
    assert not list(assets.root.parent.glob(f".{assets.root.name}.building-*"))  # nothing left over


def test_checkpoints_load_and_generate(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    assets, _, _ = tiny
    manifest = json.loads((assets.root / demo.MANIFEST).read_text())
    question = read_jsonl(assets.test, limit=1)[0]
    for model_dir in (assets.weak_model, assets.strong_model):
        assert (model_dir / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert isinstance(model, LlamaForCausalLM)
        assert tokenizer.padding_side == "left"
        gen = model.generation_config
        assert gen.eos_token_id == tokenizer.eos_token_id
        assert gen.pad_token_id == tokenizer.pad_token_id
        text = zero_shot(question["question"]) + training_target(question["answer"])
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text  # spaces come back
    weak = AutoModelForCausalLM.from_pretrained(assets.weak_model)
    strong = AutoModelForCausalLM.from_pretrained(assets.strong_model)
    assert strong.num_parameters() > weak.num_parameters()
    # the build's figure is the project's own generation and grading of the saved checkpoint
    test = [demo.Problem(row["question"], row["answer"], 0) for row in read_jsonl(assets.test)]
    assert round(demo.greedy_accuracy(assets.strong_model, test), 4) == manifest["accuracy"]["strong"]["test"] > 0


def test_second_call_returns_the_cached_build(tiny):
    assets, _, _ = tiny
    weights = assets.strong_model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    messages: list[str] = []
    started = time.monotonic()
    again = demo.build_demo(assets.root, scale="tiny", seed=0, progress=messages.append)
    assert time.monotonic() - started < 2.0
    assert again == assets
    assert weights.stat().st_mtime_ns == mtime
    assert messages and "already built" in messages[0]


def test_held_out_questions_are_never_trained_on(tiny):
    assets, _, _ = tiny
    pool, test = set(_questions(assets.pool)), set(_questions(assets.test))
    weak_train, related = set(_questions(assets.weak_train)), set(_questions(assets.strong_related))
    assert len(pool) == demo.SCALE_SPECS["tiny"].pool and len(test) == demo.SCALE_SPECS["tiny"].test
    assert not pool & test
    assert not (pool | test) & weak_train
    assert not (pool | test) & related
    # The dev split (decides promotion) shares no question with any other split.
    dev = _questions(assets.dev)
    assert len(set(dev)) == len(dev) == demo.DEV_SIZES["tiny"]
    assert not set(dev) & (pool | test | weak_train | related)
    for path in (assets.weak_train, assets.pool, assets.test, assets.strong_related, assets.dev):
        for row in read_jsonl(path):
            assert set(row) == {"question", "answer"} and gold_answer_from_solution(row["answer"], "gsm8k")
