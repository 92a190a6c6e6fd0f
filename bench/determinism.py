"""Why the same code and seed give different figures on machines of the same kind, measured.

    python bench/determinism.py [--steps 60] [--assets DIR] [--only NAME,...]

Each configuration runs in a fresh process with its environment: a tiny demo model is trained
from scratch for --steps AdamW steps on the demo's weak_train split (seed 0), then answers the
test split greedily. Printed per configuration: a hash of the trained weights, the last loss to
17 digits, the test accuracy, and the seconds the training took. Configurations that force
another instruction set (ATEN_CPU_CAPABILITY for torch's own kernels, MKL_CBWR for MKL's BLAS,
ONEDNN_MAX_CPU_ISA for oneDNN) play "another machine of the same kind" on this one; a different
hash means the kernel choice alone changes the result. `pinned` is what `w2sctl demo
--deterministic` sets (models/determinism.py). A run on another CPU compares its `pinned` hash
with this one's: equal means the pinned settings carry across those two machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PINNED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "SSE41",
          "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "W2S_DETERMINISTIC": "1"}
CONFIGS: dict[str, dict[str, str]] = {
    "as-is": {},
    "as-is-again": {},  # run-to-run: the same process settings twice
    "threads-1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "threads-2": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"MKL_CBWR": "AVX2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pinned": PINNED,
    "pinned-again": PINNED,
    "pinned-aten-avx2": {**PINNED, "ATEN_CPU_CAPABILITY": "avx2"},  # one pin missing: does it matter?
}


def child(steps: int, assets: Path) -> None:
    import hashlib
    import time

    import torch

    from models import demo
    from models.determinism import pin_determinism

    if os.environ.get("W2S_DETERMINISTIC"):
        pin_determinism()
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "weak")
    rows = [json.loads(line) for line in (assets / "weak_train.jsonl").read_text().splitlines()]
    problems = [demo.Problem(r["question"], r["answer"], 0) for r in rows]
    spec = demo.SCALE_SPECS["tiny"].weak
    spec = type(spec)(**{**spec.__dict__, "steps": steps, "warmup_steps": min(spec.warmup_steps, steps // 2)})
    started = time.perf_counter()
    model, losses = demo.train_model(tokenizer, problems, spec, seed=0)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    out = assets.parent / f".determinism-{os.getpid()}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    test = [demo.Problem(json.loads(line)["question"], json.loads(line)["answer"], 0)
            for line in (assets / "test.jsonl").read_text().splitlines()]
    accuracy = demo.greedy_accuracy(out, test)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"hash": digest.hexdigest()[:16], "last_loss": repr(losses[-1]), "accuracy": accuracy,
                      "train_s": round(seconds, 2), "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--assets", type=Path, default=None, help="a tiny demo build (default: built or reused "
                        "in $W2S_TEST_CACHE/tiny or .w2s-test-cache/tiny)")
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.assets is None:
        from models.demo import build_demo

        cache = Path(os.environ.get("W2S_TEST_CACHE", REPO / ".w2s-test-cache"))
        args.assets = build_demo(cache / "tiny", scale="tiny", seed=0).root
    if args.child:
        child(args.steps, args.assets)
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    base = {k: v for k, v in os.environ.items() if k not in {"ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                                                              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "W2S_DETERMINISTIC"}}
    print(f"{'configuration':<18} {'weights hash':<17} {'last loss':<22} {'test acc':>8} {'train s':>8}  capability/threads")
    results = {}
    for name in names:
        env = {**base, **CONFIGS[name]}
        proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--assets", str(args.assets)],
                              env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(f"{name:<18} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name] = r
        print(f"{name:<18} {r['hash']:<17} {r['last_loss']:<22} {r['accuracy']:>8.1%} {r['train_s']:>8.2f}  "
              f"{r['capability']}/{r['threads']}", flush=True)
    if "as-is" in results:
        same = [n for n, r in results.items() if r["hash"] == results["as-is"]["hash"]]
        print(f"same weights as as-is: {', '.join(same)}")
    if "pinned" in results:
        same = [n for n, r in results.items() if r["hash"] == results["pinned"]["hash"]]
        print(f"same weights as pinned: {', '.join(same)}")


if __name__ == "__main__":
    main()
