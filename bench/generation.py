"""Batched vs one-at-a-time greedy generation: questions per second and the speed-up.

    python bench/generation.py --model CHECKPOINT_DIR --data questions.jsonl --limit 64

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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

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
