"""Model backends: one protocol (``base.ModelBackend``), engines behind it (``hf``: transformers,
``replay``: recorded responses), the loader that picks one, and the token-level code the engines
share (``tokens``). Importing this package loads no engine (no torch)."""

from models.backends.base import (
                                  TOKEN_PROB_MODES,
                                  CallStats,
                                  Completion,
                                  GenerationParams,
                                  ModelBackend,
                                  StepGenerator,
                                  StepOptions,
)
from models.backends.checkpoints import CheckpointError
from models.backends.loader import (
                                  BACKENDS,
                                  DEFAULT_BACKEND,
                                  ModelCache,
                                  backend_for,
                                  check_checkpoint_dir,
                                  configure_default_cache,
                                  declared_context_length,
                                  default_cache,
                                  describe,
                                  in_format,
                                  load_backend,
)

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "TOKEN_PROB_MODES", "CallStats", "CheckpointError", "Completion",
    "GenerationParams", "ModelBackend", "ModelCache", "StepGenerator", "StepOptions", "backend_for",
    "check_checkpoint_dir", "configure_default_cache", "declared_context_length", "default_cache", "describe",
    "in_format", "load_backend",
]
