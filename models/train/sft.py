"""Supervised fine-tuning of the strong student on trusted reasoning chains.

Launched by DeepSpeed, one process per rank (see ``models/train/launch.py``); on one node::

    python -m deepspeed.launcher.launch --world_info=<base64 {"localhost": [0, 1]}> \\
        --master_port P --module --no_local_rank models.train.sft --config job.json

or, for one rank, ``python -m models.train.sft --config job.json`` with RANK=0, WORLD_SIZE=1, ….

The job file is an :class:`SFTConfig` as JSON. Reads top to bottom like nanoGPT's ``train.py``:
config, data, model, optimiser, one loop, save. The loss is the causal-LM cross-entropy on the
response tokens only (prompt tokens are labelled -100); each response ends with the tokenizer's
eos token so the student learns to stop. Rank 0 prints one JSON line per logged step,
``{"step", "loss", "epoch", "lr", "grad_norm", "tokens_per_s", "total_steps"}``, for the supervisor
(and to the job's tracking run, when the job file names one), and at
the end writes the checkpoint (safetensors, tokenizer, ``w2s.json``, ``metrics.json``) atomically.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from models.jsonl import iter_jsonl
from models.prompts import model_text
from models.train.common import DeepSpeedStrategy, TrainJobConfig, count_parameters, leave_process_group, resume_batches, run_rank

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)


class SFTConfig(TrainJobConfig):
    """One SFT job, as written to the job file by the train task."""

    train_file: Path = Field(description='JSONL, one {"prompt": str, "response": str} per line')


# -- data ----------------------------------------------------------------------------------------


def load_rows(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file; errors name the file, line and field."""
    rows = [(row["prompt"], row["response"]) for _, row in iter_jsonl(path, strings=("prompt", "response"))]
    if not rows:
        raise ValueError(f"train_file: {path} has no rows")
    return rows


def build_example(tokenizer: Any, prompt: str, response: str, max_seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels for one (prompt, response) pair.

    Prompt and response are tokenized separately and concatenated, so the boundary of the loss
    mask is exact: labels are -100 on every prompt token and equal the ids on the response and
    the appended eos. The prompt gets the tokenizer's special tokens (e.g. BOS), the response
    none. Longer than ``max_seq_len``: cut on the right (the eos may go; then the model is not
    taught to stop at the cut).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; SFT needs one to end responses")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: Sequence[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest example: pad ids, attention 0, labels -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- the job ---------------------------------------------------------------------------------------


def train(cfg: SFTConfig) -> dict[str, Any]:
    """Run one SFT job on this rank; returns the metrics (written by rank 0 with the checkpoint)."""
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoTokenizer

    cfg.check_inputs()
    strategy = DeepSpeedStrategy.for_job(cfg)
    strategy.setup_distributed()

    # data: tokenize everything up front (SFT sets are thousands of rows, not millions)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels come from build_example, not pads
    examples = [build_example(tokenizer, model_text(tokenizer, p, cfg.prompt_format), r, cfg.max_seq_len)
                for p, r in load_rows(cfg.train_file)]
    dropped = sum(all(t == IGNORE_INDEX for t in e["labels"]) for e in examples)
    examples = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
    if not examples:
        raise ValueError(f"max_seq_len: {cfg.max_seq_len} leaves no response token in any row")
    sampler = DistributedSampler(
        examples, num_replicas=strategy.world_size, rank=strategy.rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        examples,
        batch_size=cfg.micro_batch_size,
        sampler=sampler,
        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
    )

    engine, total_steps, resumed = strategy.start(cfg, len(loader))
    # resumed: the latest saved state (weights, optimiser, schedule, losses logged so far)
    step = int(resumed.get("step", 0))  # optimiser updates taken
    logged: list[dict[str, Any]] = list(resumed.get("logged", []))
    strategy.print0(
        f"sft: {len(examples)} examples ({dropped} dropped: no response token fits), "
        f"world size {strategy.world_size}, {total_steps} updates, zero stage {cfg.zero_stage}"
        + (f"; resumed at update {step}" if resumed else "")
    )

    # the loop
    window: list[float] = []  # micro-batch losses since the last log line
    tokens = 0  # non-pad tokens seen by this rank
    t0 = time.perf_counter()
    logged_at, tokens_at_log = t0, 0  # when the last log line was written, and the tokens seen by then
    engine.train()
    skip = step * cfg.gradient_accumulation_steps
    for epoch, i, batch in resume_batches(loader, sampler.set_epoch, epochs=cfg.epochs, skip=skip):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss  # mean over this micro-batch's response tokens
        strategy.backward(loss)
        window.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        lr = strategy.current_lr()  # the rate this update uses (the schedule moves in step())
        if not strategy.step():
            continue
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            record = {
                "step": step,
                "loss": strategy.all_reduce_mean(sum(window) / len(window)),
                "epoch": round(epoch + (i + 1) / len(loader), 4),
                "lr": lr,
                "grad_norm": strategy.grad_norm(),
                "tokens_per_s": strategy.all_reduce_sum(tokens - tokens_at_log) / (time.perf_counter() - logged_at),
                "total_steps": total_steps,
            }
            strategy.log_step(record)
            logged.append(record)
            logged_at, tokens_at_log = time.perf_counter(), tokens
            window = []
        if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps:
            strategy.save_state(cfg.state_dir, step, {"logged": logged})
            strategy.log_json(event="state_saved", step=step, epoch=round(epoch + (i + 1) / len(loader), 4))
    seconds = time.perf_counter() - t0
    all_tokens = strategy.all_reduce_sum(tokens)

    # save: every rank takes part (ZeRO-3 gathers), rank 0 writes
    metrics = {
        "initial_loss": logged[0]["loss"] if logged else None,
        "final_loss": logged[-1]["loss"] if logged else None,
        "steps": step,
        "resumed_from_step": int(resumed.get("step", 0)),
        "steps_this_run": step - int(resumed.get("step", 0)),
        "epochs": cfg.epochs,
        "examples": len(examples),
        "examples_dropped": dropped,
        "world_size": strategy.world_size,
        "train_seconds": round(seconds, 3),
        "tokens": int(all_tokens),
        "tokens_per_s": round(all_tokens / seconds, 1) if seconds > 0 else None,
        "peak_memory_mb": strategy.peak_memory_mb(),
        **count_parameters(engine.module),
    }
    strategy.save_hf(
        engine,
        cfg.base_model,
        cfg.output_dir,
        lineage=cfg.lineage,
        config={"method": "sft", **cfg.model_dump(mode="json", exclude={"tracking"})},
        extra_files={"metrics.json": metrics},
    )
    strategy.log_json(event="saved", output_dir=str(cfg.output_dir), **metrics)
    strategy.finish_tracking(metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="SFT job file (JSON)")
    # DeepSpeed's launcher appends --local_rank unless told --no_local_rank; LOCAL_RANK is in env.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run_rank(train, SFTConfig.from_json_file(args.config))
    leave_process_group()


if __name__ == "__main__":
    main()
