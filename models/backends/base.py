"""The model-backend protocol: the few verbs the rest of w2s needs from a loaded checkpoint.

A backend is a checkpoint loaded for generation by one engine (``transformers`` today, ``replay``
for model-free tests and benchmarks; vLLM is meant to be the next). What lies above the backends
is shared and never asks which backend it holds: the front ``models.generation.generate``, step
scores (``models.leco.score_steps``), the LECO loop (``models.leco.leco_solve``), the strategies
(``services.evaluation``). What token-level engines share (decoding, the stop-string cut, token
counts, token pieces, the LECO cut into kept tokens) is ``models.backends.tokens``.

docs/design-notes.md ("Model backends") says why the protocol looks this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module stays light (the CLI imports it to start)
    from models.leco import Attempt, RethinkRequest

TOKEN_PROB_MODES = ("top5", "full")


@dataclass
class Completion:
    """One generated sequence, the same for every backend.

    - ``text``: the generated text decoded (special tokens skipped) up to the first eos / pad
      token, then cut just before the first stop string. Not stripped: ``prompts.clean_response``
      does that.
    - ``output_tokens``: the generated tokens that lie wholly within ``text``: the largest n such
      that decoding the first n generated tokens gives a prefix of ``text``. Not counted: eos and
      padding, the stop string's tokens, and a token that straddles the cut (e.g. " Question",
      whose leading space is kept but which is mostly stop string).
    - ``input_tokens``: the prompt's real tokens, padding excluded.
    - ``token_texts`` / ``token_probs`` (only with ``return_token_probs``, and only from a backend
      that has token probabilities; None otherwise): one entry per counted token.
      ``token_texts`` are the pieces each token adds to ``text`` when decoding incrementally (a
      token that ends inside an unfinished multi-byte character adds ``""``, the next one the
      whole character); the last piece runs on to the cut, taking the kept part of a straddling
      token, so ``"".join(token_texts) == text`` whenever a token was counted. ``token_probs`` is
      the chosen token's probability under the model's raw logits at that step (not the
      temperature/top-p processed scores): ``"full"`` the full softmax, ``"top5"`` renormalised
      over the top-5 logits, as LECO's reference does (a sampled token outside the top 5 gets its
      share against those 5: ``tokens.chosen_token_prob``). So 0 < full <= top5 <= 1.
    """

    text: str
    input_tokens: int
    output_tokens: int
    token_texts: list[str] | None = None
    token_probs: list[float] | None = None


@dataclass(frozen=True)
class GenerationParams:
    """What one batched generation asks for; validated here, once, for every backend.

    ``batch_size`` counts sequences per engine call (prompts × samples, at least one prompt).
    Greedy decoding gives one completion per prompt, so it needs ``num_samples == 1``. Sampling
    uses ``temperature`` and ``top_p`` only (no top-k); other settings in the checkpoint's
    generation_config.json (a repetition penalty, say) still apply. ``seed``: the same prompts
    with the same parameters give the same samples on the same hardware and software.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 16
    seed: int | None = None
    return_token_probs: str | None = None  # one of TOKEN_PROB_MODES, or None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_samples < 1 or (self.num_samples > 1 and not self.do_sample):
            raise ValueError(f"num_samples must be 1 for greedy decoding and >= 1, got {self.num_samples}")
        if self.return_token_probs not in (None, *TOKEN_PROB_MODES):
            raise ValueError(f"return_token_probs must be one of {TOKEN_PROB_MODES} or None")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class StepOptions:
    """How a LECO step generator decodes: greedily, with step scores' token probabilities.

    ``reuse_cache``: serve the prompt and the kept steps from what the engine computed before
    (a KV cache, a prefix cache) rather than encoding them again. ``divert``: a greedy rethink
    is turned away from the dropped step at its least confident token (``leco.doubted_token``);
    otherwise it is plain greedy (and usually writes the dropped step again).
    """

    max_new_tokens: int
    batch_size: int = 16
    token_probs: str = "top5"
    stop_strings: tuple[str, ...] = ()
    reuse_cache: bool = True
    divert: bool = True

    def __post_init__(self) -> None:
        if self.token_probs not in TOKEN_PROB_MODES:
            raise ValueError(f"token_probs must be one of {TOKEN_PROB_MODES}, got {self.token_probs!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")


@dataclass(frozen=True)
class CallStats:
    """One batched call of a step generator: what it encoded and generated."""

    questions: int
    input_tokens: int  # tokens the model actually encoded (cached prefixes are not)
    reencode_tokens: int  # tokens it would have encoded without the cache (prompt + kept text, every time)
    output_tokens: int
    cache_lost: int = 0  # rows whose reusable state the engine could not keep: their next rethink re-encodes


class StepGenerator(Protocol):
    """The generator behind ``models.leco.leco_solve`` for one group of questions, with its bill."""

    calls: list[CallStats]

    def __call__(self, requests: list[RethinkRequest]) -> list[Attempt]: ...


@runtime_checkable
class ModelBackend(Protocol):
    """A checkpoint loaded for generation. Every verb takes and returns text (and token counts):
    the token ids, the caches and the engine stay inside the backend.

    Long calls (``generate``, a step generator's call) check the current stop signal
    (``models.stopping``) between batches and, where the engine allows, between tokens: a
    cancelled job's generation raises ``Stopped`` at one of those points.
    """

    name: str  # "transformers", "replay": what a worker or a round config names to choose it
    path: Path  # resolved
    fingerprint: str  # changes when the checkpoint is rewritten in place (checkpoints.fingerprint)

    @property
    def context_length(self) -> int | None:
        """Most tokens the model reads (prompt + generated); None when it has no such limit."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each text is as a prompt (special tokens included, as generation reads it)."""
        ...

    def formatted(self, prompt_format: str) -> ModelBackend:
        """This backend reading every prompt in ``prompt_format`` (``plain`` or ``chat``:
        ``models.prompts.model_text``), sharing the loaded model; ValueError when it cannot."""
        ...

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        """``params.num_samples`` completions per prompt, in the order of ``prompts`` (non-empty)."""
        ...

    def step_generator(self, prompts: Sequence[str], options: StepOptions) -> StepGenerator:
        """A LECO generator for these prompts: a rethink continues the kept text as the model's
        own answer, reusing what was computed for it when ``options.reuse_cache``."""
        ...

