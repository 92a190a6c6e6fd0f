"""Which backend loads a checkpoint, and one small cache of loaded backends per worker process.

A checkpoint's backend is named explicitly (``backend="transformers"``: what a worker setting or a
round config passes) or recognised from the directory: a replay manifest means ``replay``, anything
else is a Hugging Face layout loaded by ``transformers``. Each backend has a light check of its
directory (no torch) and a loader imported only when a checkpoint is loaded.
"""

from __future__ import annotations

import gc
import importlib
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
    (transformers: ``trust_remote_code``, ``device``, ``dtype``)."""
    path = check_checkpoint_dir(path, backend).resolve()
    _, module = BACKENDS[backend_for(path, backend)]
    return importlib.import_module(module).load(path, **options)


class ModelCache:
    """Loaded backends of one process, by resolved path: reused while the checkpoint's
    fingerprint is unchanged, reloaded when it changed, least recently used evicted beyond
    ``capacity``.

    ``loads`` counts the loads done (a benchmark checks one load per model per worker). Eviction
    drops the cache's reference and frees CUDA memory; a caller still holding the backend keeps
    it alive until it lets go.
    """

    def __init__(self, capacity: int = 2, **options: Any):  # a weak and a strong model side by side on one worker
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.options = options  # for every load: device, dtype
        self.loads = 0
        self._models: OrderedDict[tuple[str, str, bool], ModelBackend] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, *, backend: str | None = None,
            trust_remote_code: bool = False) -> ModelBackend:
        resolved = str(check_checkpoint_dir(path, backend).resolve())
        key = (resolved, backend_for(resolved, backend), trust_remote_code)
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached.fingerprint == fingerprint(resolved):
                self._models.move_to_end(key)
                return cached
            if cached is not None:  # rewritten in place: drop the stale copy before loading
                self._evict(key)
            loaded = load_backend(resolved, backend=key[1], trust_remote_code=trust_remote_code, **self.options)
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

    def _evict(self, key: tuple[str, str, bool]) -> None:
        del self._models[key]
        gc.collect()
        torch = sys.modules.get("torch")  # loaded by a backend that needed it; else nothing to free
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


_default: ModelCache | None = None
_default_pid: int | None = None


def default_cache() -> ModelCache:
    """This process's cache (a fresh one after a fork: CUDA state does not survive fork)."""
    global _default, _default_pid
    if _default is None or _default_pid != os.getpid():
        _default, _default_pid = ModelCache(), os.getpid()
    return _default
