"""The loader and the transformers backend (models/backends/) through models/generation.py, on a tiny
random Llama with a word-level tokenizer."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.backends import CheckpointError, Completion, ModelCache, check_checkpoint_dir, load_backend
from models.generation import generate
from models.prompts import zero_shot

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["Question", "Answer", ":", "+", "=", "?", "What", "is", "sum", "of", "and", "Step",
         "then", "so", "we", "get", "total", "apples", "Tom", "has", "more"]  # fmt: skip
VOCAB = SPECIALS + WORDS + [str(d) for d in range(10)]  # cannot spell transformers' "abcdef"
QUESTIONS = [
    "What is 3 + 4 ?",
    "Tom has 5 apples and 2 more apples . What is the total ?",
    "What is 1 ?",
    "What is the sum of 7 and 8 and 9 ?",
    "Tom has 6",
]
PROMPTS = [zero_shot(q) for q in QUESTIONS]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # peaked logits: greedy choices far from ties
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.suppress_tokens = [1, 3]  # no <s> or <unk>: texts re-tokenize exactly
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return load_backend(checkpoint)


def texts(results: list[list[Completion]]) -> list[list[str]]:
    return [[c.text for c in per_prompt] for per_prompt in results]


# --- loading -----------------------------------------------------------------------------------


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory") as error:
        check_checkpoint_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(error.value)


def test_directory_without_safetensors(tmp_path, checkpoint):
    shutil.copy(checkpoint / "config.json", tmp_path)
    shutil.copy(checkpoint / "tokenizer.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        check_checkpoint_dir(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, checkpoint):
    shutil.copy(checkpoint / "config.json", tmp_path)
    shutil.copy(checkpoint / "tokenizer.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only") as error:
        load_backend(tmp_path)
    assert isinstance(error.value, ValueError) and str(tmp_path) in str(error.value)


def test_directory_without_tokenizer(tmp_path, checkpoint):
    shutil.copy(checkpoint / "config.json", tmp_path)
    shutil.copy(checkpoint / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        check_checkpoint_dir(tmp_path)


def test_load_model(loaded, checkpoint):
    assert loaded.path == checkpoint.resolve()
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32 and loaded.model.device.type == "cpu"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id == 0


def test_cache_reuses_until_the_checkpoint_changes(tmp_path, checkpoint):
    copy = shutil.copytree(checkpoint, tmp_path / "model")
    cache = ModelCache()
    first = cache.get(copy)
    assert cache.get(copy) is first and cache.get(str(copy) + "/") is first
    assert cache.loads == 1
    stat = (copy / "model.safetensors").stat()  # rewritten in place: a new mtime
    os.utime(copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = cache.get(copy)
    assert second is not first and second.fingerprint != first.fingerprint
    assert cache.loads == 2 and len(cache) == 1
    assert cache.get(copy) is second and cache.loads == 2


def test_cache_evicts_least_recently_used(tmp_path, checkpoint):
    a, b, c = (shutil.copytree(checkpoint, tmp_path / name) for name in "abc")
    cache = ModelCache(capacity=2)
    cache.get(a), cache.get(b), cache.get(a), cache.get(c)  # b is the least recently used
    assert cache.loads == 3 and a in cache and c in cache and b not in cache
    cache.get(a)
    assert cache.loads == 3


# --- generation --------------------------------------------------------------------------------


def test_batched_greedy_equals_one_at_a_time(loaded, monkeypatch):
    calls = []
    real_generate = loaded.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    batched = generate(loaded, PROMPTS, max_new_tokens=12, stop_strings=(), batch_size=3)
    assert calls == [3, 2]  # one call per batch, never one per question
    calls.clear()
    single = [generate(loaded, [p], max_new_tokens=12, stop_strings=())[0] for p in PROMPTS]
    assert calls == [1] * len(PROMPTS)
    assert texts(batched) == texts(single)
    assert [c[0].output_tokens for c in batched] == [c[0].output_tokens for c in single]
    assert any(len(c[0].text.split()) > 3 for c in batched)  # the test generates something


def test_results_follow_the_prompt_order(loaded):
    one = generate(loaded, PROMPTS, max_new_tokens=6, batch_size=2)
    reversed_ = generate(loaded, PROMPTS[::-1], max_new_tokens=6, batch_size=2)
    assert texts(one) == texts(reversed_)[::-1]
    assert [c[0].input_tokens for c in one] == [
        len(loaded.tokenizer(p)["input_ids"]) for p in PROMPTS
    ]


def test_stop_strings_cut_each_sequence_and_stop_early(loaded, monkeypatch):
    full = [c[0].text for c in generate(loaded, PROMPTS, max_new_tokens=12, stop_strings=())]
    # a word that some (not all) generations contain after their first word
    counts = Counter(w for text in full for w in set(text.split()[1:]))
    stop = next(w for w, n in counts.most_common() if n < len(full) and w in WORDS)
    stopped = generate(loaded, PROMPTS, max_new_tokens=12, stop_strings=[stop], batch_size=8)
    for text, (completion,) in zip(full, stopped):
        expected = text[: text.find(stop)] if stop in text else text
        assert completion.text == expected
        assert completion.output_tokens == len(expected.split())  # " stop" itself is not counted

    widths = []
    real_generate = loaded.model.generate

    def spy(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        widths.append(out.sequences.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(loaded.model, "generate", spy)
    prompt, text = next((p, t) for p, t in zip(PROMPTS, full) if stop in t)
    generate(loaded, [prompt], max_new_tokens=12, stop_strings=[stop])
    assert widths == [len(text[: text.find(stop)].split()) + 1]  # stopped at the stop token


def test_token_counts_add_up(loaded):
    results = generate(loaded, PROMPTS, max_new_tokens=10)
    for prompt, (completion,) in zip(PROMPTS, results):
        assert completion.input_tokens == len(loaded.tokenizer(prompt)["input_ids"])
        assert completion.output_tokens == len(loaded.tokenizer(completion.text)["input_ids"])
        assert 0 <= completion.output_tokens <= 10
        assert completion.token_texts is None and completion.token_probs is None


def test_seeded_sampling_reproduces(loaded):
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=2.0, num_samples=3, batch_size=6)
    first = generate(loaded, PROMPTS, seed=7, **kwargs)
    assert [len(c) for c in first] == [3] * len(PROMPTS)
    assert texts(generate(loaded, PROMPTS, seed=7, **kwargs)) == texts(first)
    assert texts(generate(loaded, PROMPTS, seed=8, **kwargs)) != texts(first)
    assert len({c.text for c in first[1]}) > 1  # the samples of one prompt differ


def test_greedy_needs_one_sample(loaded):
    with pytest.raises(ValueError, match="num_samples"):
        generate(loaded, PROMPTS, max_new_tokens=4, num_samples=2)


@pytest.mark.parametrize("do_sample", [False, True])
def test_token_probs(loaded, do_sample):
    kwargs = dict(max_new_tokens=12, do_sample=do_sample, temperature=3.0, seed=1)
    plain = generate(loaded, PROMPTS, **kwargs)
    top5 = generate(loaded, PROMPTS, return_token_probs="top5", **kwargs)
    full = generate(loaded, PROMPTS, return_token_probs="full", **kwargs)
    assert texts(top5) == texts(full) == texts(plain)
    for (t,), (f,) in zip(top5, full):
        assert len(t.token_probs) == len(f.token_probs) == len(t.token_texts) == t.output_tokens
        assert "".join(t.token_texts) == t.text and t.token_texts == f.token_texts
        assert all(0 < p <= 1 for p in t.token_probs + f.token_probs)
        assert all(pt >= pf - 1e-6 for pt, pf in zip(t.token_probs, f.token_probs))


def test_full_probs_match_a_forward_pass(loaded):
    (completion,) = generate(loaded, PROMPTS[1:2], max_new_tokens=8, return_token_probs="full")[0]
    prompt_ids = loaded.tokenizer(PROMPTS[1])["input_ids"]
    new_ids = loaded.tokenizer(completion.text)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + new_ids])).logits[0]
    probs = logits[len(prompt_ids) - 1 : -1].softmax(-1)[range(len(new_ids)), new_ids]
    assert completion.token_probs == pytest.approx(probs.tolist(), abs=1e-5)
