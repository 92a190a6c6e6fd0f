"""Generation as the rest of w2s asks for it: the same calls whichever backend holds the model.

``generate`` validates the request once (``GenerationParams``) and hands it to the backend;
``step_generator`` does the same for LECO's step generator. What a ``Completion`` holds is
described in ``models.backends.base``; each backend's module says how it batches and seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.backends.base import Completion, GenerationParams, ModelBackend, StepGenerator, StepOptions
from models.prompts import STOP_STRINGS


def generate(
    backend: ModelBackend,
    prompts: Sequence[str],
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
    """``num_samples`` completions per prompt, in the order of ``prompts`` (see ``GenerationParams``)."""
    params = GenerationParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, num_samples=num_samples, stop_strings=tuple(stop_strings),
                              batch_size=batch_size, seed=seed, return_token_probs=return_token_probs)
    if not prompts:
        return []
    return backend.generate(list(prompts), params)


def step_generator(
    backend: ModelBackend,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    token_probs: str = "top5",
    stop_strings: Sequence[str] = STOP_STRINGS,
    reuse_cache: bool = True,
    divert: bool = True,
) -> StepGenerator:
    """The generator behind ``models.leco.leco_solve`` for these prompts (see ``StepOptions``)."""
    options = StepOptions(max_new_tokens=max_new_tokens, batch_size=batch_size, token_probs=token_probs,
                          stop_strings=tuple(stop_strings), reuse_cache=reuse_cache, divert=divert)
    return backend.step_generator(prompts, options)
