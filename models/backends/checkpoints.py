"""Checkpoint directories in the Hugging Face layout (what the transformers backend loads, and what
a vLLM backend would load too): their checks, the remote-code rule and the fingerprint.

Light on purpose (no torch, no transformers): the CLI checks a path before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from pathlib import Path

from models.hf_layout import ADAPTER_CONFIG, TOKENIZER_FILES, adapter_base

SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


def check_hf_dir(path: Path) -> None:
    """Raise CheckpointError unless ``path`` holds config.json, safetensors weights and a tokenizer,
    or is a PEFT adapter directory (adapter config, adapter weights, tokenizer) whose base passes."""
    if (path / ADAPTER_CONFIG).is_file():
        _check_adapter_dir(path)
        return
    if not (path / "config.json").is_file():
        raise CheckpointError(path, "config.json is missing")
    if not _weight_files(path):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise CheckpointError(
                path,
                f"only pickled PyTorch weights ({', '.join(pickled)}); w2s loads safetensors only "
                "(re-save the model with save_pretrained(..., safe_serialization=True))",
            )
        raise CheckpointError(path, f"no *.safetensors weight files (nor {SAFETENSORS_INDEX})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(path, f"no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    check_weights(path)


def check_weights(path: Path) -> dict[str, list[int]]:
    """Every weight file complete and the shapes those files declare consistent with config.json.
    Returns tensor name → shape. Reads headers only (safetensors maps the file; no tensor is loaded).

    safetensors itself refuses a file whose header does not cover exactly its size (a truncated
    copy, an interrupted download); a sharded checkpoint's index must name shards that exist and
    hold the tensors it lists; the embedding and output matrices must be vocab_size × hidden_size
    and the layers numbered as many as num_hidden_layers, so weights from another model are refused.
    """
    from safetensors import SafetensorError, safe_open

    index = path / SAFETENSORS_INDEX
    files = sorted(path.glob("*.safetensors"))
    expected: dict[str, str] = {}
    if index.is_file():
        try:
            expected = dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(path, f"{SAFETENSORS_INDEX} is not a safetensors index: {exc}") from None
        missing = sorted({shard for shard in expected.values() if not (path / shard).is_file()})
        if missing:
            raise CheckpointError(path, f"{SAFETENSORS_INDEX} names shard(s) that are missing: {', '.join(missing)}")
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as weights:
                for name in weights.keys():
                    shapes[name] = list(weights.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            size = file.stat().st_size if file.exists() else 0
            raise CheckpointError(path, f"{file.name} ({size} bytes) is incomplete or corrupt: {exc} "
                                        "(copy or download it again)") from None
    absent = sorted(name for name in expected if name not in shapes)
    if absent:
        raise CheckpointError(path, f"{SAFETENSORS_INDEX} lists {len(absent)} tensor(s) no shard holds, "
                                    f"e.g. {absent[0]}")
    if (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        _check_shapes(path, shapes)
    return shapes


def _check_adapter_dir(path: Path) -> None:
    if not (path / "adapter_model.safetensors").is_file():
        raise CheckpointError(path, f"{ADAPTER_CONFIG} but no adapter_model.safetensors (w2s loads safetensors only)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(path, f"no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    check_weights(path)
    try:
        base = adapter_base(path)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    if not base.is_dir():
        raise CheckpointError(path, f"the base model of this adapter, {base}, is not a directory here")
    try:
        check_hf_dir(base)
    except CheckpointError as exc:
        raise CheckpointError(path, f"the base model of this adapter does not load: {exc}") from None


# config.json keys of the sizes the weights must have, across model families (Llama/Qwen, GPT-2).
_VOCAB_KEYS, _HIDDEN_KEYS, _LAYER_KEYS = ("vocab_size",), ("hidden_size", "n_embd", "d_model"), \
    ("num_hidden_layers", "n_layer", "num_layers")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "lm_head.weight")


def _check_shapes(path: Path, shapes: dict[str, list[int]]) -> None:
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise CheckpointError(path, f"config.json is not JSON: {exc}") from None
    config = {**config.get("text_config", {}), **config}

    def first(keys: tuple[str, ...]) -> int | None:
        return next((config[k] for k in keys if isinstance(config.get(k), int)), None)

    vocab, hidden, layers = first(_VOCAB_KEYS), first(_HIDDEN_KEYS), first(_LAYER_KEYS)
    for name, shape in shapes.items():
        if (name.endswith(_EMBEDDING_SUFFIXES) and vocab and hidden and len(shape) == 2
                and sorted(shape) != sorted([vocab, hidden])):
            raise CheckpointError(path, f"tensor {name} is {shape[0]}×{shape[1]} but config.json says vocab_size "
                                        f"{vocab}, hidden size {hidden}: the weights belong to another model")
    numbered = {int(match.group(1)) for name in shapes if (match := _LAYER_NUMBER.search(name))}
    if layers and numbered and len(numbered) != layers:
        raise CheckpointError(path, f"the weights hold {len(numbered)} layer(s) but config.json says {layers}: "
                                    "the weights belong to another model or are incomplete")


_LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


# Models whose own Python code may run at load time, by name (a directory's name) or full path,
# comma-separated in this variable (services.settings: trust_remote_code). Set by an operator who
# has read that code; empty by default.
REMOTE_CODE_ENV = "W2S_TRUST_REMOTE_CODE"


def check_remote_code(path: Path, trust_remote_code: bool, allowed: Collection[str] = ()) -> None:
    """trust_remote_code runs Python shipped with the checkpoint: only for models an operator
    allowed (`allowed`: names or paths, from the settings)."""
    if not trust_remote_code:
        return
    resolved = Path(path).resolve()
    if resolved.name not in allowed and str(resolved) not in allowed:
        raise CheckpointError(path, f"trust_remote_code was asked for, but this model is not allowed to run its "
                                    f"own code: add its name ({resolved.name}) to {REMOTE_CODE_ENV}")


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    index = path / SAFETENSORS_INDEX
    return files + [index] if index.is_file() else files


def fingerprint(path: str | os.PathLike) -> str:
    """A short hash of the resolved path and the size and mtime of config, weight and tokenizer
    files: it changes when the checkpoint is rewritten in place."""
    path = Path(path).resolve()
    parts = [str(path)]
    names = ["config.json", ADAPTER_CONFIG, "generation_config.json", *TOKENIZER_FILES]
    for file in [path / name for name in names] + _weight_files(path):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
