"""Shared pieces of the training entry points: DeepSpeed behind one small object.

The entry points (``sft.py``, ``preference.py``) keep the algorithm in view: config, data, model,
optimiser, one loop. Everything DeepSpeed needs — process group, engine config, ZeRO, mixed
precision, gathering a full state dict and writing a Hugging Face directory atomically — lives in
:class:`DeepSpeedStrategy` (the shape of OpenRLHF's ``utils/deepspeed/deepspeed.py``, much smaller).

A run is started by ``models/train/launch.py`` (DeepSpeed's launcher; one rank on one node without
it), which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.tracking import Run, TrackingTarget, end_open_runs, flatten, open_run
from models.train.options import LoraOptions, Offload, SFTHyperParameters

# Name of the file with w2s metadata (lineage, resolved config) inside every checkpoint directory.
W2S_METADATA_FILE = "w2s.json"
# The shipped ZeRO-2 and ZeRO-3 templates; "auto" values are filled from the job's config.
DS_CONFIG_DIR = Path(__file__).with_name("ds_configs")
# Where each rank writes its exit record (``rank<N>.json``) when the job names a status_dir.
RANK_RECORD = "rank{rank}.json"


class TrainingRunSpec(BaseModel):
    """Where rank 0 logs the job: a tracking target, the run it nests under, and its name and tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["mlflow", "tensorboard"]
    uri: str
    experiment: str = "w2s"
    parent_run_id: str | None = None
    run_name: str = "train"
    tags: dict[str, str] = Field(default_factory=dict)


class TrainJobConfig(SFTHyperParameters):
    """The fields every training job file has; each method adds its own and its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- inputs and outputs --------------------------------------------------------------------
    base_model: Path = Field(description="Hugging Face directory of the model to start from")
    train_file: Path = Field(description="JSONL training rows")
    output_dir: Path = Field(description="where the checkpoint appears, complete, at the end")
    lineage: dict[str, Any] = Field(
        default_factory=dict, description="copied into the checkpoint's w2s.json (parent, round…)"
    )

    # -- optimisation: learning rate, epochs, batch, sequence length... (SFTHyperParameters) ----
    seed: int = Field(0, description="model-independent PRNGs and the data order")

    # -- model ---------------------------------------------------------------------------------
    prompt_format: Literal["plain", "chat"] = Field(
        "plain", description="how each prompt becomes the text the model reads (models.prompts.model_text), "
        "as the model is asked when it generates")
    lora: LoraOptions | None = Field(None, description="train LoRA adapters only (PEFT); None: full")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")

    # -- system --------------------------------------------------------------------------------
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (2: shard optimiser)")
    offload_optimizer: Offload = Field("none", description="ZeRO optimiser state on cpu (ZeRO-Offload)")
    offload_params: Offload = Field("none", description="ZeRO-3 only: parameters on cpu")
    log_every: int = Field(10, ge=1, description="optimiser steps between JSON loss lines")

    # -- resume and supervision ----------------------------------------------------------------
    state_dir: Path | None = Field(
        None, description="DeepSpeed state saved here every save_every_steps; resumed from if present"
    )
    save_every_steps: int = Field(0, ge=0, description="optimiser steps between saved states; 0: never")
    status_dir: Path | None = Field(None, description="each rank writes rank<N>.json here as it exits")

    # -- experiment tracking (models.tracking) ---------------------------------------------------
    tracking: TrainingRunSpec | None = Field(None, description="rank 0 logs each step to this run; None: off")

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params: needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.save_every_steps and self.state_dir is None:
            raise ValueError("save_every_steps: set, but no state_dir to save the state in")
        return self

    @classmethod
    def from_json_file(cls, path: str | Path):
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"job file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"job file {path}: not JSON ({exc})") from None
        return cls.model_validate(raw)

    def check_inputs(self) -> None:
        """Fail before any work if an input is missing or the output would be overwritten."""
        if not (self.base_model / "config.json").is_file() and not (self.base_model / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"base_model: {self.base_model} is not a Hugging Face model directory "
                "(no config.json there, nor an adapter_config.json)"
            )
        if not self.train_file.is_file():
            raise FileNotFoundError(f"train_file: {self.train_file} does not exist")
        if self.output_dir.exists():
            raise FileExistsError(f"output_dir: {self.output_dir} already exists")



def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then linear
    decay to 0 at ``total_steps`` (the schedule of HF ``get_linear_schedule_with_warmup``).

    ``step`` counts optimiser steps already taken (0 for the first update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # +1: the first update does not run at lr = 0
    remaining = total_steps - step
    span = max(1, total_steps - warmup_steps)
    return max(0.0, remaining / span)


def resume_batches(
    loader: Any, set_epoch: Callable[[int], None], *, epochs: int, skip: int
) -> Any:
    """Yield ``(epoch, index, batch)`` from micro-batch number ``skip`` on (0: from the start).

    ``skip`` counts micro-batches a saved state already trained (optimiser steps × accumulation
    steps). The epoch is ``skip // len(loader)``, so a state saved exactly at the end of an epoch
    resumes at the first batch of the next one, and the remaining epochs still train (a resume
    must not exit 0 having trained nothing). ``set_epoch`` reshuffles as the first run did.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        return
    first_epoch = skip // per_epoch
    for epoch in range(first_epoch, epochs):
        set_epoch(epoch)
        first = skip - epoch * per_epoch if epoch == first_epoch else 0
        for index, batch in enumerate(loader):
            if index >= first:
                yield epoch, index, batch


def extension_build_root(root: str, install: str) -> str:
    """The folder under ``root`` for the ops built by one install (see use_own_extension_builds)."""
    name = "w2s-" + hashlib.sha256(install.encode()).hexdigest()[:12]
    return root if Path(root).name == name else os.path.join(root, name)  # set once: never nested


def use_own_extension_builds() -> str:
    """Point TORCH_EXTENSIONS_DIR at a folder of this install's own.

    DeepSpeed compiles an op on a rank's first use (on CPU its shared-memory collective) into
    ``TORCH_EXTENSIONS_DIR/<op>``, with a build command that spells out the paths of its sources and
    of torch. Two venvs, or one venv reached by two paths (a second checkout whose ``.venv`` links to
    the first's), built into the same folder: each build replaced the other's, and the next launch
    from the other side rebuilt it (65-110 s on 2 cores, seen four times in one evening). Keyed by
    those paths, each install keeps its build."""
    import importlib.util

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()  # torch's own default, which adds the python and CUDA versions below
    spec = importlib.util.find_spec("deepspeed")
    install = "|".join([spec.origin if spec and spec.origin else "", torch.__file__, torch.__version__,
                        str(torch.version.cuda), sys.version])
    os.environ["TORCH_EXTENSIONS_DIR"] = path = extension_build_root(root, install)
    return path


def skip_inference_collective_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce when the process group starts.

    DeepSpeed's torch backend builds the ``deepspeed_shm_comm`` op on the CPU accelerator in its
    constructor: 20-80 s of g++ on a rank's first launch in an install, and a compiler the machine
    must have. Only ``inference_all_reduce`` (DeepSpeed inference, AutoTP) uses it; training
    all-reduces through ``torch.distributed`` (gloo), and without the op ``inference_all_reduce``
    falls back to the same. ``None`` is what DeepSpeed itself returns where the op is not
    compatible, and on a GPU accelerator, which has no such builder, it returns ``None`` anyway."""
    import importlib

    # Not `import deepspeed.comm.torch as …`: the package's `torch` attribute is torch itself.
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(torch_backend, "build_shm_op"):
        torch_backend.build_shm_op = lambda: None


def temporary_dir_for(out_dir: Path) -> Path:
    """Where a checkpoint is written before the rename that publishes it."""
    return out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")


class DeepSpeedStrategy:
    """The few verbs a training loop needs from DeepSpeed.

    ``setup_distributed()`` once per process, ``setup(model, lr=...)`` to get the engine,
    then per micro-batch ``backward(loss)`` and ``step()``; ``save_hf(...)`` at the end, on every
    rank (ZeRO-3 gathers the weights collectively; only rank 0 writes).
    """

    def __init__(
        self,
        *,
        zero_stage: int = 2,  # ZeRO-2: optimiser state and gradients sharded, weights replicated
        micro_batch_size: int = 8,  # examples per rank per forward pass
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 1.0,  # clipping as in most SFT recipes (TRL, OpenRLHF)
        seed: int = 0,
        offload_optimizer: str = "none",  # "cpu": ZeRO-Offload of the optimiser state
        offload_params: str = "none",  # "cpu": ZeRO-3 parameter offload
    ) -> None:
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        if gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps: must be >= 1, got {gradient_accumulation_steps}"
            )
        for name, value in (("offload_optimizer", offload_optimizer), ("offload_params", offload_params)):
            if value not in ("none", "cpu"):
                raise ValueError(f"{name}: must be 'none' or 'cpu', got {value!r}")
        if offload_params != "none" and zero_stage != 3:
            raise ValueError(f"offload_params: needs zero_stage 3, got {zero_stage}")
        self.zero_stage = zero_stage
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.lora = False  # set by prepare_model: the checkpoint is then an adapter
        self.engine: Any = None  # deepspeed.DeepSpeedEngine after setup()
        self.run: Run = Run(None)  # the job's tracking run (rank 0, when the job file asks for one)

    # -- process group -------------------------------------------------------------------------

    @staticmethod
    def use_cuda() -> bool:
        return torch.cuda.is_available()

    def setup_distributed(self) -> None:
        """Join the process group the launcher described in the environment; seed every PRNG."""
        use_own_extension_builds()  # before DeepSpeed compiles or loads an op
        skip_inference_collective_build()
        import deepspeed
        from deepspeed.runtime.utils import set_random_seed

        if self.use_cuda():
            torch.cuda.set_device(self.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda() else "gloo")
        set_random_seed(self.seed)
        if os.environ.get("W2S_DETERMINISTIC") == "1":  # set with the pinned kernels: models/determinism.py
            torch.use_deterministic_algorithms(True)

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        if dist.is_initialized():
            return dist.get_world_size()
        return int(os.environ.get("WORLD_SIZE", "1"))

    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.use_cuda() else torch.device("cpu")

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python float over all ranks (for logging)."""
        return self.all_reduce_sum(value) / self.world_size

    def all_reduce_sum(self, value: float) -> float:
        import torch.distributed as dist

        if not dist.is_initialized() or self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def peak_memory_mb(self) -> float:
        """The largest peak memory of any rank: CUDA memory allocated on GPUs, resident set on CPU."""
        if self.use_cuda():
            mine = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            import resource

            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        import torch.distributed as dist

        if not dist.is_initialized() or self.world_size == 1:
            return round(mine, 1)
        tensor = torch.tensor([mine], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return round(float(tensor.item()), 1)

    def print0(self, *args: Any) -> None:
        if self.is_rank0():
            print(*args, flush=True)

    def log_json(self, **record: Any) -> None:
        """One JSON object per line on rank 0's stdout: what ``models.train.launch.parse_progress`` reads."""
        if self.is_rank0():
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    # -- engine --------------------------------------------------------------------------------

    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config: the shipped template of this ZeRO stage, "auto" values filled."""
        return render_ds_config(
            self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_grad_norm=self.max_grad_norm,
            # bf16 on GPUs that have it; CPU: fp32 (gloo has no bf16 reductions worth using)
            bf16=self.use_cuda() and torch.cuda.is_bf16_supported(),
            offload_optimizer=self.offload_optimizer,
            offload_params=self.offload_params,
            pin_memory=self.use_cuda(),
        )

    @classmethod
    def for_job(cls, cfg: TrainJobConfig) -> DeepSpeedStrategy:
        return cls(
            zero_stage=cfg.zero_stage,
            micro_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            seed=cfg.seed,
            offload_optimizer=cfg.offload_optimizer,
            offload_params=cfg.offload_params,
        )

    def prepare_model(
        self, model: Any, *, lora: LoraOptions | None = None, gradient_checkpointing: bool = False
    ) -> Any:
        """Gradient checkpointing and LoRA adapters (PEFT), before the engine wraps the model."""
        if gradient_checkpointing:
            # non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's partitioned weights
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is None:
            return model
        from peft import LoraConfig, get_peft_model

        if gradient_checkpointing:
            model.enable_input_require_grads()
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. no module matches target_modules
            raise ValueError(f"lora.target_modules: {exc}") from None
        self.lora = True
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.print0(f"lora: {trainable} of {total} parameters train (r {lora.r}, {lora.target_modules})")
        return model

    def setup(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_lambda: Callable[[int], float] | None = None,
    ) -> Any:
        """Wrap ``model`` in a DeepSpeed engine with a plain ``torch.optim.AdamW``.

        A client optimiser avoids JIT-building DeepSpeed's fused/CPU Adam ops, and ZeRO supports
        it. Biases and norm weights (1-D parameters) get no weight decay. ``lr_lambda`` maps the
        number of optimiser steps taken to a multiplier of ``lr``; DeepSpeed steps it at each
        gradient-accumulation boundary.
        """
        import deepspeed

        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [  # empty groups left out: ZeRO drops them, and the schedule counts groups
            group
            for group in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if group["params"]
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
        scheduler = (
            torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config()
        )
        return self.engine

    def start(self, cfg: TrainJobConfig, batches_per_epoch: int) -> tuple[Any, int, dict[str, Any]]:
        """The training setup both methods share: the base model in full precision (DeepSpeed
        casts to bf16 on GPUs, with an fp32 master copy under ZeRO), gradient checkpointing and
        LoRA, AdamW with linear warm-up then linear decay to 0 over every update, and the latest
        saved state when there is one. Returns (engine, total updates, resumed client state)."""
        from models.train.checkpoint import is_lora_checkpoint, load_trained_model

        model = load_trained_model(cfg.base_model, dtype=torch.float32)
        if is_lora_checkpoint(cfg.base_model):  # a LoRA student: train from its merged weights
            model = model.merge_and_unload()
        model.config.use_cache = False
        model = self.prepare_model(model, lora=cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
        total_steps = max(1, batches_per_epoch * cfg.epochs // cfg.gradient_accumulation_steps)
        warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
        engine = self.setup(
            model,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            lr_lambda=partial(linear_warmup_decay, warmup_steps=warmup_steps, total_steps=total_steps),
        )
        self.open_tracking(cfg)
        return engine, total_steps, self.load_state(cfg.state_dir) or {}

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Step the engine (optimiser and schedule move only at accumulation boundaries).

        Returns True when this micro-step ended an optimiser step.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return bool(boundary)

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimiser step, before clipping (DeepSpeed's)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- experiment tracking -------------------------------------------------------------------

    def open_tracking(self, cfg: TrainJobConfig) -> None:
        """Rank 0 opens the job's run (nested under its round's) and logs the job's config once."""
        if cfg.tracking is None or not self.is_rank0():
            return
        spec = cfg.tracking
        self.run = open_run(TrackingTarget(spec.backend, spec.uri, spec.experiment), name=spec.run_name,
                            parent_run_id=spec.parent_run_id, tags=spec.tags)
        self.run.log_params(flatten(cfg.model_dump(mode="json", exclude={"tracking", "lineage"})))

    def log_step(self, record: dict[str, Any]) -> None:
        """A logged step: one JSON line for the supervisor, and the step's figures to the run."""
        self.log_json(**record)
        if self.is_rank0():
            self.run.log_metrics({k: v for k, v in record.items() if k not in ("step", "total_steps")},
                                 step=record["step"])

    def finish_tracking(self, metrics: Mapping[str, Any]) -> None:
        """The job's totals (as ``final/<name>``) and the run's end."""
        self.run.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=metrics.get("steps"))
        self.run.end("FINISHED")

    # -- resumable state -----------------------------------------------------------------------

    def save_state(self, state_dir: Path, step: int, client_state: Mapping[str, Any], keep: int = 2) -> None:
        """Save the engine's full state (weights, optimiser, schedule) as ``step<N>``; collective.

        DeepSpeed writes ``latest`` last, so a state is only ever resumed from once complete.
        The oldest states beyond ``keep`` are removed by rank 0.
        """
        state_dir = Path(state_dir)
        self.engine.save_checkpoint(str(state_dir), tag=f"step{step}", client_state={"step": step, **client_state})
        self.barrier()
        if self.is_rank0():
            tags = sorted(
                (p for p in state_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                key=lambda p: int(p.name[4:]),
            )
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_state(self, state_dir: Path | None) -> dict[str, Any] | None:
        """Load the latest saved state into the engine; its client state, or None if there is none."""
        if state_dir is None or not (Path(state_dir) / "latest").is_file():
            return None
        path, client_state = self.engine.load_checkpoint(str(state_dir))
        if path is None:
            raise RuntimeError(f"state_dir: {state_dir} names a state that could not be loaded")
        return dict(client_state or {})

    # -- saving --------------------------------------------------------------------------------

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) weights on rank 0, ``None`` elsewhere. Collective under ZeRO-3."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        if not self.is_rank0():
            return None
        module = getattr(model, "module", model)  # the engine or the bare model
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save_hf(
        self,
        model: Any,
        tokenizer_source: str | Path,
        out_dir: str | Path,
        *,
        lineage: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a Hugging Face directory (safetensors, tokenizer, ``w2s.json``) to ``out_dir``.

        ``model`` is the engine from :meth:`setup` or the bare model. The tokenizer files are
        copied byte for byte from ``tokenizer_source`` (the base model's directory): a re-save
        by the transformers installed here can change their format (class names, dropped
        vocab.json/merges.txt, an added pad token) so that older serving stacks cannot read
        them, while they read the base. With LoRA the directory is a plain PEFT adapter: the
        adapter, ``adapter_config.json`` naming the base by absolute path, no ``config.json``
        (which would make transformers look for full weights). Call on every rank: under
        ZeRO-3 the weights are gathered collectively; only rank 0 writes. It writes everything
        under ``<out>.tmp-<pid>`` and renames it to ``<out>`` only when complete, so a reader never
        sees a half-written checkpoint; the temporary directory is removed if anything fails.
        ``extra_files`` maps file names to JSON-serialisable objects written beside the weights.
        """
        out_dir = Path(out_dir)
        module = getattr(model, "module", model)
        state_dict = self.full_state_dict(model)

        if self.is_rank0():
            if out_dir.exists():
                raise FileExistsError(f"output_dir: {out_dir} already exists; refusing to overwrite")
            tmp = temporary_dir_for(out_dir)
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                # safetensors is the default (and, from transformers 5, the only) format. A PEFT
                # model saves only its adapter from the full state dict.
                if self.lora:
                    for adapter in module.peft_config.values():
                        adapter.base_model_name_or_path = str(Path(adapter.base_model_name_or_path).resolve())
                module.save_pretrained(tmp, state_dict=state_dict)
                from models.train.checkpoint import copy_tokenizer_files

                copy_tokenizer_files(tokenizer_source, tmp)
                metadata = {
                    "format": 1,
                    "created_at": datetime.now(timezone.utc).isoformat(),
                    "lineage": dict(lineage or {}),
                    "config": dict(config or {}),
                    "world_size": self.world_size,
                    "zero_stage": self.zero_stage,
                    "lora": self.lora,
                }
                _write_json(tmp / W2S_METADATA_FILE, metadata)
                for name, payload in (extra_files or {}).items():
                    _write_json(tmp / name, payload)
                os.replace(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.barrier()
        return out_dir


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_ds_config(
    zero_stage: int,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    bf16: bool,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    pin_memory: bool = False,
) -> dict[str, Any]:
    """The shipped template for ``zero_stage`` (ZeRO-3: ``zero3.json``, others: ``zero2.json``
    with the stage set), with every "auto" filled and unused offload sections removed."""
    template = DS_CONFIG_DIR / ("zero3.json" if zero_stage == 3 else "zero2.json")
    config = json.loads(template.read_text(encoding="utf-8"))
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["gradient_clipping"] = max_grad_norm
    config["bf16"]["enabled"] = bf16
    zero = config["zero_optimization"]
    zero["stage"] = zero_stage
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_params)):
        if key not in zero:
            continue
        if device == "none" or zero_stage == 0:
            del zero[key]
        else:
            zero[key] = {**zero[key], "device": device, "pin_memory": pin_memory and zero[key].get("pin_memory", False)}
    return config


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    """Parameters of the whole model and the trainable ones (ZeRO-3 shards count at full size)."""
    total = trainable = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return {"parameters": total, "trainable_parameters": trainable}


def rank_identity() -> dict[str, Any]:
    """Who this rank is, from the launcher's environment (CROSS_RANK: the node's index)."""
    import socket

    env = os.environ
    return {
        "rank": int(env.get("RANK", "0")),
        "local_rank": int(env.get("LOCAL_RANK", "0")),
        "node_rank": int(env.get("CROSS_RANK", "0")),
        "world_size": int(env.get("WORLD_SIZE", "1")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def leave_process_group() -> None:
    """The rank's last job done: leave the process group before the interpreter exits. A gloo group still
    open at exit can abort its process ("terminate called without an active exception", seen once
    in a two-rank job after its checkpoint was saved); DeepSpeed's launcher then kills the ranks
    still finishing, and the job fails for nothing. The barrier keeps a fast rank from tearing
    the group down under a slow one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_rank(train: Callable[[Any], Any], cfg: TrainJobConfig) -> None:
    """Run ``train(cfg)`` on this rank and leave an exit record in ``cfg.status_dir``.

    The supervisor checks every rank's record, not only the launcher's exit status: a multi-node
    launcher can exit 0 when a remote rank died. A rank killed by a signal leaves no record.
    """
    record = rank_identity()
    started = time.time()
    try:
        train(cfg)
    except BaseException as exc:
        record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000], out_of_memory=is_out_of_memory(exc))
        end_open_runs("FAILED")
        raise
    else:
        record.update(status="ok")
    finally:
        if cfg.status_dir is not None and "status" in record:
            record["seconds"] = round(time.time() - started, 3)
            cfg.status_dir.mkdir(parents=True, exist_ok=True)
            path = cfg.status_dir / RANK_RECORD.format(rank=record["rank"])
            tmp = path.with_suffix(".tmp")
            _write_json(tmp, record)
            os.replace(tmp, path)
