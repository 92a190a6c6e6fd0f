"""Step scores recorded as generation goes (``hf.StepScores``): the chosen tokens' probabilities
equal those of a teacher-forced forward pass over prompt + output, greedy and sampled, ``top5``
and ``full``, in plain generation and in LECO's step generator; the prefix reuse uses the current
cache API without deprecation warnings."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from models.backends import default_cache, load_backend
from models.backends.tokens import chosen_token_prob
from models.generation import generate, step_generator
from models.leco import leco_solve
from models.prompts import step_by_step

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + [f"w{i}" for i in range(300)]  # enough choices that sampling leaves the top 5
PROMPTS = ["w1 w2 w3", "w10 w20 w30 w40 w50 w60 w70", "w7", "w100 w200 w299 w5 w6"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-300")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # a logits processor of the checkpoint's own: scores are still under the raw logits
    model.generation_config.suppress_tokens = [1, 3]
    model.save_pretrained(path)
    return load_backend(path)


def _reference(loaded, prompt: str, text: str) -> tuple[list[float], list[float], list[int]]:
    """Teacher-forced: (full, top5, rank of the chosen token) for each token of ``text`` after ``prompt``."""
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    new_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + new_ids])).logits[0, len(prompt_ids) - 1 : -1].double()
    chosen = logits[range(len(new_ids)), new_ids]
    full = (chosen - logits.logsumexp(-1)).exp()
    top5 = (chosen - logits.topk(5, dim=-1).values.logsumexp(-1)).exp()
    ranks = (logits > chosen[:, None]).sum(-1)
    return full.tolist(), top5.tolist(), ranks.tolist()


def test_the_rule_renormalises_over_the_five_highest_logits():
    top = [3.0, 2.0, 1.0, 0.5, 0.0, -1.0]  # more than five given: the five highest count
    z5 = sum(torch.tensor(top[:5]).exp().tolist())
    assert chosen_token_prob(2.0, top, 10.0, "top5") == pytest.approx(torch.tensor(2.0).exp().item() / z5)
    # a sampled token outside the top 5 is not added to the pool: its share against those 5
    assert chosen_token_prob(-1.0, top, 10.0, "top5") == pytest.approx(torch.tensor(-1.0).exp().item() / z5)
    assert chosen_token_prob(-1.0, top, 10.0, "full") == pytest.approx(torch.tensor(-11.0).exp().item())
    # log-probabilities (total 0) give the same as logits shifted by a constant
    shifted = [t - 7.0 for t in top]
    assert chosen_token_prob(-5.0, shifted, 0.0, "top5") == pytest.approx(chosen_token_prob(2.0, top, 10.0, "top5"))
    assert chosen_token_prob(3.0, top[:2], 3.5, "top5") <= 1.0  # a vocabulary of two: top 2
    with pytest.raises(ValueError, match="top5"):
        chosen_token_prob(1.0, top, 2.0, "top3")


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_scores_equal_a_teacher_forced_forward_pass(loaded, do_sample):
    kwargs = dict(max_new_tokens=24, do_sample=do_sample, temperature=2.5, seed=3, batch_size=4)
    top5 = generate(loaded, PROMPTS, return_token_probs="top5", **kwargs)
    full = generate(loaded, PROMPTS, return_token_probs="full", **kwargs)
    ranks = []
    for prompt, (t,), (f,) in zip(PROMPTS, top5, full):
        assert t.text == f.text and t.output_tokens > 0
        ref_full, ref_top5, rank = _reference(loaded, prompt, t.text)
        assert len(t.token_probs) == len(f.token_probs) == t.output_tokens == len(ref_full)
        assert f.token_probs == pytest.approx(ref_full, abs=1e-5)
        assert t.token_probs == pytest.approx(ref_top5, abs=1e-5)
        ranks += rank
    if do_sample:
        assert max(ranks) >= 5, "no sampled token outside the top 5: the rule for it was not exercised"
    else:
        assert set(ranks) == {0}


@pytest.mark.parametrize("mode", ["top5", "full"])
def test_leco_step_generator_scores_equal_a_teacher_forced_forward_pass(loaded, mode):
    from models.leco import RethinkRequest

    generator = step_generator(loaded, PROMPTS, max_new_tokens=16, batch_size=4, token_probs=mode)
    attempts = generator([RethinkRequest(i, "") for i in range(len(PROMPTS))])
    for prompt, attempt in zip(PROMPTS, attempts):
        ref_full, ref_top5, _ = _reference(loaded, prompt, attempt.text)
        assert attempt.token_probs == pytest.approx(ref_full if mode == "full" else ref_top5, abs=1e-5)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_prefix_reuse_uses_the_current_cache_api(demo_assets):
    """LECO's rethinks pass the assembled cache to generate and read it back without a deprecation
    warning (transformers 6 removes ``past_key_values``); pyproject turns such warnings into errors."""
    strong = default_cache().get(demo_assets.strong_model)
    prompts = [step_by_step(q, "gsm8k", shots=0) for q in ("What is 2 + 3 ?", "Tom has 4 apples . How many ?")]
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers' once-only warnings
    records = _Records()
    hf_logging.get_logger().addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generator = step_generator(strong, prompts, max_new_tokens=40, batch_size=2)
            results = leco_solve(["q1", "q2"], generator, task="gsm8k")
    finally:
        hf_logging.get_logger().removeHandler(records)
    assert any(len(r.attempts) > 1 for r in results), "no rethink: the cache was never passed back"
    assert sum(c.input_tokens for c in generator.calls) < sum(c.reencode_tokens for c in generator.calls)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecations += [m for m in records.messages if "deprecat" in m.lower()]
    assert not [d for d in deprecations if "cache" in d or "past_key_values" in d], deprecations


@pytest.mark.parametrize("mode", ["top5", "full"])
def test_a_diverted_step_is_scored_over_the_choices_it_had(mode):
    """LECO's divert bans a token at one step of one row: that row's score at that step leaves the
    banned token out (as the choice did); the other rows keep the raw logits."""
    from types import SimpleNamespace

    from models.backends.hf import StepScores, _DivertFromDroppedStep

    torch.manual_seed(0)
    logits = torch.randn(2, 1, 50)
    banned = int(logits[0, -1].argmax())
    scores = StepScores()
    scores(None, (), {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, SimpleNamespace(logits=logits))
    divert = _DivertFromDroppedStep([(0, [], banned), None], width=3, scores=scores)
    chosen = divert(torch.zeros(2, 3, dtype=torch.long), logits[:, -1].clone()).argmax(-1)
    assert int(chosen[0]) != banned
    scores.finish(chosen[:, None])

    masked = logits[:, -1].double().clone()
    masked[0, banned] = -torch.inf
    for row in (0, 1):
        values = masked[row] if row == 0 else logits[1, -1].double()
        pick = values[chosen[row]]
        expected = (pick - (values.logsumexp(-1) if mode == "full" else values.topk(5).values.logsumexp(-1))).exp()
        assert scores.probs(row, 1, mode) == pytest.approx([expected.item()], abs=1e-6)
