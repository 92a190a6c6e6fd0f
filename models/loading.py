"""Local checkpoints → (model, tokenizer), and one small model cache per worker process.

Only local directories are loaded (``local_files_only=True``), only safetensors weights
(``use_safetensors=True``: a pickled ``pytorch_model.bin`` can run code on load), and
``trust_remote_code`` stays off unless the caller allows it for a named model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.replay import is_replay_dir, load_replay

# Workers log their own progress; a per-load progress bar only clutters job logs.
# (Set when the first model loads: torch and transformers are imported then, not with this
# module, so that commands that only need CheckpointError start in a fraction of a second.)
if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it holds config.json, safetensors weights and a tokenizer."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such directory")
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    if is_replay_dir(path):  # a model-free replay checkpoint (models/replay.py)
        return path
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
    return path


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
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        _check_shapes(path, shapes)
    return shapes


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
        if name.endswith(_EMBEDDING_SUFFIXES) and vocab and hidden and len(shape) == 2 and sorted(shape) != sorted([vocab, hidden]):
            raise CheckpointError(path, f"tensor {name} is {shape[0]}×{shape[1]} but config.json says vocab_size "
                                        f"{vocab}, hidden size {hidden}: the weights belong to another model")
    numbered = {int(match.group(1)) for name in shapes if (match := _LAYER_NUMBER.search(name))}
    if layers and numbered and len(numbered) != layers:
        raise CheckpointError(path, f"the weights hold {len(numbered)} layer(s) but config.json says {layers}: "
                                    "the weights belong to another model or are incomplete")


_LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


# Models whose own Python code may run at load time, by name (a directory's name) or full path,
# comma-separated. Set by an operator who has read that code; empty by default.
REMOTE_CODE_ENV = "W2S_TRUST_REMOTE_CODE"


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """trust_remote_code runs Python shipped with the checkpoint: only for models an operator allowed."""
    if not trust_remote_code:
        return
    allowed = {item.strip() for item in os.environ.get(REMOTE_CODE_ENV, "").split(",") if item.strip()}
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
    names = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    for file in [path / name for name in names] + _weight_files(path):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a causal LM head, in eval mode
    tokenizer: Any  # left padding, pad token set
    path: Path  # resolved
    fingerprint: str


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 elsewhere (CPU, older GPUs)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a local checkpoint for generation: eval mode, on ``device``, left-padding tokenizer."""
    path = check_checkpoint_dir(path).resolve()
    if is_replay_dir(path):
        return load_replay(path)
    check_remote_code(path, trust_remote_code)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, fingerprint=stamp)


class ModelCache:
    """Loaded models of one process, by resolved path: reused while the checkpoint's fingerprint
    is unchanged, reloaded when it changed, least recently used evicted beyond ``capacity``.

    ``loads`` counts the loads done (a benchmark checks one load per model per worker). Eviction
    drops the cache's reference and frees CUDA memory; a caller still holding the LoadedModel
    keeps it alive until it lets go.
    """

    def __init__(
        self,
        capacity: int = 2,  # a weak and a strong model side by side on one worker
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self.loads = 0
        self._models: OrderedDict[tuple[str, bool], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, *, trust_remote_code: bool = False) -> LoadedModel:
        key = (str(check_checkpoint_dir(path).resolve()), trust_remote_code)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached.fingerprint == fingerprint(key[0]):
                self._models.move_to_end(key)
                return cached
            if cached is not None:  # rewritten in place: drop the stale copy before loading
                self._evict(key)
            loaded = load_model(
                key[0], trust_remote_code=trust_remote_code, device=self.device, dtype=self.dtype
            )
            self.loads += 1
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._evict(next(iter(self._models)))
            return loaded

    def clear(self) -> None:
        with self._lock:
            for key in list(self._models):
                self._evict(key)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, path: str | os.PathLike) -> bool:
        resolved = str(Path(path).resolve())
        return any(key[0] == resolved for key in self._models)

    def _evict(self, key: tuple[str, bool]) -> None:
        del self._models[key]
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_default: ModelCache | None = None
_default_pid: int | None = None


def default_cache() -> ModelCache:
    """This process's cache (a fresh one after a fork: CUDA state does not survive fork)."""
    global _default, _default_pid
    if _default is None or _default_pid != os.getpid():
        _default, _default_pid = ModelCache(), os.getpid()
    return _default
