"""LECO vs self-consistency vs CoT on the same questions and model: accuracy, input and output
tokens, wall time; and the input tokens LECO's prefix reuse (KV cache) saves against re-encoding
the prompt and kept steps on every rethink.

    python bench/leco.py --model CHECKPOINT_DIR --data labelled.jsonl --limit 100 --shots 0

The JSONL needs ``question`` and a gold ``answer`` (a bare answer, or a GSM8K solution ending in
``#### X``). Prompts are ``models.prompts.step_by_step`` with ``--shots`` demonstrations (0 for
the demo models: they cannot learn in context). Token counts as ``services.evaluation`` defines
them: input = tokens the model encoded, output = generated tokens kept in the text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402

from models.answers import gold_answer_from_solution  # noqa: E402
from models.backends import load_backend  # noqa: E402
from services.config import StrategyConfig  # noqa: E402
from services.evaluation import EvalMethod, GoldQuestion, SolveStats, evaluate_questions  # noqa: E402


def read_questions(path: Path, limit: int, task: str) -> list[GoldQuestion]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if len(questions) == limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answer = str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SystemExit(f"{path}:{number}: needs 'question' and 'answer' ({error})") from error
        gold = gold_answer_from_solution(answer, task) if "####" in answer else answer
        questions.append(GoldQuestion(number, row["question"], gold))
    if not questions:
        raise SystemExit(f"{path}: no questions")
    return questions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="local checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="labelled JSONL ('question', 'answer')")
    parser.add_argument("--task", choices=["gsm8k", "math"], default="gsm8k")
    parser.add_argument("--limit", type=int, default=100, help="questions")
    parser.add_argument("--shots", type=int, default=4, help="step-by-step demonstrations in the prompt")
    parser.add_argument("--samples", type=int, default=10, help="self-consistency samples (ref: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="ref: 512 for GSM8K")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 if the machine is shared)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    questions = read_questions(args.data, args.limit, args.task)
    loaded = load_backend(args.model)
    runs = [
        ("CoT (greedy)", StrategyConfig(strategy="cot")),
        (f"SC (n = {args.samples})", StrategyConfig(strategy="sc", samples=args.samples)),
        ("LECO (divert, KV cache)", StrategyConfig(strategy="leco")),
        ("LECO (divert, re-encode)", StrategyConfig(strategy="leco", reuse_cache=False)),
        ("LECO (plain greedy)", StrategyConfig(strategy="leco", rethink="greedy")),
    ]
    print(f"model {args.model}, {len(questions)} questions of {args.data.name}, {args.shots}-shot, "
          f"max {args.max_new_tokens} new tokens, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"{'strategy':<26} {'accuracy':>8} {'input tok':>10} {'output tok':>10} {'in/q':>7} {'out/q':>7} "
          f"{'wall s':>7}")
    stats_by_name = {}
    for name, strategy in runs:
        stats = SolveStats()
        method = EvalMethod(strategy, shots=args.shots, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        outcome = evaluate_questions(loaded, questions, args.task, method, stats=stats)
        stats_by_name[name] = (outcome, stats)
        n = outcome.n_questions
        print(f"{name:<26} {outcome.accuracy:>8.1%} {outcome.input_tokens:>10,} {outcome.output_tokens:>10,} "
              f"{outcome.input_tokens / n:>7.1f} {outcome.output_tokens / n:>7.1f} "
              f"{outcome.wall_s:>7.1f}")

    outcome, stats = stats_by_name["LECO (divert, KV cache)"]
    rethinks = [len(s.leco.attempts) - 1 for s in outcome.solutions]
    reencode = sum(c.reencode_tokens for c in stats.calls)
    print()
    print(f"LECO rethinks: {sum(rethinks)} over {len(rethinks)} questions "
          f"({sum(r > 0 for r in rethinks)} rethought; stop reasons "
          f"{_count(s.leco.stop_reason for s in outcome.solutions)})")
    print(f"LECO input tokens with the KV cache: {outcome.input_tokens:,}; re-encoding prompt + kept steps on "
          f"every call would encode {reencode:,}: prefix reuse saves {reencode - outcome.input_tokens:,} "
          f"({(reencode - outcome.input_tokens) / reencode:.1%})")
    originals = sum(s.leco.attempts[0].input_tokens for s in outcome.solutions)
    print(f"  the rethinks alone: {reencode - originals:,} input tokens re-encoded, "
          f"{outcome.input_tokens - originals:,} with the cache")
    cached, fresh = outcome, stats_by_name["LECO (divert, re-encode)"][0]
    same = sum(a.answer == b.answer for a, b in zip(cached.solutions, fresh.solutions))
    print(f"  answers with and without the cache agree on {same}/{len(questions)} questions")
    lost = sum(c.cache_lost for c in stats.calls)
    if lost:  # a sliding-window model whose generations reached the window
        print(f"  {lost} generated rows could not keep their cache (sliding window reached): they re-encoded next time")


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


if __name__ == "__main__":
    main()
