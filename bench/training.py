"""Training throughput under the DeepSpeed launcher: tokens/s, peak memory and (on GPUs) MFU.

    python bench/training.py                                  # the demo model, 1 and 2 ranks, CPU
    python bench/training.py --model DIR --ranks 1 2 --zero 2 3 --lora off on
    python bench/training.py --size 1b --ranks 1 --zero 2 3 --lora off on --seq-len 1024   # a GPU

Each configuration is one real SFT launch (``models.train.sft``) on synthetic rows; the figures
come from the run's ``metrics.json``: non-padding tokens per second over the training loop (model
loading excluded), the largest peak memory of any rank (CUDA memory allocated on GPUs, resident
set on CPU), and on GPUs model FLOPs utilisation = 6 × parameters × tokens/s ÷ (ranks × peak
bf16 FLOP/s) (the usual dense estimate; LoRA runs do less work per token than 6N, so their MFU
reads high). ``--size 1b`` builds a randomly initialised Llama of about 1.1 billion parameters
(TinyLlama's shape) in a temporary directory: no weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402

from models.train.launch import launch_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / ".w2s-test-cache" / "tiny" / "strong"  # built by the tests' demo_assets fixture
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU
SIZES = {  # randomly initialised Llama shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def demo_model() -> Path:
    if not (DEMO_MODEL / "config.json").is_file():
        from models.demo import build_demo

        build_demo(DEMO_MODEL.parent, scale="tiny", seed=0)
    return DEMO_MODEL


def random_model(size: str, out: Path, seq_len: int) -> Path:
    """A Llama of the given shape, random weights, with the demo tokenizer (its ids fit any vocab)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_model())
    config = LlamaConfig(**SIZES[size], max_position_embeddings=max(2048, seq_len),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def synthetic_rows(model_dir: Path, n: int, seq_len: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of random tokenizer words: a prompt of a quarter of seq_len, a response to fill it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = [w for w in tokenizer.get_vocab() if w.isalnum()]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(words, k=max(1, seq_len // 4)))
        response = " ".join(rng.choices(words, k=max(1, seq_len - seq_len // 4 - 4)))
        rows.append({"prompt": prompt, "response": response})
    return rows


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def run(model: Path, work: Path, *, ranks: int, zero: int, lora: bool, rows: int, seq_len: int,
        micro_batch: int, epochs: int, gradient_checkpointing: bool) -> dict:
    name = f"r{ranks}-z{zero}-{'lora' if lora else 'full'}"
    train_file = work / "train.jsonl"
    if not train_file.is_file():
        train_file.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(model, rows, seq_len)))
    job = work / f"{name}.json"
    job.write_text(json.dumps({
        "base_model": str(model), "train_file": str(train_file), "output_dir": str(work / name),
        "learning_rate": 1e-4, "epochs": epochs, "micro_batch_size": micro_batch, "max_seq_len": seq_len,
        "warmup_ratio": 0.0, "zero_stage": zero, "log_every": 1000, "gradient_checkpointing": gradient_checkpointing,
        **({"lora": {"r": 16, "alpha": 32}} if lora else {}), "status_dir": str(work / f"{name}-ranks"),
    }))
    result = launch_training("models.train.sft", job, num_ranks=ranks, log_path=work / f"{name}.log",
                             timeout_s=3600, check=False, status_dir=work / f"{name}-ranks")
    if not result.ok:
        return {"config": name, "failure": result.failure, "log": str(work / f"{name}.log")}
    metrics = json.loads((work / name / "metrics.json").read_text())
    flops = peak_flops()
    mfu = (6 * metrics["parameters"] * metrics["tokens_per_s"] / (ranks * flops)) if flops else None
    return {"config": name, "ranks": ranks, "zero": zero, "lora": lora, "tokens": metrics["tokens"],
            "train_s": metrics["train_seconds"], "tokens_per_s": metrics["tokens_per_s"],
            "peak_memory_mb": metrics["peak_memory_mb"], "parameters": metrics["parameters"],
            "trainable": metrics["trainable_parameters"], "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the demo's tiny strong model)")
    parser.add_argument("--size", choices=sorted(SIZES), help="build a randomly initialised model of this size")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero", type=int, nargs="+", choices=[2, 3], default=[2])
    parser.add_argument("--lora", choices=["off", "on"], nargs="+", default=["off"])
    parser.add_argument("--rows", type=int, default=1024, help="synthetic training rows")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = parser.parse_args()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory(prefix="w2s-bench-train-") as tmp:
        work = Path(tmp)
        model = random_model(args.size, work / f"llama-{args.size}", args.seq_len) if args.size else \
            (args.model or demo_model())
        print(f"device: {device}; model: {args.size or model}; rows {args.rows} x {args.seq_len} tokens, "
              f"micro-batch {args.micro_batch}, {args.epochs} epochs", flush=True)
        for ranks in args.ranks:
            for zero in args.zero:
                for lora in args.lora:
                    out = run(model, work, ranks=ranks, zero=zero, lora=lora == "on", rows=args.rows,
                              seq_len=args.seq_len, micro_batch=args.micro_batch, epochs=args.epochs,
                              gradient_checkpointing=args.gradient_checkpointing)
                    if args.json or "failure" in out:
                        print(json.dumps(out), flush=True)
                        continue
                    mfu = f", MFU {out['mfu']:.1%}" if out["mfu"] is not None else ""
                    print(f"{out['config']}: {out['tokens_per_s']:,.0f} tokens/s ({out['tokens']:,} tokens in "
                          f"{out['train_s']:.1f} s), peak memory {out['peak_memory_mb']:,.0f} MiB per rank"
                          f"{mfu}; {out['trainable']:,} of {out['parameters']:,} parameters train", flush=True)


if __name__ == "__main__":
    main()
