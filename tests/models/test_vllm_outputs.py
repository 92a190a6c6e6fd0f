"""The vllm backend's own code that needs no vLLM: its outputs (token ids, per-position log-prob
dicts shaped as vLLM returns them) turned into Completions, step-score probabilities and LECO
continuations by the same shared code as the transformers backend. The traces are recorded from
the transformers backend's own generation on the tiny demo model, so "the same" is checked
against the real thing. Importing ``models.backends.vllm`` must not import vLLM."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.backends import default_cache
from models.backends.tokens import Row
from models.backends.vllm import (
    Piece,
    PromptTooLong,
    check_lengths,
    chosen_prob,
    chosen_probs,
    completion_from,
    continued_from,
    engine_dtype,
    join_pieces,
    lora_base,
    lora_rank,
    request_seeds,
)
from models.generation import generate
from models.prompts import STOP_STRINGS, zero_shot
from services.errors import InputError
from services.evaluation import check_prompts_fit

REPO = Path(__file__).resolve().parents[2]


def vllm_position(logits_row: torch.Tensor, chosen: int) -> dict[int, float]:
    """What vLLM returns at one position with logprobs=5 (raw log-probs): the top 5, and the
    chosen token as a 6th entry when it is not among them."""
    logprobs = torch.log_softmax(logits_row.double(), dim=-1)
    top = logprobs.topk(5).indices.tolist()
    return {token: float(logprobs[token]) for token in {*top, chosen}}


def test_a_vllm_logprob_object_and_a_missing_token_are_handled():
    position = {3: SimpleNamespace(logprob=math.log(0.5), rank=1), 4: SimpleNamespace(logprob=math.log(0.25), rank=2)}
    assert chosen_prob(position, 3, "top5") == pytest.approx(2 / 3)
    assert chosen_prob(position, 4, "full") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="token 9 has no log-prob"):
        chosen_prob(position, 9, "top5")
    with pytest.raises(ValueError, match="no log-probs"):
        chosen_probs([3], None, "top5")


def test_seeds_give_every_sequence_its_own_and_do_not_depend_on_batching():
    assert request_seeds(100, 3, 10) == [100, 110, 120]  # vLLM: sample i of prompt j gets 100 + 10j + i
    assert request_seeds(None, 2, 4) == [None, None]


def test_an_engine_runs_in_the_dtype_the_transformers_backend_would_not_vllms_auto():
    # vLLM's auto runs a float32 checkpoint in bfloat16 even on CPU: 5 of 80 greedy pool answers of
    # the tiny models then left transformers' (docs/design-notes.md). The transformers rule instead.
    assert engine_dtype(None, "float32", "cpu", True) == "float32"
    assert engine_dtype(None, "bfloat16", "cpu", True) == "float32"
    assert engine_dtype(None, "float32", "cuda", True) == "bfloat16"
    assert engine_dtype(None, "float32", "cuda", False) == "float32"  # vLLM's auto: float16
    assert engine_dtype(None, "float16", "cuda", True) == "float16"
    assert engine_dtype(torch.float32, "bfloat16", "cuda", True) == "float32"  # asked for: as asked
    assert engine_dtype("bfloat16", "float32", "cpu", True) == "bfloat16"


def test_a_prompt_too_long_is_refused_with_the_services_message(demo_assets):
    strong = default_cache().get(demo_assets.strong_model)
    prompt = zero_shot(" ".join(["What is 1 + 1 ?"] * strong.context_length))
    with pytest.raises(InputError) as services_error:
        check_prompts_fit(strong, [prompt], 32)
    with pytest.raises(PromptTooLong) as ours:
        check_lengths(strong.count_tokens([prompt]), strong.context_length, strong.path, 32)
    assert str(ours.value) == str(services_error.value)
    check_lengths([strong.context_length - 32], strong.context_length, strong.path, 32)  # fits: nothing raised
    with pytest.raises(PromptTooLong, match="max_new_tokens 32"):  # no room left for the answer
        check_lengths([strong.context_length - 31], strong.context_length, strong.path, 32)


def record(strong, prompt: str, **generate_options):
    """One prompt's transformers generation, recorded as vLLM returns it: (prompt, the output with
    token ids past any stop string and a log-prob dict per position, the prompt's width)."""
    inputs = strong.tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = strong.model.generate(**inputs, return_dict_in_generate=True, output_logits=True,
                                    pad_token_id=strong.tokenizer.pad_token_id, **generate_options)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    positions = [vllm_position(step[0], token) for step, token in zip(out.logits, ids)]
    return prompt, SimpleNamespace(token_ids=ids, logprobs=positions, index=0), inputs["input_ids"].shape[1]


@pytest.fixture(scope="module")
def sampled_traces(demo_assets):
    """Sampled answers (temperature 2: tokens outside the top 5 occur), recorded from the same
    ``model.generate`` call the transformers backend makes for a batch of one prompt and seed."""
    strong = default_cache().get(demo_assets.strong_model)
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:4]]
    recorded = []
    for number, row in enumerate(rows):
        prompt = zero_shot(row["question"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + number)  # the backend's seed for batch `number`
            recorded.append(record(strong, prompt, max_new_tokens=40, do_sample=True, temperature=2.0, top_p=1.0,
                                   top_k=0, num_return_sequences=1))
    return strong, recorded


def test_sampled_tokens_inside_and_outside_the_top5_get_the_transformers_probabilities(sampled_traces):
    strong, recorded = sampled_traces
    prompts = [prompt for prompt, _, _ in recorded]
    expected = [generate(strong, [prompt], max_new_tokens=40, batch_size=1, do_sample=True, temperature=2.0,
                         seed=100 + number, return_token_probs="top5")[0] for number, prompt in enumerate(prompts)]
    outside = 0
    for (_prompt, output, width), [hf] in zip(recorded, expected):
        ours = completion_from(strong.tokenizer, output, input_tokens=width, end_ids=strong._end_ids(),
                               stop_strings=STOP_STRINGS, token_probs="top5")
        assert (ours.text, ours.output_tokens, ours.token_texts) == (hf.text, hf.output_tokens, hf.token_texts)
        assert ours.token_probs == pytest.approx(hf.token_probs, abs=1e-5)
        outside += sum(len(position) == 6 for position in output.logprobs[:ours.output_tokens])
    assert outside, "no sampled token fell outside the top 5: the rule's second case went untested"


@pytest.fixture(scope="module")
def traces(demo_assets):
    """The transformers backend's raw sequences and logits on five test questions, recorded as
    vLLM would return them (token ids past the stop string, log-prob dicts per position)."""
    strong = default_cache().get(demo_assets.strong_model)
    rows = [json.loads(line) for line in demo_assets.test.read_text().splitlines()[:5]]
    prompts = [zero_shot(row["question"]) for row in rows]
    recorded = []
    for prompt in prompts:  # one at a time: no padding in the trace
        recorded.append(record(strong, prompt, max_new_tokens=60, do_sample=False))
    return strong, recorded


def test_a_recorded_output_becomes_the_transformers_backends_completion(traces):
    strong, recorded = traces
    prompts = [prompt for prompt, _, _ in recorded]
    expected = generate(strong, prompts, max_new_tokens=60, batch_size=1, return_token_probs="top5")
    assert any(STOP_STRINGS[0] in strong.tokenizer.decode(o.token_ids) or len(o.token_ids) < 60 for _, o, _ in recorded)
    for (_prompt, output, width), [hf] in zip(recorded, expected):
        ours = completion_from(strong.tokenizer, output, input_tokens=width, end_ids=strong._end_ids(),
                               stop_strings=STOP_STRINGS, token_probs="top5")
        assert (ours.text, ours.output_tokens, ours.input_tokens) == (hf.text, hf.output_tokens, hf.input_tokens)
        assert ours.token_texts == hf.token_texts
        assert ours.token_probs == pytest.approx(hf.token_probs, abs=1e-5)
        assert ours.output_tokens <= len(output.token_ids)  # the stop string's tokens are not counted


def test_a_continuation_joins_its_requests_and_counts_what_the_cache_served(traces):
    strong, recorded = traces
    _, output, width = recorded[0]
    ids, logprobs = output.token_ids, output.logprobs
    whole = Piece(list(ids), list(logprobs), True, cached=16)
    split = join_pieces(Piece(ids[:5], logprobs[:5], False, cached=16), Piece(ids[5:6], logprobs[5:6]),
                        Piece(ids[6:], logprobs[6:], True))
    assert (split.ids, split.logprobs, split.finished, split.cached) == (whole.ids, whole.logprobs, True, 16)
    row = Row(ids=list(range(width)), state=None, cached=0)
    continued = continued_from(strong.tokenizer, row, split, end_ids=strong._end_ids(), stop_strings=STOP_STRINGS,
                               mode="top5")
    completion = completion_from(strong.tokenizer, output, input_tokens=width, end_ids=strong._end_ids(),
                                 stop_strings=STOP_STRINGS, token_probs="top5")
    assert continued.text == completion.text and continued.pieces == completion.token_texts
    assert continued.probs == completion.token_probs and len(continued.ids) == completion.output_tokens
    assert continued.encoded == width - 16 and continued.state is None


def test_the_default_install_never_imports_vllm():
    code = ("import sys, models.backends, models.backends.vllm, models.backends.loader, workers.steps, cli.main; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_lora_checkpoint_vllm_cannot_serve_is_refused_naming_it_and_the_merge(tmp_path):
    """vLLM applies one adapter to a plain model, with ranks from a fixed set: an adapter over an
    adapter, a missing base, a rank above 512 are refused before the engine starts."""
    base, first, second = tmp_path / "base", tmp_path / "first", tmp_path / "second"
    for directory in (base, first, second):
        directory.mkdir()
    (base / "config.json").write_text("{}")
    (first / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../base", "r": 8}))
    (second / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(first), "r": 8}))
    assert lora_base(first) == base.resolve()  # a relative base, against the checkpoint
    with pytest.raises(ValueError, match=rf"LoRA checkpoint {second}: its base {first} is itself a LoRA checkpoint.*"
                                         r"w2sctl checkpoint merge"):
        lora_base(second)
    (base / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"LoRA checkpoint {first}: its base {base.resolve()} is not a model"):
        lora_base(first)
    assert [lora_rank(first, r) for r in (1, 8, 16, 64, 65, 300, 512)] == [1, 8, 16, 64, 128, 320, 512]
    with pytest.raises(ValueError, match=rf"LoRA checkpoint {first}: rank 600 is above vLLM's largest \(512\).*merge"):
        lora_rank(first, 600)
