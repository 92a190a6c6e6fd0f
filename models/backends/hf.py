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

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from models.backends.base import Completion, GenerationParams, StepOptions
from models.backends.checkpoints import check_remote_code, fingerprint
from models.backends.tokens import Continued, Row, TokenStepGenerator, count_tokens, decode, stop_tail, token_pieces, trim
from models.stopping import StopSignal, current_signal


@dataclass
class TransformersBackend:
    model: Any  # a transformers PreTrainedModel with a causal LM head, in eval mode
    tokenizer: Any  # left padding, pad token set
    path: Path  # resolved
    fingerprint: str
    name: str = "transformers"

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        sampling: dict[str, Any] = dict(do_sample=False)
        if params.do_sample:  # transformers' default top-k of 50 is turned off
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        num_samples = params.num_samples
        lengths = self.count_tokens(prompts)
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
        ``return_token_probs`` keeps every step's logits until the batch ends (steps × sequences ×
        vocabulary floats): lower ``batch_size`` for long generations."""
        model, tokenizer = self.model, self.tokenizer
        device = model.device
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        width = inputs["input_ids"].shape[1]
        stop = [StopOnText(tokenizer, stop_strings, width)] if stop_strings else []
        stop.append(StopOnSignal(signal))
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
        signal.check()  # a generate cut short by the signal: its sequences are not answers
        new_tokens = out.sequences[:, width:]
        probs = None
        if return_token_probs:
            probs = _chosen_probs(out.logits, new_tokens, return_token_probs)
        input_counts = inputs["attention_mask"].sum(dim=1).repeat_interleave(num_samples).tolist()
        end_ids = self._end_ids()

        completions = []
        for row, ids in enumerate(new_tokens.tolist()):
            ids, text = trim(tokenizer, ids, end_ids, stop_strings)
            count = count_tokens(tokenizer, ids, text)
            completion = Completion(text=text, input_tokens=input_counts[row], output_tokens=count)
            if probs is not None:
                completion.token_texts = token_pieces(tokenizer, ids[:count], text)
                completion.token_probs = probs[row, :count].tolist()
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
        comparison); models whose cache is not a ``DynamicCache`` of plain key/value tensors fall
        back to that."""
        return TokenStepGenerator(self.tokenizer, prompts, options, functools.partial(self._continue, options))

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
        past = _assemble_cache(rows, cached, left) if left else None
        stop = [StopOnText(tokenizer, stop_strings, width)] if stop_strings else []
        signal = current_signal()
        stop.append(StopOnSignal(signal))
        diverts = [row.divert for row in rows]
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), past_key_values=past,
            max_new_tokens=options.max_new_tokens, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList(stop),
            logits_processor=LogitsProcessorList([_DivertFromDroppedStep(diverts, width)] if any(diverts) else []),
            return_dict_in_generate=True, output_logits=True,
        )
        signal.check()
        new_tokens = out.sequences[:, width:]
        probs = _chosen_probs(out.logits, new_tokens, options.token_probs)
        cache = out.past_key_values if options.reuse_cache and _plain_cache(out.past_key_values) else None
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
                                     probs=probs[i, :count].tolist(), encoded=fresh[i], state=row_cache,
                                     cached=row_cached))
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


def _assemble_cache(rows: list[Row], cached: list[int], left: int) -> DynamicCache:
    """One batch cache of ``left`` columns: each row's cached keys/values right-aligned, zeros
    (masked out) before them."""
    donor = next(row.state for row, c in zip(rows, cached) if c)
    cache = DynamicCache()
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


def _plain_cache(cache) -> bool:
    """A DynamicCache whose every layer holds whole key/value tensors (no sliding window, no offload)."""
    return isinstance(cache, DynamicCache) and all(
        type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)
        for layer in cache.layers)


# --- loading ---------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 elsewhere (CPU, older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load(
    path: Path,
    *,
    trust_remote_code: bool = False,
    remote_code_allowed: Collection[str] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> TransformersBackend:
    """Load a checked local checkpoint for generation: eval mode, on ``device``, left-padding tokenizer."""
    check_remote_code(path, trust_remote_code, remote_code_allowed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # workers log their own progress; a bar only clutters job logs
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
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
    return TransformersBackend(model=model, tokenizer=tokenizer, path=path, fingerprint=stamp)
