"""LECO's KV reuse on a Mistral-style model with a sliding window: the demo's strong Llama's weights
in a MistralForCausalLM (the same network but for the window). Until the sequence reaches the
window the rethinks read one token each and answer as the Llama does; once it reaches the window
the cache is dropped, counted and logged, and the rethinks re-encode, with the same answers."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from models.backends import load_backend
from models.generation import step_generator
from models.leco import leco_solve
from models.prompts import step_by_step

MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def prompts(demo_assets) -> list[str]:
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:6]]
    return [step_by_step(row["question"], "gsm8k", shots=0) for row in rows]


@pytest.fixture(scope="module")
def llama(demo_assets):
    return load_backend(demo_assets.strong_model)


def _mistral(source, target, window: int):
    llama = AutoModelForCausalLM.from_pretrained(source)
    c = llama.config
    config = MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=c.rope_parameters,
        sliding_window=window, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = MistralForCausalLM(config)
    model.load_state_dict(llama.state_dict())
    model.save_pretrained(target)
    for file in source.iterdir():
        if file.name.startswith("tokenizer") or file.name == "generation_config.json":
            shutil.copy(file, target / file.name)
    return load_backend(target)


def _solve(loaded, prompts, **options):
    generator = step_generator(loaded, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=3, **options)
    return generator, leco_solve([f"q{i}" for i in range(len(prompts))], generator, task="gsm8k")


def _texts(results):
    return [[a.text for a in r.attempts] for r in results]


def test_a_window_not_reached_reuses_the_cache(tmp_path, demo_assets, llama, prompts):
    mistral = _mistral(demo_assets.strong_model, tmp_path, window=llama.context_length)
    assert mistral.model.config.sliding_window == 256
    generator, results = _solve(mistral, prompts)
    _, as_llama = _solve(llama, prompts)

    assert any(len(r.attempts) > 1 for r in results), "no question was rethought: nothing tested"
    assert _texts(results) == _texts(as_llama)
    prompt_tokens = [len(ids) for ids in mistral.tokenizer(prompts)["input_ids"]]
    for result, prompt in zip(results, prompt_tokens):  # the prompt once, then one token per rethink
        assert [a.input_tokens for a in result.attempts] == [prompt] + [1] * (len(result.attempts) - 1)
    assert all(c.cache_lost == 0 for c in generator.calls)


def test_a_window_reached_falls_back_to_re_encoding_counted_and_logged(tmp_path, demo_assets, prompts, caplog):
    prompt_tokens = [len(ids) for ids in load_backend(demo_assets.strong_model).tokenizer(prompts)["input_ids"]]
    mistral = _mistral(demo_assets.strong_model, tmp_path, window=max(prompt_tokens) + 8)  # reached while generating
    with caplog.at_level(logging.WARNING, logger="models.backends.hf"):
        generator, results = _solve(mistral, prompts)
    _, fresh = _solve(mistral, prompts, reuse_cache=False)

    assert any(len(r.attempts) > 1 for r in results), "no question was rethought: nothing tested"
    assert _texts(results) == _texts(fresh)
    assert [c.input_tokens for c in generator.calls] == [c.reencode_tokens for c in generator.calls]
    assert sum(c.cache_lost for c in generator.calls) == sum(len(r.attempts) for r in results)
    assert "does not hold the whole sequence" in caplog.text and "sliding window" in caplog.text
