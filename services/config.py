"""One typed config per kind of round, validated with clear errors. (The service's settings: services/settings.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.train.options import LoraOptions, PreferenceHyperParameters, SFTHyperParameters
from services.contracts.graph import GRID_FIELDS, expand_grid
from services.errors import InputError

QUEUES = ("weak", "strong", "train", "control")


class ConfigError(InputError):
    """A user-facing configuration error; the message names the field or file."""


# --- tracking (a round's own, or the settings' default: services/settings.py) ---------------------


class TrackingConfig(BaseModel):
    """Experiment tracking: where rounds and training jobs log their runs (models.tracking)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["mlflow", "tensorboard", "none"] = Field("none", description="none: no tracking")
    uri: str | None = Field(None, description="an MLflow tracking URI or a TensorBoard log directory; "
                            "null: the embedded store under W2S_HOME (mlflow.db, tensorboard/)")
    experiment: str = Field("w2s", min_length=1, description="MLflow experiment the runs go in")


# --- round configs -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(1024, ge=1, le=32768, description="ref: 1024 for GSM8K, 2048 for MATH")
    batch_size: int = Field(16, ge=1, le=4096, description="prompts per generate() call")
    chunk_size: int = Field(256, ge=1, le=100_000, description="questions per generation job")
    backend: Literal["transformers", "vllm"] | None = Field(
        None, description="engine for the round's generation; None: the worker's (W2S_BACKEND) or recognised")


class TrainingConfig(SFTHyperParameters):
    """Fine-tuning: the hyper-parameters (learning rate, epochs, batch, sequence length; defined
    once in ``models/train/options.py``, shared with the job file) and how the run is spread."""

    zero_stage: Literal[2, 3] = Field(2, description="2: optimiser state and gradients sharded; 3: weights too")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload: optimiser state in CPU memory")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 only: weights in CPU memory")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    lora: LoraOptions | None = Field(None, description="train LoRA adapters (PEFT) instead of every weight")
    # None: the train worker's --gpus, else every GPU it sees, else 1 (CPU). A hostfile in the
    # worker's settings (W2S_TRAIN_HOSTFILE) overrides it with its slots.
    num_ranks: int | None = Field(None, ge=1, le=4096, description="DeepSpeed ranks on this node")
    save_every_steps: int = Field(100, ge=0, le=10**7, description="optimiser steps between resumable states; 0: never")
    timeout_s: float = Field(24 * 3600, gt=0, description="the launch is killed after this")
    # Each setting of the grid (every combination of its values) is a candidate of its own,
    # trained by its own job and named after its values (round1-hybrid-lr1e-4); the gate picks
    # the best on the eval (dev) split. Null: one candidate per variant, with the fields above.
    grid: dict[str, list[int | float]] | None = Field(
        None, description="hyper-parameter → values to try, e.g. {learning_rate: [1e-4, 3e-4], epochs: [1, 2]}")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> TrainingConfig:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params: needs zero_stage 3, got {self.zero_stage}")
        return self

    @model_validator(mode="after")
    def _grid_of_known_values(self) -> TrainingConfig:
        """Only the hyper-parameters a grid can name (GRID_FIELDS) that this stage's training
        has, each a non-empty list of values its own field accepts (bounds from models/train/options.py)."""
        if self.grid is None:
            return self
        if not self.grid:
            raise ValueError("grid: give at least one hyper-parameter, or leave grid out")
        fields = type(self).model_fields
        for name, values in self.grid.items():
            if name not in GRID_FIELDS or name not in fields:
                known = ", ".join(f for f in GRID_FIELDS if f in fields)
                raise ValueError(f"grid.{name}: not a hyper-parameter a grid can vary here (one of {known})")
            if not values:
                raise ValueError(f"grid.{name}: needs at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"grid.{name}: each value at most once, got {values}")
            for value in values:
                try:
                    type(self).model_validate({**self.model_dump(exclude={"grid"}), name: value})
                except ValidationError as exc:
                    raise ValueError(f"grid.{name}: {value!r}: {exc.errors()[0]['msg']}") from None
        if len(expand_grid(self.grid)) > MAX_GRID_SETTINGS:
            raise ValueError(f"grid: {len(expand_grid(self.grid))} settings, at most {MAX_GRID_SETTINGS}")
        return self

    def settings(self) -> list[dict[str, int | float]]:
        """The grid's settings in a fixed order ([{}]: no grid, the one setting of the fields above)."""
        return expand_grid(self.grid) if self.grid else [{}]


MAX_GRID_SETTINGS = 64


class PromotionConfig(_Strict):
    # A candidate is promoted only if it beats the current student by more than this
    # (accuracy points as a fraction); 0 means "strictly better".
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)


STRATEGIES = ("cot", "sc", "leco")


class StrategyConfig(_Strict):
    """How a model answers: cot (greedy, one answer), sc (self-consistency: n samples, majority),
    leco (greedy, then rethinks from the least confident step; ALGORITHMS.md "LECO")."""

    strategy: Literal["cot", "sc", "leco"] = "cot"
    samples: int = Field(10, ge=1, le=256, description="sc: answers sampled per question (ref: 10)")
    temperature: float = Field(0.7, gt=0.0, le=10.0, description="sc: sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sc: nucleus sampling")
    token_prob: Literal["top5", "full"] = Field("top5", description="step scores: chosen-token probability "
                                                "renormalised over the top-5 logits (ref) or the full softmax")
    max_rethinks: int = Field(3, ge=0, le=16, description="leco: rethinks after the original (ref: 3)")
    rethink: Literal["divert", "greedy"] = Field(
        "divert", description="leco: divert = greedy, but turned away from the dropped step at its least confident "
        "token; greedy = plain greedy (usually writes the dropped step again)")
    reuse_cache: bool = Field(True, description="leco: serve the prompt and kept steps from the KV cache")
    backend: Literal["transformers", "vllm"] | None = Field(
        None, description="engine for this voter's answers; None: the round's generation.backend")

    def label(self) -> str:
        """The name evaluations are stored under: cot, sc@10, leco."""
        return f"sc@{self.samples}" if self.strategy == "sc" else self.strategy


class EvalConfig(_Strict):
    """The labelled set that decides promotion, and how the gate answers it: the same method as
    ``w2sctl eval run --strategy S --shots N`` with the round's generation budget, stored under
    the same label (services/evaluation.py)."""

    dataset: str = Field(description="a labelled dataset name: the dev split, which decides promotion")
    limit: int | None = Field(None, ge=1, description="evaluate on the first N questions only")
    # Picking among candidates on the split one then reports inflates the reported figure: the
    # report_on split is evaluated the same way, shown next to the dev figures, and never decides.
    report_on: str | None = Field(None, description="a held-out labelled dataset (the test split): reported, "
                                  "never used to decide")
    report_limit: int | None = Field(None, ge=1, description="report on the first N report_on questions only")
    # cot, zero-shot: greedy on the reference's prompt, as the weak-to-strong reference evaluates.
    strategy: StrategyConfig = Field(StrategyConfig(), description="how the gate answers: cot, sc or leco")
    shots: int = Field(0, ge=0, le=4, description="step-by-step demonstrations in the gate's prompt (0: zero-shot)")

    @model_validator(mode="after")
    def _report_on_is_another_split(self) -> EvalConfig:
        if self.report_on is not None and self.report_on == self.dataset:
            raise ValueError(f"report_on: {self.report_on!r} is the eval dataset itself: name a held-out split")
        if self.report_limit is not None and self.report_on is None:
            raise ValueError("report_limit: needs report_on")
        return self


class VoterStrategies(_Strict):
    weak: StrategyConfig = StrategyConfig()
    strong: StrategyConfig = StrategyConfig()


class VoteConfig(_Strict):
    min_step_score: float | None = Field(
        None, description="drop an agreed question when either voter's lowest step score is below this (off: null)")


_DEFAULT_VARIANTS: list[Literal["weak", "icl", "hybrid"]] = ["weak", "icl"]


class SFTRoundConfig(_Strict):
    """Stage I: two voters answer the pool, agreed answers train the student."""

    stage: Literal["sft"] = "sft"
    iteration: int = Field(1, ge=1, le=10, description="1: weak + strong-ICL voters; 2: two fine-tuned students")
    weak: str = Field(description="registered model answering zero-shot (the first voter)")
    strong: str = Field(description="registered model answering with in-context demonstrations (the second voter)")
    student: str | None = Field(None, description="model to fine-tune; default: the strong voter")
    pool: str = Field(description="the unlabelled question pool")
    pool_limit: int | None = Field(None, ge=1, description="use the first N pool questions only")
    eval: EvalConfig
    demonstrations: int = Field(4, ge=0, le=64, description="ref: K = 4 weak (question, response) pairs")
    variants: list[Literal["weak", "icl", "hybrid"]] = Field(
        default_factory=lambda: _DEFAULT_VARIANTS.copy(), min_length=1, description="training sets to fine-tune on"
    )
    seed: int = 0
    generation: GenerationConfig = GenerationConfig()
    strategies: VoterStrategies = Field(VoterStrategies(), description="how each voter answers: cot, sc or leco")
    vote: VoteConfig = VoteConfig()
    training: TrainingConfig = TrainingConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig | None = Field(None, description="experiment tracking; null: the settings' default")

    @model_validator(mode="after")
    def _distinct_variants(self) -> SFTRoundConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: each variant at most once, got {self.variants}")
        return self


class WeakSFTRoundConfig(_Strict):
    """Fine-tune a weak model on a labelled set (question + gold solution), as GSM8K train_1."""

    stage: Literal["weak-sft"] = "weak-sft"
    weak: str = Field(description="registered model to fine-tune")
    train: str = Field(description="a labelled dataset with gold solutions")
    train_limit: int | None = Field(None, ge=1, description="train on the first N questions only")
    eval: EvalConfig
    seed: int = 0
    generation: GenerationConfig = GenerationConfig()
    training: TrainingConfig = TrainingConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig | None = Field(None, description="experiment tracking; null: the settings' default")


class SamplingConfig(_Strict):
    samples: int = Field(10, ge=2, le=256, description="answers the student samples per question (ref: 10)")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="ref: 1.0")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="ref: 1.0")
    # Costs one sampled evaluation (samples × eval questions) for the student and each candidate:
    # a sweep of many settings turns it off; it never decides anything.
    pass_at_k: bool = Field(True, description="report pass@k (k: samples) of the student and each candidate on the eval set")


class PairRulesConfig(_Strict):
    floor: float = Field(0.6, ge=0.0, le=1.0, description="skip questions whose majority share is below this (ref: 0.6)")
    tau: float = Field(0.8, ge=0.0, le=1.0, description="weak-as-rejected needs a majority share of at least this (ref: 0.8)")
    pairs_per_question: int = Field(1, ge=1, le=3, description="ref: 1 for GSM8K, 3 for MATH")

    @model_validator(mode="after")
    def _tau_not_below_floor(self) -> PairRulesConfig:
        if self.tau < self.floor:
            raise ValueError(f"tau ({self.tau}) must not be below floor ({self.floor})")
        return self


class PreferenceTrainingConfig(PreferenceHyperParameters, TrainingConfig):
    """DPO / ORPO: the method and its defaults (``PreferenceHyperParameters``), spread as SFT's."""


class PreferenceRoundConfig(_Strict):
    """Stage II: the student samples the pool; its confidence picks pairs against the weak model's answers."""

    stage: Literal["preference"] = "preference"
    student: str = Field(description="a promoted (or candidate) stage I checkpoint, M_plus")
    weak: str = Field(description="the weak model whose original stage I responses form one side of each pair")
    pool: str = Field(description="the question pool of the stage I round")
    pool_limit: int | None = Field(None, ge=1)
    eval: EvalConfig
    seed: int = 0
    sampling: SamplingConfig = SamplingConfig()
    pairs: PairRulesConfig = PairRulesConfig()
    generation: GenerationConfig = GenerationConfig()
    training: PreferenceTrainingConfig = PreferenceTrainingConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig | None = Field(None, description="experiment tracking; null: the settings' default")


RoundConfig = Annotated[SFTRoundConfig | WeakSFTRoundConfig | PreferenceRoundConfig, Field(discriminator="stage")]


class _RoundConfigEnvelope(BaseModel):
    config: RoundConfig


AnyRoundConfig = Union[SFTRoundConfig, WeakSFTRoundConfig, PreferenceRoundConfig]


def parse_round_config(data: dict[str, Any], source: str = "round config") -> AnyRoundConfig:
    """Validate a round config; errors name each offending field."""
    if "stage" not in data:
        raise ConfigError(f"{source}: field 'stage' is required (sft, weak-sft or preference)")
    try:
        return _RoundConfigEnvelope(config=data).config
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + _describe(exc)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of config fields; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def load_round_config_file(path: Path, overrides: dict[str, Any]) -> AnyRoundConfig:
    return parse_round_config(_merge(read_config_file(path), overrides), source=str(path))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        # Drop the envelope and the union tag pydantic adds to the location.
        loc = [str(p) for p in error["loc"] if p not in ("config", "sft", "weak-sft", "preference")]
        field = ".".join(loc) or "config"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{field}: {message}")
    return "; ".join(parts)
