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
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from models.leco import Attempt, RethinkRequest, doubted_token
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
    if getattr(loaded.model, "replays", False):  # models/replay.py: recorded responses, no model
        return loaded.model.generate(prompts, num_samples=num_samples)
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
        ids, text = _trim(tokenizer, ids, end_ids, stop_strings)
        count = _count_tokens(tokenizer, ids, text)
        completion = Completion(text=text, input_tokens=input_counts[row], output_tokens=count)
        if probs is not None:
            completion.token_texts = _token_pieces(tokenizer, ids[:count], text)
            completion.token_probs = probs[row, :count].tolist()
        completions.append(completion)
    return completions


def _trim(tokenizer, ids: list[int], end_ids: set[int], stop_strings: Sequence[str]) -> tuple[list[int], str]:
    """Generated ids up to the first eos / pad, and their text cut before the first stop string."""
    ids = ids[: next((k for k, t in enumerate(ids) if t in end_ids), len(ids))]
    text = _decode(tokenizer, ids)
    return ids, text[: min([text.find(s) for s in stop_strings if s in text], default=len(text))]


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


# --- LECO: continuing kept steps from the KV cache -----------------------------------------------


@dataclass
class _Context:
    """What the model has read for one question: the prompt, the current solution's tokens, and
    the keys/values of the first ``cached`` of ``prompt_ids + answer_ids`` (per layer, on device)."""

    prompt_ids: list[int]
    answer_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # one per answer token; they join to the solution text
    probs: list[float] = field(default_factory=list)
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (heads, cached, head_dim) each
    cached: int = 0


@dataclass
class _Row:
    """One sequence of a continuation batch."""

    ids: list[int]  # everything the model reads: prompt + kept answer tokens (+ text re-tokenized)
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    cached: int  # leading ids served from ``cache``
    divert: tuple[int, list[int], int] | None = None  # (step, tokens expected before it, token banned there)
    kept_pieces: list[str] = field(default_factory=list)  # the answer tokens' pieces in ids (none: first attempt)
    kept_probs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class CallStats:
    """One batched call of the step generator: what it encoded and generated."""

    questions: int
    input_tokens: int  # tokens the model actually encoded (cached prefixes are not)
    reencode_tokens: int  # tokens it would have encoded without the cache (prompt + kept text, every time)
    output_tokens: int


class _DivertFromDroppedStep(LogitsProcessor):
    """Bans, per row, one token at one step of the new text, but only while the text generated so
    far is the dropped step's own beginning: greedy decoding then takes the next best token there."""

    def __init__(self, diverts: list[tuple[int, list[int], int] | None], width: int):
        self.diverts, self.width = diverts, width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.width
        for row, divert in enumerate(self.diverts):
            if divert and divert[0] == step and input_ids[row, self.width :].tolist() == divert[1]:
                scores[row, divert[2]] = -torch.inf
        return scores


class CachedStepGenerator:
    """The model behind ``models.leco.leco_solve``: greedy step-by-step generation in which a
    rethink continues the kept steps as the model's own answer text.

    The prompt and the kept tokens are the very ids the model read and wrote before, so their
    keys and values come from the previous call's cache: only what is new is encoded (``input_tokens``).
    Rows of one batch are aligned with padding inside the sequence (attention mask 0, positions
    from the mask), so questions with different kept lengths share a ``generate`` call. With
    ``reuse_cache=False`` the same ids are encoded from scratch (for comparison); models whose
    cache is not a ``DynamicCache`` of plain key/value tensors fall back to that.

    ``divert``: a greedy rethink would write the dropped step again; it is banned from taking the
    dropped step's least confident token (``leco.doubted_token``) at the same place, so it turns
    away where the step was most in doubt and decodes greedily everywhere else. ``False``: plain
    greedy (the rethink then usually repeats the original and the loop stops at once).

    Caches of every question live until the generator is dropped: give it one batch of questions
    (``solve_with_leco`` does) rather than a whole dataset.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        batch_size: int = 16,
        token_probs: str = "top5",
        stop_strings: Sequence[str] = STOP_STRINGS,
        reuse_cache: bool = True,
        divert: bool = True,
    ):
        if token_probs not in TOKEN_PROB_MODES:
            raise ValueError(f"token_probs must be one of {TOKEN_PROB_MODES}, got {token_probs!r}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        self.loaded, self.max_new_tokens, self.batch_size = loaded, max_new_tokens, batch_size
        self.mode, self.stop_strings = token_probs, list(stop_strings)
        self.reuse_cache, self.divert = reuse_cache, divert
        ids = loaded.tokenizer(list(prompts))["input_ids"]
        self.contexts = [_Context(prompt_ids=list(p)) for p in ids]
        self.calls: list[CallStats] = []

    def __call__(self, requests: list[RethinkRequest]) -> list[Attempt]:
        rows = [self._row(request) for request in requests]
        attempts: list[Attempt] = []
        encoded = reencode = 0
        for start in range(0, len(rows), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(rows))))
            for i, result in zip(batch, self._continue([rows[i] for i in batch])):
                row, context = rows[i], self.contexts[requests[i].question_index]
                context.answer_ids = row.ids[len(context.prompt_ids) :] + result["ids"]
                context.pieces = row.kept_pieces + result["pieces"]
                context.probs = row.kept_probs + result["probs"]
                context.cache, context.cached = result["cache"], result["cached"]
                attempts.append(Attempt(text=result["text"], token_texts=result["pieces"], token_probs=result["probs"],
                                        input_tokens=result["encoded"], output_tokens=len(result["ids"])))
                encoded += result["encoded"]
                reencode += len(row.ids)
        self.calls.append(CallStats(len(requests), encoded, reencode, sum(a.output_tokens for a in attempts)))
        return attempts

    # -- one request -> one row

    def _row(self, request: RethinkRequest) -> _Row:
        """The ids to read: the prompt, the kept answer tokens as generated, and (when a token
        straddles the cut) the rest of the kept text re-tokenized."""
        context = self.contexts[request.question_index]
        prompt, text = context.prompt_ids, "".join(context.pieces)
        if not text.startswith(request.kept_text):
            raise ValueError(f"question {request.question_index}: kept_text is not a prefix of its current solution")
        cut = len(request.kept_text)
        ends = list(itertools.accumulate(len(p) for p in context.pieces))
        keep = sum(1 for end in ends if end <= cut)  # answer tokens wholly inside the kept text
        rest = request.kept_text[ends[keep - 1] if keep else 0 :]
        rest_ids = self.loaded.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        ids = prompt + context.answer_ids[:keep] + rest_ids
        # the rest's tokens carry the probability of the token they were cut from (for a later doubted_token)
        kept_pieces = context.pieces[:keep] + _token_pieces(self.loaded.tokenizer, rest_ids, rest)
        kept_probs = context.probs[:keep] + [context.probs[keep] if rest_ids else 0.0] * len(rest_ids)
        divert = None
        if self.divert and context.pieces and not rest_ids:  # a rethink that starts on a token boundary
            line_end = text.find("\n", cut)
            doubted = doubted_token(context.pieces, context.probs, cut, line_end if line_end >= 0 else len(text))
            if doubted is not None:
                divert = (doubted - keep, context.answer_ids[keep:doubted], context.answer_ids[doubted])
        cached = min(context.cached, len(prompt) + keep, len(ids) - 1)  # at least one id is read anew
        return _Row(ids, context.cache, cached, divert, kept_pieces, kept_probs)

    # -- one batch

    @torch.inference_mode()
    def _continue(self, rows: list[_Row]) -> list[dict]:
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        device, pad = model.device, tokenizer.pad_token_id
        cached = [row.cached if self.reuse_cache and row.cache is not None else 0 for row in rows]
        fresh = [len(row.ids) - c for row, c in zip(rows, cached)]
        left, right = max(cached), max(fresh)  # columns served from the cache, columns encoded now
        width = left + right
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        columns = []  # per row: the columns holding its real tokens, in order
        for i, (row, c, n) in enumerate(zip(rows, cached, fresh)):
            input_ids[i, left - c : left] = torch.tensor(row.ids[:c], dtype=torch.long)
            input_ids[i, width - n :] = torch.tensor(row.ids[c:], dtype=torch.long)
            mask[i, left - c : left] = 1
            mask[i, width - n :] = 1
            columns.append(list(range(left - c, left)) + list(range(width - n, width)))
        past = self._assemble_cache(rows, cached, left) if left else None
        stop = [StopOnText(tokenizer, self.stop_strings, width)] if self.stop_strings else []
        diverts = [row.divert for row in rows]
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), past_key_values=past,
            max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList(stop),
            logits_processor=LogitsProcessorList([_DivertFromDroppedStep(diverts, width)] if any(diverts) else []),
            return_dict_in_generate=True, output_logits=True,
        )
        new_tokens = out.sequences[:, width:]
        probs = _chosen_probs(out.logits, new_tokens, self.mode)
        cache = out.past_key_values if self.reuse_cache and _plain_cache(out.past_key_values) else None
        end_ids = {pad, *_eos_ids(self.loaded)}
        results = []
        for i, ids in enumerate(new_tokens.tolist()):
            ids, text = _trim(tokenizer, ids, end_ids, self.stop_strings)
            count = _count_tokens(tokenizer, ids, text)
            keep_columns = columns[i] + list(range(width, width + count))
            row_cache, row_cached = None, 0
            if cache is not None:
                keep_columns = [c for c in keep_columns if c < cache.get_seq_length()]
                index = torch.tensor(keep_columns, dtype=torch.long, device=device)
                row_cache = [(layer.keys[i].index_select(1, index), layer.values[i].index_select(1, index))
                             for layer in cache.layers]
                row_cached = len(keep_columns)
            results.append({"ids": ids[:count], "text": text, "pieces": _token_pieces(tokenizer, ids[:count], text),
                            "probs": probs[i, :count].tolist(), "encoded": fresh[i], "cache": row_cache,
                            "cached": row_cached})
        return results

    @staticmethod
    def _assemble_cache(rows: list[_Row], cached: list[int], left: int) -> DynamicCache:
        """One batch cache of ``left`` columns: each row's cached keys/values right-aligned, zeros
        (masked out) before them."""
        donor = next(row.cache for row, c in zip(rows, cached) if c)
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(donor):
            heads, _, dim = keys.shape
            k = keys.new_zeros((len(rows), heads, left, dim))
            v = values.new_zeros((len(rows), values.shape[0], left, values.shape[2]))
            for i, (row, c) in enumerate(zip(rows, cached)):
                if c:
                    k[i, :, left - c :] = row.cache[layer][0][:, :c]
                    v[i, :, left - c :] = row.cache[layer][1][:, :c]
            cache.update(k, v, layer)
        return cache


def _plain_cache(cache) -> bool:
    """A DynamicCache whose every layer holds whole key/value tensors (no sliding window, no offload)."""
    return isinstance(cache, DynamicCache) and all(
        type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)
        for layer in cache.layers)
