"""The pure rules of issue 17's "prompts that fit" and "like with like": demonstrations cut to
the context, their choice, the round-start warning, an evaluation's identity, the dtype a
checkpoint loads in, the torch thread count and a checkpoint's decoding settings."""

from __future__ import annotations

import pytest

from models.backends.decoding import NEUTRAL, decoding_changes, describe, parse_overrides
from models.backends.loader import choose_dtype
from models.prompts import few_shot, fit_few_shot, zero_shot
from services.config import StrategyConfig, parse_round_config
from services.evaluation import EvalMethod
from services.rounds import demonstration_candidates, fit_warnings
from services.settings import torch_thread_count


def words(texts):
    """A tokenizer stand-in: one token per white-space separated word."""
    return [len(text.split()) for text in texts]


DEMOS = [("a b", "short answer"), ("c d e f", "a much longer answer with many many words in it"), ("g", "mid size answer")]


def test_all_demonstrations_when_they_fit():
    [fit] = fit_few_shot(["what is x"], DEMOS, words, context=1000, max_new_tokens=100)
    assert fit.prompt == few_shot("what is x", DEMOS) and fit.demonstrations == 3 and fit.reason is None
    assert fit.tokens == words([fit.prompt])[0]


def test_the_longest_demonstrations_go_first_and_the_others_keep_their_order():
    full = words([few_shot("what is x", DEMOS)])[0]
    # One token short of the full prompt's room: the long demonstration (the second) is dropped.
    [fit] = fit_few_shot(["what is x"], DEMOS, words, context=full + 10 - 1, max_new_tokens=10)
    assert fit.demonstrations == 2 and fit.prompt == few_shot("what is x", [DEMOS[0], DEMOS[2]])
    assert fit.tokens + 10 <= full + 10 - 1
    # Exactly room for the prompt and max_new_tokens: it fits (prompt + max_new_tokens <= context).
    [fit] = fit_few_shot(["what is x"], DEMOS, words, context=full + 10, max_new_tokens=10)
    assert fit.demonstrations == 3


def test_a_question_that_cannot_fit_even_zero_shot_is_skipped_with_the_reason():
    long_question = " ".join(["word"] * 50)
    fits = fit_few_shot(["short one", long_question], DEMOS, words, context=45, max_new_tokens=20)
    assert fits[0].prompt is not None and fits[0].demonstrations < 3
    skipped = fits[1]
    zero = words([zero_shot(long_question)])[0]
    assert skipped.prompt is None and skipped.demonstrations == 0 and skipped.tokens == zero
    assert skipped.reason == f"prompt too long: {zero} prompt tokens + max_new_tokens 20 exceed the model's context of 45 tokens"


def test_no_known_context_keeps_every_demonstration():
    fits = fit_few_shot(["q1", "q2"], DEMOS, words, context=None, max_new_tokens=10_000)
    assert [f.demonstrations for f in fits] == [3, 3]
    assert fit_few_shot(["q"], [], words, context=100, max_new_tokens=10)[0].prompt == zero_shot("q")


def test_demonstrations_come_from_complete_and_shorter_responses():
    # (id, output tokens) at max_new_tokens 100: ids 5 and 6 were cut by the budget.
    responses = [(1, 40), (2, 10), (3, 90), (4, 20), (5, 100), (6, 150), (7, 30), (8, 60)]
    # 6 complete; the shorter half (3) is fewer than K=4, so the 4 shortest, in the order given.
    assert demonstration_candidates(responses, 4, 100) == [1, 2, 4, 7]
    assert demonstration_candidates(responses, 2, 100) == [2, 4, 7]  # the shorter half: 3 of 6
    # fewer complete than K: the shortest cut ones make up the numbers
    assert demonstration_candidates([(1, 100), (2, 5), (3, 120)], 2, 100) == [2, 1]


def _sft(**extra):
    return parse_round_config({"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "t"},
                               **extra}, "test")


def test_round_start_warns_when_the_generation_cannot_fit():
    config = _sft(demonstrations=4, generation={"max_new_tokens": 100})
    assert fit_warnings(config, {"weak": ("w", 2048), "strong": ("s", 2048)}) == []
    [line] = fit_warnings(config, {"weak": ("w", 256), "strong": ("s", 256)})  # 5 x 100 > 256
    assert line.startswith("warning: 4 demonstrations") and "'s'" in line and "256" in line
    lines = fit_warnings(_sft(generation={"max_new_tokens": 300}), {"weak": ("w", 256), "strong": ("s", None)})
    assert lines == ["warning: generation.max_new_tokens 300 leaves no room for a prompt in weak model 'w''s "
                     "context of 256 tokens: every question it answers will be skipped"]


def test_generation_settings_are_part_of_an_evaluations_identity():
    base = EvalMethod(max_new_tokens=1024)
    assert base.label() == "cot/0-shot/1024-new"
    assert EvalMethod(max_new_tokens=320).label() != base.label()
    # what does not change the answers does not change the identity
    assert EvalMethod(max_new_tokens=1024, batch_size=4, seed=3).label() == base.label()
    sc = StrategyConfig(strategy="sc", samples=10, temperature=0.7)
    assert EvalMethod(strategy=sc, shots=4, max_new_tokens=512).label() == "sc@10/4-shot/512-new/t0.7/p1"
    assert EvalMethod(strategy=sc.model_copy(update={"top_p": 0.9}), max_new_tokens=512).label().endswith("/t0.7/p0.9")
    passk = EvalMethod(strategy=StrategyConfig(strategy="sc", samples=4, temperature=1.0), pass_at=True, max_new_tokens=48)
    assert passk.label() == "pass@4/0-shot/48-new/t1/p1"
    leco = StrategyConfig(strategy="leco")
    assert EvalMethod(strategy=leco, max_new_tokens=64).label() == "leco/0-shot/64-new/top5/3-rethinks/divert"
    assert EvalMethod(strategy=leco.model_copy(update={"token_prob": "full"}), max_new_tokens=64).label() \
        == "leco/0-shot/64-new/full/3-rethinks/divert"
    assert EvalMethod(strategy=leco.model_copy(update={"reuse_cache": False}), max_new_tokens=64).label() \
        == "leco/0-shot/64-new/top5/3-rethinks/divert"  # the same tokens, re-encoded


@pytest.mark.parametrize(("device", "declared", "bf16", "expected"), [
    ("cpu", "bfloat16", True, "float32"),
    ("cpu", "float16", True, "float32"),
    ("cpu", None, False, "float32"),
    ("cuda", "bfloat16", True, "bfloat16"),
    ("cuda", "bfloat16", False, "float32"),  # no bf16 on the GPU: fp16 could overflow
    ("cuda", "float16", True, "float16"),
    ("cuda", "float16", False, "float16"),
    ("cuda", "float32", True, "bfloat16"),
    ("cuda", None, False, "float32"),
])
def test_the_dtype_a_checkpoint_loads_in(device, declared, bf16, expected):
    assert choose_dtype(device, declared, bf16) == expected


def test_torch_thread_count():
    assert torch_thread_count(None, {}) == (1, "default: one per process; W2S_TORCH_THREADS to change")
    assert torch_thread_count(None, {"OMP_NUM_THREADS": "4"}) == (4, "OMP_NUM_THREADS")
    assert torch_thread_count(None, {"OMP_NUM_THREADS": "lots"})[0] == 1
    assert torch_thread_count(3, {"OMP_NUM_THREADS": "4"}) == (3, "W2S_TORCH_THREADS")


def test_generation_config_settings_that_change_decoding():
    config = {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0, "top_k": 20, "temperature": 0.6,
              "do_sample": True, "bos_token_id": 1, "eos_token_id": 2}
    applied, overridden = decoding_changes(config)
    assert applied == {"repetition_penalty": 1.1}
    assert overridden == {"top_k": 20, "temperature": 0.6, "do_sample": True}
    line = describe(applied, overridden, {})
    assert line is not None and "repetition_penalty=1.1 (applied" in line and "top_k=20" in line and "win" in line
    assert describe({}, {}, {}) is None
    assert parse_overrides(["neutral"], config) == {"repetition_penalty": NEUTRAL["repetition_penalty"]}
    assert parse_overrides(["repetition_penalty=1.05", "no_repeat_ngram_size=3"], config) == \
        {"repetition_penalty": 1.05, "no_repeat_ngram_size": 3}
    for bad, message in (("top_k=5", "w2s sets top_k itself"), ("colour=red", "not a decoding setting"),
                         ("repetition_penalty", "expected KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad], config)


def test_the_entry_points_set_the_thread_count(monkeypatch):
    import torch

    from services.settings import apply_torch_threads, load_settings

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        assert apply_torch_threads(load_settings({"W2S_TORCH_THREADS": "2"})) == (2, "W2S_TORCH_THREADS")
        assert torch.get_num_threads() == 2 and __import__("os").environ["OMP_NUM_THREADS"] == "2"
        assert apply_torch_threads(load_settings({}))[0] == 2  # OMP_NUM_THREADS, as the last call set it
    finally:
        torch.set_num_threads(before)
