"""The transformers backend on a GPU, against itself on the CPU: dtype choice, greedy parity under
bf16, step scores and LECO's prefix reuse, on the real-shaped test checkpoints (Llama, Qwen2,
Mistral, Gemma; ``tests/real_models.py`` builds them under ``$W2S_TEST_CACHE/real-models``).

    python bench/gpu_check.py --models DIR [--questions 16] [--new-tokens 48]

For each model it saves a bf16 copy, loads it with ``hf.load`` on the GPU (the backend must keep
bf16) and the float32 original on the CPU, then prints per model:

- the dtype each load chose;
- greedy parity: outputs identical, and where they differ, whether at the first differing token
  each side's token is among the other side's top 5 (the tolerance the vLLM issue names for bf16);
- step scores: the largest |p_gpu - p_cpu| over tokens of identical outputs;
- LECO on the GPU with and without prefix reuse: the same answers, and the input tokens saved.

Needs torch with CUDA and transformers only (no database, no broker). Exits non-zero if a load
chose the wrong dtype or LECO's answers differ with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402

from models.backends import hf  # noqa: E402
from models.backends.base import GenerationParams, StepOptions  # noqa: E402
from models.leco import leco_solve  # noqa: E402

QUESTION = "Question: {a} apples and {b} more apples. How many apples?\nAnswer:"


def questions(n: int) -> list[str]:
    return [QUESTION.format(a=3 + i, b=2 * i + 1) for i in range(n)]


def bf16_copy(src: Path, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(dst)
    return dst


def top5_ids(backend: hf.TransformersBackend, prompt: str, prefix: str) -> list[int]:
    """The five most likely next tokens after ``prompt + prefix`` (teacher-forced)."""
    ids = backend.tokenizer(prompt + prefix, return_tensors="pt").to(backend.model.device)
    with torch.inference_mode():
        logits = backend.model(**ids).logits[0, -1].float()
    return logits.topk(5).indices.tolist()


def first_divergence(a: str, b: str, tokenizer) -> int:
    ta, tb = tokenizer(a, add_special_tokens=False).input_ids, tokenizer(b, add_special_tokens=False).input_ids
    i = 0
    while i < min(len(ta), len(tb)) and ta[i] == tb[i]:
        i += 1
    return i


def check(name: str, path: Path, args, work: Path) -> dict:
    gpu = hf.load(bf16_copy(path, work / f"{name}-bf16"), device=args.device)
    cpu = hf.load(path, device="cpu")
    row = {"model": name, "gpu_dtype": str(gpu.model.dtype), "cpu_dtype": str(cpu.model.dtype)}
    prompts = questions(args.questions)
    params = GenerationParams(max_new_tokens=args.new_tokens, return_token_probs="top5", batch_size=args.questions)
    on_gpu = [c[0] for c in gpu.generate(prompts, params)]
    on_cpu = [c[0] for c in cpu.generate(prompts, params)]
    same = [g.text == c.text for g, c in zip(on_gpu, on_cpu)]
    row["greedy_identical"] = f"{sum(same)}/{len(same)}"
    within = 0
    for prompt, g, c, s in zip(prompts, on_gpu, on_cpu, same):
        if s:
            continue
        # The token each side chose at the first difference, and whether the other side ranks it top 5.
        i = first_divergence(g.text, c.text, gpu.tokenizer)
        ids_g = gpu.tokenizer(g.text, add_special_tokens=False).input_ids
        ids_c = cpu.tokenizer(c.text, add_special_tokens=False).input_ids
        prefix = gpu.tokenizer.decode(ids_g[:i])
        tok_g = ids_g[i] if i < len(ids_g) else gpu.tokenizer.eos_token_id
        tok_c = ids_c[i] if i < len(ids_c) else cpu.tokenizer.eos_token_id
        within += tok_g in top5_ids(cpu, prompt, prefix) and tok_c in top5_ids(gpu, prompt, prefix)
    row["diverged_within_top5"] = f"{within}/{len(same) - sum(same)}"
    diffs = [abs(a - b) for g, c, s in zip(on_gpu, on_cpu, same) if s and g.token_probs and c.token_probs
             for a, b in zip(g.token_probs, c.token_probs)]
    row["max_step_prob_diff"] = round(max(diffs), 4) if diffs else None

    results = {}
    for reuse in (True, False):
        generator = gpu.step_generator(prompts, StepOptions(max_new_tokens=args.new_tokens, reuse_cache=reuse))
        solved = leco_solve(prompts, generator, task="gsm8k", max_rethinks=2)
        results[reuse] = ([r.answer for r in solved], sum(c.input_tokens for c in generator.calls))
    row["leco_same_answers"] = results[True][0] == results[False][0]
    row["leco_input_tokens"] = f"{results[True][1]} with reuse, {results[False][1]} without"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="the folder of real-shaped test checkpoints")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    names = json.loads((args.models / "real-models.json").read_text())["names"]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = check(name, args.models / name, args, Path(tmp))
            print(json.dumps(row))
            wanted = "torch.bfloat16" if args.device == "cuda" else "torch.float32"
            failed |= row["gpu_dtype"] != wanted or row["cpu_dtype"] != "torch.float32"
            failed |= not row["leco_same_answers"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
