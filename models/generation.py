"""Batched generation: greedy or sampled, stop strings, token counts, chosen-token probabilities.

One ``model.generate`` call per batch: prompts sorted by token length (less padding), left
padded, KV cache on, ``num_return_sequences`` samples per prompt. Results come back in the
order of the prompts. A sequence stops early once its decoded text holds a stop string
(``StopOnText``, not transformers' ``stop_strings``: that one learns each token's text by
decoding it after "abcdef" and fails on word-level tokenizers such as the demo models').

What a Completion holds, per generated sequence:

- ``text``: the generated text decoded (special tokens skipped) up to the first eos / pad token,
  then cut just before the first stop string. Not stripped: ``prompts.clean_response`` does that.
- ``output_tokens``: the generated tokens that lie wholly within ``text``: the largest n such
  that decoding the first n generated tokens gives a prefix of ``text``. Not counted: eos and
  padding, the stop string's tokens, and a token that straddles the cut (e.g. " Question",
  whose leading space is kept but which is mostly stop string).
- ``input_tokens``: the prompt's real tokens (its attention mask), padding excluded.
- ``token_texts`` / ``token_probs`` (only with ``return_token_probs``): one entry per counted
  token. ``token_texts`` are the pieces each token adds to ``text`` when decoding incrementally
  (a token that ends inside an unfinished multi-byte character adds ``""``, the next one the
  whole character); the last piece runs on to the cut, taking the kept part of a straddling
  token, so ``"".join(token_texts) == text`` whenever a token was counted. ``token_probs`` is
  the chosen token's probability under the model's raw logits at that step (not the
  temperature/top-p processed scores): ``"full"`` the full softmax, ``"top5"`` renormalised
  over the top-5 logits (plus the chosen token's own logit if it is not among them, which
  sampling can do), as LECO's reference does. So 0 < full <= top5 <= 1.

Seeds: with ``seed`` set, the RNG is reseeded to ``seed + i`` before the i-th batch (inside
``torch.random.fork_rng``, so the caller's global RNG is untouched). The same prompts with the
same ``batch_size`` and ``num_samples`` form the same batches, hence the same samples on the same
hardware and software. A different batching gives different (equally valid) samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from models.loading import LoadedModel
from models.prompts import STOP_STRINGS

TOKEN_PROB_MODES = ("top5", "full")


@dataclass
class Completion:
    text: str
    input_tokens: int
    output_tokens: int
    token_texts: list[str] | None = None
    token_probs: list[float] | None = None


def generate(
    loaded: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    stop_strings: Sequence[str] = STOP_STRINGS,
    batch_size: int = 16,
    seed: int | None = None,
    return_token_probs: str | None = None,
) -> list[list[Completion]]:
    """``num_samples`` completions per prompt, in the order of ``prompts``.

    ``batch_size`` counts sequences per ``generate`` call (prompts × samples, at least one
    prompt). Greedy decoding gives one completion per prompt, so it needs ``num_samples == 1``.
    Sampling uses ``temperature`` and ``top_p`` only (transformers' default top-k of 50 is
    turned off); other settings in the checkpoint's generation_config.json (a repetition
    penalty, say) still apply. ``return_token_probs`` keeps every step's logits until the batch
    ends (steps × sequences × vocabulary floats): lower ``batch_size`` for long generations.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1 or (num_samples > 1 and not do_sample):
        raise ValueError(f"num_samples must be 1 for greedy decoding and >= 1, got {num_samples}")
    if return_token_probs not in (None, *TOKEN_PROB_MODES):
        raise ValueError(f"return_token_probs must be one of {TOKEN_PROB_MODES} or None")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    if not prompts:
        return []
    sampling = dict(do_sample=False)
    if do_sample:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    tokenizer = loaded.tokenizer
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: OOM early
    per_batch = max(1, batch_size // num_samples)
    results: list[list[Completion]] = [[] for _ in prompts]
    for number, start in enumerate(range(0, len(order), per_batch)):
        batch = order[start : start + per_batch]
        completions = _generate_batch(
            loaded,
            [prompts[i] for i in batch],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            num_samples=num_samples,
            stop_strings=list(stop_strings),
            seed=None if seed is None else seed + number,
            return_token_probs=return_token_probs,
        )
        for j, i in enumerate(batch):
            results[i] = completions[j * num_samples : (j + 1) * num_samples]
    return results


@torch.inference_mode()
def _generate_batch(
    loaded, prompts, *, max_new_tokens, sampling, num_samples, stop_strings, seed,
    return_token_probs,
) -> list[Completion]:
    """One ``model.generate`` call; completions grouped by prompt, as HF returns the rows."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = model.device
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    width = inputs["input_ids"].shape[1]
    stop = [StopOnText(tokenizer, stop_strings, width)] if stop_strings else []
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            stopping_criteria=StoppingCriteriaList(stop),
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=return_token_probs is not None,
            **sampling,
        )
    new_tokens = out.sequences[:, width:]
    probs = None
    if return_token_probs:
        probs = _chosen_probs(out.logits, new_tokens, return_token_probs)
    input_counts = inputs["attention_mask"].sum(dim=1).repeat_interleave(num_samples).tolist()
    end_ids = {tokenizer.pad_token_id, *_eos_ids(loaded)}

    completions = []
    for row, ids in enumerate(new_tokens.tolist()):
        ids = ids[: next((k for k, t in enumerate(ids) if t in end_ids), len(ids))]
        text = _decode(tokenizer, ids)
        text = text[: min([text.find(s) for s in stop_strings if s in text], default=len(text))]
        count = _count_tokens(tokenizer, ids, text)
        completion = Completion(text=text, input_tokens=input_counts[row], output_tokens=count)
        if probs is not None:
            completion.token_texts = _token_pieces(tokenizer, ids[:count], text)
            completion.token_probs = probs[row, :count].tolist()
        completions.append(completion)
    return completions


class StopOnText(StoppingCriteria):
    """Finishes a sequence once its generated text contains a stop string. Checked after every
    token, so a stop string first seen must end in the newest token: decoding the last few
    tokens (each carries at least a character, but for rare empty ones) is enough."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        self.tail = 2 * max(len(stop) for stop in stop_strings) + 4

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.tail)  # never the prompt's text
        tails = [_decode(self.tokenizer, ids) for ids in input_ids[:, start:].tolist()]
        done = [any(stop in text for stop in self.stop_strings) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {*eos, loaded.tokenizer.eos_token_id} - {None}


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _count_tokens(tokenizer, ids: list[int], text: str) -> int:
    """How many leading tokens lie wholly within ``text`` (binary search on the decoded prefix)."""
    low, high = 0, len(ids)  # decode(ids[:low]) lies within text; find the largest such
    while low < high:
        mid = (low + high + 1) // 2
        if text.startswith(_decode(tokenizer, ids[:mid]).rstrip("\ufffd")):  # unfinished character
            low = mid
        else:
            high = mid - 1
    return low


def _token_pieces(tokenizer, ids: list[int], text: str) -> list[str]:
    """What each token adds to the text when decoding incrementally; the last piece runs to the
    end of ``text`` (the kept part of a token cut by the stop string), so the pieces join to it."""
    if not ids:
        return []
    prefixes = [_decode(tokenizer, ids[: k + 1]) for k in range(len(ids) - 1)]
    # a prefix ending in an unfinished UTF-8 character (decoded as U+FFFD) adds nothing yet
    ends = [len(p) if text.startswith(p) else 0 for p in prefixes] + [len(text)]
    ends = list(itertools.accumulate(ends, max))
    return [text[start:end] for start, end in zip([0] + ends, ends)]


def _chosen_probs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, mode: str):
    """(sequences, steps) probability of each chosen token under the raw logits of its step."""
    columns = []
    for step, step_logits in enumerate(logits):  # (sequences, vocab) each, fp32
        chosen = step_logits.gather(1, tokens[:, step : step + 1])  # (sequences, 1)
        if mode == "full":
            columns.append(torch.exp(chosen - step_logits.logsumexp(dim=1, keepdim=True)))
            continue
        top = step_logits.topk(min(5, step_logits.shape[1]), dim=1).values  # (sequences, 5)
        outside = chosen < top[:, -1:]  # sampled below the top 5: renormalise over top 5 + it
        extra = torch.where(outside, chosen, torch.full_like(chosen, -torch.inf))
        pool = torch.cat([top, extra], dim=1)
        columns.append(torch.exp(chosen - pool.logsumexp(dim=1, keepdim=True)))
    return torch.cat(columns, dim=1).cpu()
