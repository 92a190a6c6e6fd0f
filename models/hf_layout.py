"""File names of the Hugging Face checkpoint layout, shared by the backends (which load checkpoints)
and training (which writes them). Light: no torch, no transformers."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Every file a published checkpoint's tokenizer may consist of: what a trained or merged checkpoint
# copies byte for byte from its base (a re-save by another transformers version may not load elsewhere).
TOKENIZER_FILE_NAMES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                        "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: Path) -> Path:
    """The base model directory a PEFT adapter names (``base_model_name_or_path``), resolved
    against the adapter's directory when relative; ValueError naming the file when it names none."""
    path = Path(path)
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): {exc}") from None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return Path(base) if Path(base).is_absolute() else (path / base).resolve()


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer files of ``path`` carry a chat template (light: reads JSON, loads no tokenizer)."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
