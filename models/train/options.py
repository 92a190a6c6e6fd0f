"""Training options shared by the round config (``services/config.py``) and the job file
(``models/train/common.py``), defined here once: the round config's ``training`` section and the
job file inherit the same fields with the same defaults and bounds. Pydantic only: importing this
module does not import torch.
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


class SFTHyperParameters(BaseModel):
    """The optimisation settings of a supervised fine-tuning run. The reference published none;
    these defaults suit full fine-tuning of a 7B-70B student. Small models want a larger learning
    rate and shorter sequences, which their configs set explicitly (the demo does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="peak AdamW learning rate, after warm-up")
    epochs: int = Field(2, ge=1, le=100, description="passes over the training file")
    micro_batch_size: int = Field(4, ge=1, le=1024, description="examples per rank per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="micro-batches per update")
    # 1024: a GSM8K prompt and solution fit with room; MATH's longest solutions are cut.
    max_seq_len: int = Field(1024, ge=16, le=131072, description="prompt + response tokens; longer is cut")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="fraction of updates warming up")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decay on matrices (not norms)")


class PreferenceHyperParameters(SFTHyperParameters):
    """DPO / ORPO: the method and the defaults that differ from SFT's (TRL's where the reference
    published none)."""

    loss: Literal["dpo", "orpo"] = Field("dpo", description="dpo: against a frozen reference; orpo: none")
    # 0.1: ALGORITHMS.md stage II (DPO β); also TRL's DPOConfig and ORPOConfig default (ORPO's λ).
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO β (KL strength) or ORPO λ (odds-ratio weight)")
    # 1e-6: TRL's DPOConfig/ORPOConfig default for full fine-tuning.
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="peak AdamW learning rate, after warm-up")
    epochs: int = Field(1, ge=1, le=100, description="passes over the pairs (alignment-handbook DPO: 1)")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="fraction of updates warming up")
