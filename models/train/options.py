"""Training options shared by the round config (``services/config.py``) and the job file
(``models/train/common.py``). Pydantic only: importing this module does not import torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The reference work's LoRA targets: every attention and MLP projection of a Llama block.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Offload = Literal["none", "cpu"]


class LoraOptions(BaseModel):
    """LoRA through PEFT: only the adapters train; the checkpoint is the adapter (plus config,
    tokenizer and w2s.json), loadable as is or merged with ``w2sctl checkpoint merge``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1, le=4096, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="module names that get adapters (default: q, k, v, o, gate, up, down projections)",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not name or not name.replace("_", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"target_modules: not module names: {bad}")
        return value
