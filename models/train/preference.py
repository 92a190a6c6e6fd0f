"""Stage II: preference optimisation of M_plus on the pairs it picked, with DPO or ORPO.

Launched by DeepSpeed, one process per rank (see ``models/train/launch.py``); on one node::

    python -m deepspeed.launcher.launch --world_info=<base64 {"localhost": [0, 1]}> \\
        --master_port P --module --no_local_rank models.train.preference --config job.json

or, for one rank, ``python -m models.train.preference --config job.json`` with RANK=0, WORLD_SIZE=1, ….

The job file is a :class:`PreferenceConfig` as JSON; the training file has one
``{"prompt", "chosen", "rejected"}`` per line. Reads like ``sft.py``: config, data, model,
optimiser, one loop, save. Each pair is tokenized as two SFT examples (``sft.build_example``:
prompt labelled -100, response + eos), and a micro-batch of B pairs is one forward pass over 2B
rows padded on the right, chosen rows first (the layout of ``models/train/losses.py``).

- DPO (Rafailov et al. 2023): the reference model is the starting policy, frozen. Its
  log-probs are computed for every pair once, before the first update (one pass, no grad, by the
  same engine), so no second model is ever held in memory.
- ORPO (Hong et al. 2024): no reference model; SFT loss on the chosen responses plus β times the
  odds-ratio loss on mean response log-probs.

Rank 0 prints one JSON line per logged step, ``{"step", "loss", "epoch", "lr", "total_steps",
"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"}`` (TRL's
``rewards/margins`` etc.; for ORPO the rewards are β times mean log-probs, as TRL's ORPO logs
them), and at the end writes the checkpoint (safetensors, tokenizer, ``w2s.json``,
``metrics.json``) atomically. ``metrics.json`` holds ``initial_margin`` and ``final_margin``: the
mean over all training pairs of (chosen - rejected) summed response log-prob under the policy
before and after training, each from one no-grad pass.
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
from models.train.losses import dpo_loss, orpo_loss, sequence_logps
from models.train.options import PreferenceHyperParameters
from models.train.sft import IGNORE_INDEX, build_example, collate

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class PreferenceConfig(PreferenceHyperParameters, TrainJobConfig):
    """One DPO or ORPO job, as written to the job file by the train task. The method (loss, beta)
    and its optimisation defaults come from ``PreferenceHyperParameters``."""

    base_model: Path = Field(description="Hugging Face directory of the policy to start from (M_plus)")
    train_file: Path = Field(description='JSONL, one {"prompt", "chosen", "rejected"} per line')


# -- data ----------------------------------------------------------------------------------------


def load_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from a JSONL file; errors name the file, line and field."""
    pairs = [(row["prompt"], row["chosen"], row["rejected"]) for _, row in iter_jsonl(path, strings=PAIR_FIELDS)]
    if not pairs:
        raise ValueError(f"train_file: {path} has no rows")
    return pairs


def build_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, max_seq_len: int) -> dict[str, Any]:
    """The two SFT examples of one pair (same prompt tokens; labels only on each response + eos)."""
    return {
        "chosen": build_example(tokenizer, prompt, chosen, max_seq_len),
        "rejected": build_example(tokenizer, prompt, rejected, max_seq_len),
    }


def has_response(example: dict[str, list[int]]) -> bool:
    return any(t != IGNORE_INDEX for t in example["labels"])


def collate_pairs(pairs: Sequence[dict[str, Any]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B rows padded on the right: chosen rows 0..B-1, rejected rows B..2B-1.

    ``index`` (B,) is each pair's position in the training set (to look up reference log-probs).
    """
    batch = collate(
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_token_id=pad_token_id
    )
    batch["index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
    return batch


def forward_logps(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One forward over the 2B rows: ``(chosen_sum, rejected_sum, chosen_mean, rejected_mean, chosen_n)``."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, mean, n_tokens = sequence_logps(logits, batch["labels"])
    chosen_sum, rejected_sum = total.chunk(2)
    chosen_mean, rejected_mean = mean.chunk(2)
    return chosen_sum, rejected_sum, chosen_mean, rejected_mean, n_tokens.chunk(2)[0]


@torch.no_grad()
def score_pairs(engine: Any, loader: Any, n_pairs: int, strategy: DeepSpeedStrategy) -> torch.Tensor:
    """Summed response log-probs of every training pair under the current policy, on every rank.

    Returns ``(n_pairs, 2)``: [chosen, rejected]. Each rank scores its shard (``loader`` has an
    unshuffled ``DistributedSampler``, which may repeat a few pairs to even the shards) and the
    shards are summed across ranks with a count per pair, so repeats average out exactly.
    """
    was_training = engine.training
    engine.eval()
    sums = torch.zeros(n_pairs, 2, dtype=torch.float64, device=strategy.device)
    counts = torch.zeros(n_pairs, dtype=torch.float64, device=strategy.device)
    for batch in loader:
        batch = {k: v.to(strategy.device) for k, v in batch.items()}
        chosen, rejected, _, _, _ = forward_logps(engine, batch)
        sums.index_add_(0, batch["index"], torch.stack([chosen, rejected], dim=1).double())
        counts.index_add_(0, batch["index"], torch.ones_like(batch["index"], dtype=torch.float64))
    all_reduce_sum_(sums)
    all_reduce_sum_(counts)
    engine.train(was_training)
    return (sums / counts.unsqueeze(1)).float().cpu()


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """In-place sum over ranks (no-op on one process). Candidate for ``DeepSpeedStrategy``."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def margin_stats(logps: torch.Tensor) -> dict[str, float]:
    """Mean (chosen - rejected) summed log-prob over pairs, and the share where chosen is likelier."""
    diff = logps[:, 0] - logps[:, 1]
    return {"margin": float(diff.mean()), "pair_accuracy": float((diff > 0).float().mean())}


# -- the job ---------------------------------------------------------------------------------------


def train(cfg: PreferenceConfig) -> dict[str, Any]:
    """Run one DPO/ORPO job on this rank; returns the metrics (written by rank 0 with the checkpoint)."""
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoTokenizer

    cfg.check_inputs()
    strategy = DeepSpeedStrategy.for_job(cfg)
    strategy.setup_distributed()

    # data: tokenize every pair up front; a pair is dropped if either response has no token left
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels come from build_example, not pads
    rows = load_pairs(cfg.train_file)
    pairs = [build_pair(tokenizer, model_text(tokenizer, prompt, cfg.prompt_format), chosen, rejected, cfg.max_seq_len)
             for prompt, chosen, rejected in rows]
    pairs = [p for p in pairs if has_response(p["chosen"]) and has_response(p["rejected"])]
    dropped = len(rows) - len(pairs)
    if not pairs:
        raise ValueError(f"max_seq_len: {cfg.max_seq_len} leaves no response token in any pair")
    for i, p in enumerate(pairs):
        p["index"] = i
    collate_fn = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    sampler = DistributedSampler(
        pairs, num_replicas=strategy.world_size, rank=strategy.rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(pairs, batch_size=cfg.micro_batch_size, sampler=sampler, collate_fn=collate_fn)
    score_loader = DataLoader(  # every pair once, in order: reference log-probs and margins
        pairs,
        batch_size=cfg.micro_batch_size,
        sampler=DistributedSampler(
            pairs, num_replicas=strategy.world_size, rank=strategy.rank, shuffle=False
        ),
        collate_fn=collate_fn,
    )

    engine, total_steps, resumed = strategy.start(cfg, len(loader))
    # resumed: the latest saved state, with the reference log-probs of the starting policy
    step = int(resumed.get("step", 0))  # optimiser updates taken
    logged: list[dict[str, Any]] = list(resumed.get("logged", []))
    strategy.print0(
        f"preference ({cfg.loss}, beta {cfg.beta}): {len(pairs)} pairs ({dropped} dropped: a "
        f"response has no token that fits), world size {strategy.world_size}, {total_steps} updates, "
        f"zero stage {cfg.zero_stage}" + (f"; resumed at update {step}" if resumed else "")
    )

    # reference: the policy before any update, scored once (DPO's π_ref; both: the initial margin)
    t0 = time.perf_counter()
    if "ref_logps" in resumed:
        ref_logps = torch.as_tensor(resumed["ref_logps"], dtype=torch.float32)
    else:
        ref_logps = score_pairs(engine, score_loader, len(pairs), strategy)
    initial = margin_stats(ref_logps)
    strategy.print0(
        f"reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s; "
        f"initial margin {initial['margin']:.4f}"
    )
    saved_ref = ref_logps.clone()
    ref_logps = ref_logps.to(strategy.device)

    # the loop
    window: dict[str, list[float]] = {}  # micro-batch values since the last log line
    tokens = 0  # non-pad tokens seen by this rank
    t0 = time.perf_counter()
    logged_at, tokens_at_log = t0, 0  # when the last log line was written, and the tokens seen by then
    engine.train()
    skip = step * cfg.gradient_accumulation_steps
    for epoch, i, batch in resume_batches(loader, sampler.set_epoch, epochs=cfg.epochs, skip=skip):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        chosen, rejected, chosen_mean, rejected_mean, chosen_n = forward_logps(engine, batch)
        if cfg.loss == "dpo":
            ref = ref_logps[batch["index"]]
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref[:, 0], ref[:, 1], beta=cfg.beta
            )
        else:
            # SFT term: token-mean NLL of the chosen responses, as the causal-LM cross-entropy
            chosen_nll = -chosen.sum() / chosen_n.sum().clamp(min=1)
            loss, _ = orpo_loss(chosen_nll, chosen_mean, rejected_mean, beta=cfg.beta)
            chosen_rewards = cfg.beta * chosen_mean.detach()  # as TRL's ORPOTrainer logs them
            rejected_rewards = cfg.beta * rejected_mean.detach()
        strategy.backward(loss)
        for key, value in (
            ("loss", loss.item()),
            ("reward_margin", (chosen_rewards - rejected_rewards).mean().item()),
            ("reward_accuracy", (chosen_rewards > rejected_rewards).float().mean().item()),
            ("chosen_reward", chosen_rewards.mean().item()),
            ("rejected_reward", rejected_rewards.mean().item()),
        ):
            window.setdefault(key, []).append(value)
        tokens += int(batch["attention_mask"].sum())
        lr = strategy.current_lr()  # the rate this update uses (the schedule moves in step())
        if not strategy.step():
            continue
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            means = {k: strategy.all_reduce_mean(sum(v) / len(v)) for k, v in window.items()}
            record = {
                "step": step,
                "loss": means.pop("loss"),
                "epoch": round(epoch + (i + 1) / len(loader), 4),
                "lr": lr,
                "grad_norm": strategy.grad_norm(),
                "tokens_per_s": strategy.all_reduce_sum(tokens - tokens_at_log) / (time.perf_counter() - logged_at),
                "total_steps": total_steps,
                **means,
            }
            strategy.log_step(record)
            logged.append(record)
            logged_at, tokens_at_log = time.perf_counter(), tokens
            window = {}
        if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < total_steps:
            strategy.save_state(cfg.state_dir, step, {"logged": logged, "ref_logps": saved_ref})
            strategy.log_json(event="state_saved", step=step, epoch=round(epoch + (i + 1) / len(loader), 4))
    seconds = time.perf_counter() - t0
    all_tokens = strategy.all_reduce_sum(tokens)
    final = margin_stats(score_pairs(engine, score_loader, len(pairs), strategy))

    # save: every rank takes part (ZeRO-3 gathers), rank 0 writes
    metrics = {
        "loss_type": cfg.loss,
        "beta": cfg.beta,
        "initial_loss": logged[0]["loss"] if logged else None,
        "final_loss": logged[-1]["loss"] if logged else None,
        "initial_margin": initial["margin"],
        "final_margin": final["margin"],
        "initial_pair_accuracy": initial["pair_accuracy"],
        "final_pair_accuracy": final["pair_accuracy"],
        "final_reward_margin": logged[-1]["reward_margin"] if logged else None,
        "final_reward_accuracy": logged[-1]["reward_accuracy"] if logged else None,
        "steps": step,
        "resumed_from_step": int(resumed.get("step", 0)),
        "steps_this_run": step - int(resumed.get("step", 0)),
        "epochs": cfg.epochs,
        "pairs": len(pairs),
        "pairs_dropped": dropped,
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
        config={"method": cfg.loss, **cfg.model_dump(mode="json", exclude={"tracking"})},
        extra_files={"metrics.json": metrics},
    )
    strategy.log_json(event="saved", output_dir=str(cfg.output_dir), **metrics)
    strategy.finish_tracking(metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="DPO/ORPO job file (JSON)")
    # DeepSpeed's launcher appends --local_rank unless told --no_local_rank; LOCAL_RANK is in env.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run_rank(train, PreferenceConfig.from_json_file(args.config))
    leave_process_group()


if __name__ == "__main__":
    main()
