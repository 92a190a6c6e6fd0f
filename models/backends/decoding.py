"""A checkpoint's ``generation_config.json`` settings that change which tokens come out.

transformers merges a model's generation config into every ``generate`` call, so a checkpoint
that ships ``repetition_penalty: 1.1`` or ``no_repeat_ngram_size: 3`` decodes differently from
the plain greedy or sampled decoding w2s asks for. w2s passes its own ``do_sample`` always, and
``temperature``, ``top_p`` and ``top_k`` whenever it samples: those of the file never count. Every
other decoding field applies as the file says, unless the model was registered with an override
(``w2sctl model register --decoding KEY=VALUE`` or ``--decoding neutral``), which the loader
writes over the loaded model's generation config.

Light on purpose (no torch, no transformers): ``model register`` reads it before anything loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Fields that change the decoded tokens when set, with the value that leaves decoding plain.
NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
}
# Fields w2s always passes itself (do_sample always; the rest whenever it samples; greedy ignores them).
W2S_OWNED: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


def read_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's generation_config.json as a dict ({} when it has none or it is not JSON)."""
    try:
        config = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def decoding_changes(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(applied, overridden): the generation config's fields that move decoding away from plain,
    split into those transformers applies to w2s's generations and those w2s's own settings
    replace."""
    applied = {k: config[k] for k in NEUTRAL if k in config and config[k] != NEUTRAL[k]}
    overridden = {k: config[k] for k in W2S_OWNED if k in config and config[k] is not None and config[k] != W2S_OWNED[k]}
    return applied, overridden


def parse_overrides(items: tuple[str, ...] | list[str], config: dict[str, Any]) -> dict[str, Any]:
    """``--decoding`` values: ``KEY=VALUE`` (a decoding field, the value as YAML) or ``neutral``
    (every field the generation config applies, back to plain). ValueError naming the item."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        if item.strip() == "neutral":
            overrides.update({k: NEUTRAL[k] for k in decoding_changes(config)[0]})
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--decoding {item!r}: expected KEY=VALUE or neutral")
        if key in W2S_OWNED:
            raise ValueError(f"--decoding {key}: w2s sets {key} itself on every generation (round and strategy "
                             "settings), so the model cannot override it")
        if key not in NEUTRAL:
            raise ValueError(f"--decoding {key}: not a decoding setting; expected one of {', '.join(NEUTRAL)}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def describe(applied: dict[str, Any], overridden: dict[str, Any], overrides: dict[str, Any]) -> str | None:
    """One line for ``model register``: what the file changes, what w2s replaces, what the
    registration overrides; None when the file changes nothing and nothing is overridden."""
    def listed(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items())

    kept = {k: v for k, v in applied.items() if k not in overrides}
    parts = []
    if kept:
        parts.append(f"{listed(kept)} (applied to every generation; override with --decoding KEY=VALUE or "
                     "--decoding neutral)")
    if overrides:
        parts.append(f"overridden at registration: {listed(overrides)}")
    if overridden:
        parts.append(f"{listed(overridden)} (w2s's own sampling settings win)")
    return "generation_config.json changes decoding: " + "; ".join(parts) if parts else None


# The decoding fields vLLM's SamplingParams applies exactly as transformers does: field ->
# SamplingParams argument (both penalise the prompt's and the output's tokens alike). Refused,
# though vLLM has a near namesake: ``min_p`` (vLLM filters by it before top_p, transformers after),
# ``min_new_tokens`` (vLLM's ``min_tokens`` also holds back stop strings). The rest of NEUTRAL has
# no vLLM equivalent (n-gram blocking, beams, typical/epsilon/eta cutoffs, suppression by token
# ids, a prompt-inclusive ``min_length``).
VLLM_SAMPLING: dict[str, str] = {"repetition_penalty": "repetition_penalty"}


class UnsupportedDecoding(ValueError):
    """A decoding setting the vllm backend cannot apply as transformers would."""


def vllm_sampling(config: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SamplingParams arguments that decode as the transformers backend does with this
    generation config and a registration's ``--decoding`` overrides (written over it). A field that
    changes decoding but has no vLLM equivalent is refused, naming it and the override that makes
    it plain: vLLM would otherwise decode differently without a word."""
    merged = {**config, **(overrides or {})}
    applied = decoding_changes(merged)[0]
    unsupported = [k for k in applied if k not in VLLM_SAMPLING]
    if unsupported:
        fixes = " ".join(f"--decoding {k}={'null' if NEUTRAL[k] is None else NEUTRAL[k]}" for k in unsupported)
        raise UnsupportedDecoding(
            f"generation_config.json sets {', '.join(f'{k}={applied[k]}' for k in unsupported)}, which the vllm "
            f"backend cannot apply as transformers does (no vLLM equivalent): use the transformers backend, or "
            f"register the model with {fixes} (or --decoding neutral) to decode without it")
    return {VLLM_SAMPLING[k]: v for k, v in applied.items()}
