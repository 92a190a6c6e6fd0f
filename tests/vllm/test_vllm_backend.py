"""The vllm backend against the transformers backend on the same tiny fp32 model (the demo's
strong model widened to head_dim 32): the same greedy token ids, the same top-5 log-probs (1e-4),
the same Completions, the same LECO cut points and answers on 20 questions; n=10 samples that a
seed reproduces; the prefix cache serving LECO's continuations."""

from __future__ import annotations

import pytest
import torch

from models.backends import ModelBackend
from models.generation import generate, step_generator
from models.leco import leco_solve
from models.prompts import zero_shot
from services.config import StrategyConfig
from services.evaluation import solve

MAX_NEW = 60


@pytest.fixture(scope="module")
def prompts(questions) -> list[str]:
    return [zero_shot(q["question"]) for q in questions]


def test_it_is_a_model_backend(vllm_strong, hf_strong):
    assert isinstance(vllm_strong, ModelBackend) and vllm_strong.name == "vllm"
    assert vllm_strong.context_length == 256 == hf_strong.context_length
    assert vllm_strong.count_tokens(["a b c"]) == hf_strong.count_tokens(["a b c"])


def test_greedy_token_ids_are_transformers_and_top5_logprobs_within_1e4(vllm_strong, hf_strong, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer, model = hf_strong.tokenizer, hf_strong.model
    eos = tokenizer.eos_token_id
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    outs = vllm_strong.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                                    SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5), use_tqdm=False)
    worst, compared = 0.0, 0
    for prompt_ids, out in zip(ids, outs):
        with torch.inference_mode():  # one prompt at a time: no padding on the transformers side
            ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=tokenizer.pad_token_id)
        ref_ids = ref.sequences[0, len(prompt_ids):].tolist()
        ours = list(out.outputs[0].token_ids)
        assert ours == ref_ids, f"first difference at {next(k for k, (a, b) in enumerate(zip(ours, ref_ids)) if a != b)}"
        for token, position, logits in zip(ours, out.outputs[0].logprobs, ref.logits):
            ref_logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            top = {t for t, lp in position.items() if lp.rank <= 5}
            assert top == set(ref_logprobs.topk(5).indices.tolist()) and token in position
            for t, lp in position.items():
                worst = max(worst, abs(lp.logprob - float(ref_logprobs[t])))
            compared += 1
    assert eos in {t for out in outs for t in out.outputs[0].token_ids}  # some answers end, as in transformers
    assert worst < 1e-4, f"largest log-prob difference {worst} over {compared} positions"


def test_generate_gives_the_transformers_completions(vllm_strong, hf_strong, prompts):
    ours = generate(vllm_strong, prompts, max_new_tokens=MAX_NEW, batch_size=8, return_token_probs="top5")
    theirs = generate(hf_strong, prompts, max_new_tokens=MAX_NEW, batch_size=1, return_token_probs="top5")
    for [a], [b] in zip(ours, theirs):
        assert (a.text, a.input_tokens, a.output_tokens, a.token_texts) == (b.text, b.input_tokens, b.output_tokens,
                                                                           b.token_texts)
        assert a.token_probs == pytest.approx(b.token_probs, abs=1e-4)
    assert sum(bool(c[0].text) for c in ours) == len(prompts)


def test_leco_cut_points_and_answers_are_the_transformers_ones_on_20_questions(vllm_strong, hf_strong, prompts):
    strategy = StrategyConfig(strategy="leco", max_rethinks=2)
    ours = solve(vllm_strong, prompts, "gsm8k", strategy, max_new_tokens=MAX_NEW, batch_size=20)
    theirs = solve(hf_strong, prompts, "gsm8k", strategy, max_new_tokens=MAX_NEW, batch_size=1)
    assert len(ours) == 20
    rethinks = 0
    for a, b in zip(ours, theirs):
        assert a.answer == b.answer
        cuts_a = [(r.kept_steps, r.suspect, r.text, r.answer) for r in a.leco.attempts]
        cuts_b = [(r.kept_steps, r.suspect, r.text, r.answer) for r in b.leco.attempts]
        assert cuts_a == cuts_b
        assert [s.score for r in a.leco.attempts for s in r.steps] == pytest.approx(
            [s.score for r in b.leco.attempts for s in r.steps], abs=1e-3)
        rethinks += len(a.leco.attempts) - 1
    assert rethinks > 0, "no question was rethought: the comparison saw no cut"


def test_n10_samples_are_reproducible_for_a_seed(vllm_strong, prompts):
    def sample(seed):
        out = generate(vllm_strong, prompts[:4], max_new_tokens=MAX_NEW, do_sample=True, num_samples=10,
                       temperature=1.0, seed=seed, batch_size=40, return_token_probs="top5")
        return [[(c.text, c.token_probs) for c in samples] for samples in out]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert all(len(samples) == 10 for samples in first)
    assert all(len({text for text, _ in samples}) > 1 for samples in first)  # ten samples, not one ten times


def test_the_prefix_cache_serves_leco_continuations(vllm_strong, prompts):
    vllm_strong.llm.reset_prefix_cache()
    generator = step_generator(vllm_strong, prompts, max_new_tokens=MAX_NEW, batch_size=20)
    results = leco_solve(prompts, generator, task="gsm8k", max_rethinks=2)
    assert any(len(r.attempts) > 1 for r in results)
    first, *rethinks = generator.calls
    assert first.input_tokens == first.reencode_tokens  # nothing cached yet
    assert rethinks and all(call.input_tokens < call.reencode_tokens for call in rethinks), generator.calls
    # without the cache every token is read again
    plain = step_generator(vllm_strong, prompts, max_new_tokens=MAX_NEW, batch_size=20, reuse_cache=False)
    again = leco_solve(prompts, plain, task="gsm8k", max_rethinks=2)
    assert [r.answer for r in again] == [r.answer for r in results]
    assert all(call.input_tokens == call.reencode_tokens for call in plain.calls)


def test_a_prompt_too_long_is_refused_before_the_engine(vllm_strong):
    from models.backends.vllm import PromptTooLong

    with pytest.raises(PromptTooLong, match=r"prompt 2 of .*: prompt too long: \d+ prompt tokens \+ max_new_tokens 4 exceed the model.s context of 256 tokens"):
        generate(vllm_strong, ["What is 1 + 1 ?", " ".join(["What is 1 + 1 ?"] * 100)], max_new_tokens=4)


def test_a_repetition_penalty_decodes_as_in_transformers(vllm_strong, hf_strong, prompts):
    """The one generation_config.json field vLLM applies (decoding.VLLM_SAMPLING), here as a
    registration's override would set it: the same greedy completions as transformers with it."""
    import dataclasses

    penalised = dataclasses.replace(vllm_strong, decoding={"repetition_penalty": 1.5})
    ours = generate(penalised, prompts[:8], max_new_tokens=MAX_NEW, batch_size=8)
    plain = generate(vllm_strong, prompts[:8], max_new_tokens=MAX_NEW, batch_size=8)
    config = hf_strong.model.generation_config
    try:
        config.repetition_penalty = 1.5
        theirs = generate(hf_strong, prompts[:8], max_new_tokens=MAX_NEW, batch_size=1)
    finally:
        config.repetition_penalty = 1.0
    assert [c[0].text for c in ours] == [c[0].text for c in theirs]
    assert [c[0].text for c in ours] != [c[0].text for c in plain]  # the penalty changed something


def test_a_setting_vllm_cannot_apply_is_refused_before_the_engine_starts(wide_models, tmp_path):
    import json
    import shutil

    from models.backends.decoding import UnsupportedDecoding
    from models.backends.vllm import load

    path = tmp_path / "ngram"
    shutil.copytree(wide_models["strong"], path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "no_repeat_ngram_size": 3}))
    with pytest.raises(UnsupportedDecoding, match="no_repeat_ngram_size=3.*--decoding no_repeat_ngram_size=0"):
        load(path.resolve(), dtype="float32", gpu_memory_utilization=0.05)
