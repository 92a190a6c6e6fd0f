"""The ``transformers`` backend: a local checkpoint loaded with transformers, generating with
``model.generate`` (KV cache on), and LECO continuations served from that cache.

Batched generation: one ``model.generate`` call per batch, prompts sorted by token length (less
padding), left padded, ``num_return_sequences`` samples per prompt. Results come back in the order
of the prompts. A sequence stops early once its decoded text holds a stop string (``StopOnText``,
not transformers' ``stop_strings``: that one learns each token's text by decoding it after
"abcdef" and fails on word-level tokenizers such as the demo models').

Seeds: with ``seed`` set, the RNG is reseeded to ``seed + i`` before the i-th batch (inside
``torch.random.fork_rng``, so the caller's global RNG is untouched). The same prompts with the
same ``batch_size`` and ``num_samples`` form the same batches, hence the same samples on the same
hardware and software. A different batching gives different (equally valid) samples.

Loading: only local directories (``local_files_only=True``), only safetensors weights
(``use_safetensors=True``: a pickled ``pytorch_model.bin`` can run code on load), and
``trust_remote_code`` stays off unless the operator allows it for a named model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from models.backends.base import Completion, GenerationParams, StepOptions
from models.backends.checkpoints import check_remote_code, fingerprint
from models.backends.tokens import (
    Continued,
    Row,
    TokenStepGenerator,
    chosen_token_prob,
    count_tokens,
    decode,
    stop_tail,
    token_pieces,
    trim,
)
from models.prompts import model_text
from models.stopping import StopSignal, current_signal

_log = logging.getLogger(__name__)

# ``generate``'s cache argument and output field: ``cache`` since transformers 5.2x (``past_key_values``
# is deprecated and goes in 6.0), ``past_key_values`` before.
CACHE_KWARG = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@dataclass
class TransformersBackend:
    model: Any  # a transformers PreTrainedModel with a causal LM head, in eval mode
    tokenizer: Any  # left padding, pad token set
    path: Path  # resolved
    fingerprint: str
    name: str = "transformers"
    prompt_format: str = "plain"  # how a w2s prompt becomes the text the model reads (prompts.model_text)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def dtype(self) -> str:
        """The model's dtype as the vllm backend names it (``float32``); a job records it."""
        return str(self.model.dtype).removeprefix("torch.")

    def formatted(self, prompt_format: str) -> TransformersBackend:
        """The same model and tokenizer reading prompts in ``prompt_format``; a chat format is
        refused here when the tokenizer has no chat template."""
        model_text(self.tokenizer, "", prompt_format)
        return self if prompt_format == self.prompt_format else dataclasses.replace(self, prompt_format=prompt_format)

    def _texts(self, prompts: Sequence[str]) -> list[str]:
        return [model_text(self.tokenizer, p, self.prompt_format) for p in prompts]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._count(self._texts(texts))

    def _count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        prompts = self._texts(prompts)
        sampling: dict[str, Any] = dict(do_sample=False)
        if params.do_sample:  # transformers' default top-k of 50 is turned off
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        num_samples = params.num_samples
        lengths = self._count(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: OOM early
        per_batch = max(1, params.batch_size // num_samples)
        results: list[list[Completion]] = [[] for _ in prompts]
        signal = current_signal()
        for number, start in enumerate(range(0, len(order), per_batch)):
            signal.check()
            batch = order[start : start + per_batch]
            completions = self._generate_batch(
                signal,
                [prompts[i] for i in batch],
                max_new_tokens=params.max_new_tokens,
                sampling=sampling,
                num_samples=num_samples,
                stop_strings=list(params.stop_strings),
                seed=None if params.seed is None else params.seed + number,
                return_token_probs=params.return_token_probs,
            )
            for j, i in enumerate(batch):
                results[i] = completions[j * num_samples : (j + 1) * num_samples]
        return results

    @torch.inference_mode()
    def _generate_batch(self, signal: StopSignal, prompts, *, max_new_tokens, sampling, num_samples, stop_strings,
                        seed, return_token_probs) -> list[Completion]:
        """One ``model.generate`` call; completions grouped by prompt, as HF returns the rows.
        ``return_token_probs`` keeps 7 floats per generated token (``StepScores``), not the logits."""
        model, tokenizer = self.model, self.tokenizer
        device = model.device
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        width = inputs["input_ids"].shape[1]
        stop = [StopOnText(tokenizer, stop_strings, width)] if stop_strings else []
        stop.append(StopOnSignal(signal))
        rng_devices = [device] if device.type == "cuda" else []
        scores = StepScores() if return_token_probs else None
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), _recording(model, scores):
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
                **sampling,
            )
        signal.check()  # a generate cut short by the signal: its sequences are not answers
        new_tokens = out.sequences[:, width:]
        stats = scores.finish(new_tokens) if scores is not None else None
        input_counts = inputs["attention_mask"].sum(dim=1).repeat_interleave(num_samples).tolist()
        end_ids = self._end_ids()

        completions = []
        for row, ids in enumerate(new_tokens.tolist()):
            ids, text = trim(tokenizer, ids, end_ids, stop_strings)
            count = count_tokens(tokenizer, ids, text)
            completion = Completion(text=text, input_tokens=input_counts[row], output_tokens=count)
            if stats is not None:
                completion.token_texts = token_pieces(tokenizer, ids[:count], text)
                completion.token_probs = stats.probs(row, count, return_token_probs)
            completions.append(completion)
        return completions

    def _end_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return {self.tokenizer.pad_token_id, *eos, self.tokenizer.eos_token_id} - {None}

    # --- LECO: continuing kept steps from the KV cache -------------------------------------------

    def step_generator(self, prompts: Sequence[str], options: StepOptions) -> TokenStepGenerator:
        """Rows of one batch are aligned with padding inside the sequence (attention mask 0,
        positions from the mask), so questions with different kept lengths share a ``generate``
        call. A row's state is its keys/values per layer, ``(heads, cached, head_dim)`` each, on
        the device. With ``reuse_cache=False`` the same ids are encoded from scratch (for
        comparison). A sliding-window cache is kept until a generation reaches the window; then
        (and for caches that are not whole key/value tensors) the rows re-encode next time, and
        ``Continued.cache_lost`` says so."""
        return TokenStepGenerator(self.tokenizer, self._texts(prompts), options,
                                  functools.partial(self._continue, options))

    @torch.inference_mode()
    def _continue(self, options: StepOptions, rows: list[Row]) -> list[Continued]:
        model, tokenizer = self.model, self.tokenizer
        device, pad = model.device, tokenizer.pad_token_id
        stop_strings = list(options.stop_strings)
        cached = [row.cached if options.reuse_cache and row.state is not None else 0 for row in rows]
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
        past = _assemble_cache(model.config, rows, cached, left) if left else None
        stop = [StopOnText(tokenizer, stop_strings, width)] if stop_strings else []
        signal = current_signal()
        stop.append(StopOnSignal(signal))
        diverts = [row.divert for row in rows]
        # A rethink continues after its kept steps: never past the context (the longest row decides).
        context = self.context_length
        budget = options.max_new_tokens if context is None else \
            min(options.max_new_tokens, context - max(len(row.ids) for row in rows))
        if budget < 1:
            return [Continued(ids=[], text="", pieces=[], probs=[], encoded=0, state=None, cached=0) for _ in rows]
        scores = StepScores()
        with _recording(model, scores):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), **{CACHE_KWARG: past},
                max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList(stop),
                logits_processor=LogitsProcessorList(
                    [_DivertFromDroppedStep(diverts, width, scores)] if any(diverts) else []),
                return_dict_in_generate=True,
            )
        signal.check()
        new_tokens = out.sequences[:, width:]
        stats = scores.finish(new_tokens)
        cache, lost = None, False
        if options.reuse_cache:
            cache = getattr(out, CACHE_KWARG)
            if not _whole_cache(cache):  # a sliding window dropped columns (or an engine-specific cache)
                cache, lost = None, True
                _log.warning("LECO: %s's KV cache does not hold the whole sequence (%d columns; sliding window %s): "
                             "the next rethinks of these %d rows re-encode their prompt and kept steps",
                             self.path.name, width + new_tokens.shape[1], _sliding_window(model.config), len(rows))
        end_ids = self._end_ids()
        results = []
        for i, ids in enumerate(new_tokens.tolist()):
            ids, text = trim(tokenizer, ids, end_ids, stop_strings)
            count = count_tokens(tokenizer, ids, text)
            keep_columns = columns[i] + list(range(width, width + count))
            row_cache, row_cached = None, 0
            if cache is not None:
                keep_columns = [c for c in keep_columns if c < cache.get_seq_length()]
                index = torch.tensor(keep_columns, dtype=torch.long, device=device)
                row_cache = [(layer.keys[i].index_select(1, index), layer.values[i].index_select(1, index))
                             for layer in cache.layers]
                row_cached = len(keep_columns)
            results.append(Continued(ids=ids[:count], text=text, pieces=token_pieces(tokenizer, ids[:count], text),
                                     probs=stats.probs(i, count, options.token_probs), encoded=fresh[i],
                                     state=row_cache, cached=row_cached, cache_lost=lost))
        return results


class StopOnText(StoppingCriteria):
    """Finishes a sequence once its generated text contains a stop string. Checked after every
    token, so a stop string first seen must end in the newest token: decoding the last few
    tokens is enough (``tokens.stop_tail``)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, stop_strings, prompt_width
        self.tail = stop_tail(stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.tail)  # never the prompt's text
        tails = [decode(self.tokenizer, ids) for ids in input_ids[:, start:].tolist()]
        done = [any(stop in text for stop in self.stop_strings) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopOnSignal(StoppingCriteria):
    """Finishes every sequence once the job's stop signal is set: a long ``generate`` call ends
    after the token it is computing (the caller then raises ``Stopped``)."""

    def __init__(self, signal: StopSignal):
        self.signal = signal

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.signal.is_set(), dtype=torch.bool, device=input_ids.device)


class StepScores:
    """The chosen tokens' probabilities recorded as ``generate`` goes, in constant memory per step.

    A forward hook on the generating model sees each step's raw logits (before any logits
    processor: the suppressed tokens, a repetition penalty, LECO's diversion, temperature, top-p)
    and keeps, per sequence, their log-sum-exp and top-5 values; the chosen token's logit is
    taken at the next step, whose input is that token (the last step's, from the output ids).
    So one step's logits live at a time, instead of every step's until the batch ends, and
    ``tokens.chosen_token_prob`` turns these 7 floats per token into the probability.
    """

    def __init__(self) -> None:
        self.totals: list[torch.Tensor] = []  # per step: (sequences,) log-sum-exp of the logits
        self.tops: list[torch.Tensor] = []  # per step: (sequences, 5) the highest logits
        self.chosen: list[torch.Tensor] = []  # per step: (sequences,) the chosen token's logit
        self._last: torch.Tensor | None = None  # the latest step's logits, until its token is known
        self._done: tuple[list[list[float]], list[list[float]], list[list[list[float]]]] | None = None

    def __call__(self, module, args, kwargs, output) -> None:
        logits = output.logits[:, -1]
        if self._last is not None:  # this step reads the token chosen at the previous one
            self._take_chosen(kwargs["input_ids"][:, -1])
        values = logits.float()  # as generate scores them
        self.totals.append(values.logsumexp(dim=-1))
        self.tops.append(values.topk(min(5, values.shape[-1]), dim=-1).values)
        self._last = logits

    def exclude(self, row: int, token: int) -> None:
        """Leave ``token`` out of the latest step's scores for sequence ``row`` (it was banned from the choice)."""
        assert self._last is not None
        values = self._last[row].to(dtype=torch.float32, copy=True)
        values[token] = -torch.inf
        self.totals[-1][row] = values.logsumexp(dim=-1)
        self.tops[-1][row] = values.topk(self.tops[-1].shape[-1]).values

    def _take_chosen(self, tokens: torch.Tensor) -> None:
        assert self._last is not None
        self.chosen.append(self._last.gather(1, tokens[:, None].to(self._last.device))[:, 0].float())
        self._last = None

    def finish(self, new_tokens: torch.Tensor) -> StepScores:
        """Close the record with the generated tokens ``(sequences, steps)``."""
        steps = new_tokens.shape[1]
        if self._last is not None and len(self.chosen) < steps:
            self._take_chosen(new_tokens[:, len(self.chosen)])
        if steps:
            self._done = (torch.stack(self.chosen[:steps], dim=1).tolist(),
                          torch.stack(self.totals[:steps], dim=1).tolist(),
                          torch.stack(self.tops[:steps], dim=1).tolist())
        self.totals, self.tops, self.chosen, self._last = [], [], [], None
        return self

    def probs(self, row: int, count: int, mode: str) -> list[float]:
        """The first ``count`` chosen-token probabilities of one sequence."""
        if not count:
            return []
        assert self._done is not None, "finish() first"
        chosen, totals, tops = (part[row][:count] for part in self._done)
        return [chosen_token_prob(c, t, z, mode) for c, z, t in zip(chosen, totals, tops)]


@contextmanager
def _recording(model, scores: StepScores | None) -> Iterator[None]:
    """Hook ``scores`` onto the module whose forward ``generate`` calls (a PEFT model's base)."""
    if scores is None:
        yield
        return
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = target.register_forward_hook(scores, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _DivertFromDroppedStep(LogitsProcessor):
    """Bans, per row, one token at one step of the new text, but only while the text generated so
    far is the dropped step's own beginning: greedy decoding then takes the next best token there.
    The banned token leaves that step's scores too (``StepScores.exclude``): the step is scored
    over the choices it had."""

    def __init__(self, diverts: list[tuple[int, list[int], int] | None], width: int, scores: StepScores):
        self.diverts, self.width, self.step_scores = diverts, width, scores

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.width
        for row, divert in enumerate(self.diverts):
            if divert and divert[0] == step and input_ids[row, self.width :].tolist() == divert[1]:
                scores[row, divert[2]] = -torch.inf
                self.step_scores.exclude(row, divert[2])
        return scores


def _assemble_cache(config, rows: list[Row], cached: list[int], left: int) -> DynamicCache:
    """One batch cache of ``left`` columns: each row's cached keys/values right-aligned, zeros
    (masked out) before them. Built from the model's config, so a sliding-window model gets its
    sliding layers, as ``generate`` would make them."""
    donor = next(row.state for row, c in zip(rows, cached) if c)
    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(donor):
        heads, _, dim = keys.shape
        k = keys.new_zeros((len(rows), heads, left, dim))
        v = values.new_zeros((len(rows), values.shape[0], left, values.shape[2]))
        for i, (row, c) in enumerate(zip(rows, cached)):
            if c:
                k[i, :, left - c :] = row.state[layer][0][:, :c]
                v[i, :, left - c :] = row.state[layer][1][:, :c]
        cache.update(k, v, layer)
    return cache


def _whole_cache(cache) -> bool:
    """A DynamicCache whose every layer holds whole key/value tensors for every column: full
    layers, and sliding-window layers that have not reached their window (no offload, no
    quantisation)."""
    return isinstance(cache, DynamicCache) and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
        and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and layer.keys.shape[-2] == layer.get_seq_length()
        for layer in cache.layers)


def _sliding_window(config) -> int | None:
    return getattr(config.get_text_config(decoder=True), "sliding_window", None)


# --- loading ---------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, path: Path | None = None) -> torch.dtype:
    """float32 on CPU; on a GPU a bf16/fp16 checkpoint's own dtype, else bf16 where supported
    (``loader.choose_dtype``, the rule)."""
    from models.backends.loader import choose_dtype, declared_dtype

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return getattr(torch, choose_dtype(device.type, declared_dtype(path) if path else None, bf16))


def load(
    path: Path,
    *,
    trust_remote_code: bool = False,
    remote_code_allowed: Collection[str] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    decoding: dict[str, Any] | None = None,
) -> TransformersBackend:
    """Load a checked local checkpoint for generation: eval mode, on ``device``, left-padding tokenizer."""
    check_remote_code(path, trust_remote_code, remote_code_allowed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # workers log their own progress; a bar only clutters job logs
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device, path)
    stamp = fingerprint(path)  # before loading: a rewrite during the load shows up next time
    tokenizer = AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer.padding_side = "left"  # generation appends on the right: real tokens must end there
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (path / "adapter_config.json").is_file():  # a LoRA checkpoint: its base with the adapter, unmerged
        from models.train.checkpoint import load_trained_model

        model = load_trained_model(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
        )
    model.to(device).eval()
    for field, value in (decoding or {}).items():  # the registered model's overrides of generation_config.json
        setattr(model.generation_config, field, value)
    return TransformersBackend(model=model, tokenizer=tokenizer, path=path, fingerprint=stamp)
