"""Peak memory of step scores (the chosen tokens' probabilities) on a 128k-token vocabulary, before
and after: "before" keeps every generation step's full-vocabulary logits until the batch ends
(``generate(output_logits=True)``, what the transformers backend did until issue #17), "after" is
the backend as it is (``hf.StepScores``: 7 floats per token, recorded as generation goes).

    python bench/step_scores.py                  # CPU: peak RSS above the loaded model
    python bench/step_scores.py --device cuda    # GPU: torch.cuda.max_memory_allocated above the model

A tiny random LlamaForCausalLM with a 128,256-token vocabulary (Llama 3's) and a small hidden size,
batch 16 × 256 new tokens (``min_new_tokens`` forces the length), sampled with a seed, so both
paths generate the same tokens. Each path runs in its own process (a process's peak RSS cannot be
reset after a larger run), computing the probabilities with the same rule
(``tokens.chosen_token_prob``); the parent prints both side by side and checks that the answers
and scores agree. Needs only torch and transformers: no database, no broker, no w2s service.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402

from models.backends.base import GenerationParams  # noqa: E402
from models.backends.hf import TransformersBackend  # noqa: E402
from models.backends.tokens import chosen_token_prob, count_tokens, trim  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build(args) -> TransformersBackend:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SPECIALS + [f"w{i}" for i in range(args.vocab - len(SPECIALS))]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.suppress_tokens = [0, 1, 3]  # no padding mid-answer: the texts keep every token
    model.to(args.device).eval()
    return TransformersBackend(model=model, tokenizer=tokenizer, path=Path("bench-step-scores"), fingerprint="bench")


def prompts(args) -> list[str]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 64, (args.batch,), generator=generator).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 4, (n,), generator=generator)) for n in lengths]


def params(args) -> GenerationParams:
    return GenerationParams(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, seed=0,
                            batch_size=args.batch, return_token_probs=args.token_prob)


@torch.inference_mode()
def before(backend: TransformersBackend, texts: list[str], p: GenerationParams) -> tuple[list[str], list[list[float]]]:
    """The old path: every step's logits kept by generate, the probabilities computed at the end."""
    model, tokenizer = backend.model, backend.tokenizer
    lengths = backend.count_tokens(texts)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # the backend's batch order, so the same samples
    inputs = tokenizer([texts[i] for i in order], return_tensors="pt", padding=True).to(model.device)
    width = inputs["input_ids"].shape[1]
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(p.seed or 0)  # what the backend does for its first batch
        out = model.generate(**inputs, max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature,
                             top_p=p.top_p, top_k=0, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=True)
    new_tokens = out.sequences[:, width:]
    chosen = torch.stack([step.gather(1, new_tokens[:, k : k + 1])[:, 0] for k, step in enumerate(out.logits)], 1)
    totals = torch.stack([step.logsumexp(-1) for step in out.logits], 1)
    tops = torch.stack([step.topk(5, -1).values for step in out.logits], 1)
    answers, scores = [""] * len(texts), [[] for _ in texts]
    for row, ids in enumerate(new_tokens.tolist()):
        ids, text = trim(tokenizer, ids, backend._end_ids(), ())
        count = count_tokens(tokenizer, ids, text)
        answers[order[row]] = text
        scores[order[row]] = [chosen_token_prob(c, t, z, p.return_token_probs or "top5") for c, z, t in zip(
            chosen[row, :count].tolist(), totals[row, :count].tolist(), tops[row, :count].tolist())]
    return answers, scores


def after(backend: TransformersBackend, texts: list[str], p: GenerationParams) -> tuple[list[str], list[list[float]]]:
    completions = [c for (c,) in backend.generate(texts, p)]
    return [c.text for c in completions], [c.token_probs or [] for c in completions]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> None:
    backend = build(args)
    texts, p = prompts(args), params(args)
    run = before if args.child == "before" else after
    run(backend, texts[:2], GenerationParams(max_new_tokens=2, seed=0, return_token_probs=args.token_prob))  # warm up
    backend.model.generation_config.min_new_tokens = args.new_tokens  # every sequence runs to the full length
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux)
        base = _rss_mib("VmRSS")
    started = time.perf_counter()
    answers, scores = run(backend, texts, p)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib("VmHWM")
    Path(args.out).write_text(json.dumps(dict(base=base, peak=peak, seconds=seconds, answers=answers, scores=scores)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--token-prob", choices=["top5", "full"], default="top5")
    parser.add_argument("--path", choices=["both", "before", "after"], default="both",
                        help="before: the old full-logits path (generate(output_logits=True)); after: the backend")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in (["before", "after"] if args.path == "both" else [args.path]):
            out = Path(tmp) / f"{path}.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--child", path, "--out", str(out)]
            subprocess.run(command, check=True)
            results[path] = json.loads(out.read_text())

    what = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"step scores ({args.token_prob}), vocabulary {args.vocab:,}, batch {args.batch} × {args.new_tokens} "
          f"new tokens (sampled, seed 0), hidden {args.hidden}, {args.device}, torch {torch.__version__}")
    print(f"{'path':8} {what + ' above the model (MiB)':>44} {'absolute (MiB)':>15} {'seconds':>8}")
    for path, r in results.items():
        print(f"{path:8} {r['peak'] - r['base']:>44,.0f} {r['peak']:>15,.0f} {r['seconds']:>8.1f}")
    if len(results) == 2:
        old, new = results["before"], results["after"]
        same = sum(a == b for a, b in zip(old["answers"], new["answers"]))
        tokens = sum(len(s) for s in new["scores"])
        diff = max((abs(a - b) for x, y in zip(old["scores"], new["scores"]) for a, b in zip(x, y)), default=0.0)
        lengths_agree = all(len(x) == len(y) for x, y in zip(old["scores"], new["scores"]))
        print(f"answers identical: {same}/{len(new['answers'])}; scores: {tokens:,} tokens, "
              f"max |before - after| {diff:.1e}{'' if lengths_agree else ' (token counts differ!)'}")
        if same != len(new["answers"]) or not lengths_agree or diff > 1e-5:
            sys.exit("the two paths disagree")


if __name__ == "__main__":
    main()
