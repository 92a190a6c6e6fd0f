"""A torch-only probe of CPU numerics, small enough to paste onto another machine (no project imports).

    python bench/determinism_probe.py            # prints one line per configuration

A small attention + MLP language model trained 100 AdamW steps from seed 0 on random tokens, in
a fresh process per configuration; each line: configuration, threads, torch's CPU capability,
a hash of the weights, the last loss. Equal hashes on two machines: those machines compute the
same run bit for bit under that configuration. bench/determinism.py does the same with the demo's
own model and data, and reports accuracy and time.
"""

import os
import subprocess
import sys

CHILD = r'''
import hashlib, os, torch
if os.environ.get("DET"):
    torch.use_deterministic_algorithms(True)
if os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.manual_seed(0)
V, D, T, B = 512, 64, 32, 32
emb, l1, l2, out = torch.nn.Embedding(V, D), torch.nn.Linear(D, 4 * D), torch.nn.Linear(4 * D, D), torch.nn.Linear(D, V)
params = [*emb.parameters(), *l1.parameters(), *l2.parameters(), *out.parameters()]
opt = torch.optim.AdamW(params, lr=3e-3)
g = torch.Generator().manual_seed(1)
for step in range(100):
    x = torch.randint(0, V, (B, T), generator=g)
    h = emb(x)
    a = torch.softmax(h @ h.transpose(1, 2) / 8, -1) @ h
    h = h + l2(torch.nn.functional.gelu(l1(a)))
    loss = torch.nn.functional.cross_entropy(out(h)[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()[:16]
print(os.environ["CFG"], torch.__version__, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), digest,
      repr(loss.item()))
'''
PIN = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "SSE41",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DET": "1"}
CONFIGS = {
    "as-is": {}, "threads-1": {"OMP_NUM_THREADS": "1"}, "threads-2": {"OMP_NUM_THREADS": "2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"}, "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"MKL_CBWR": "AVX2"}, "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "threads-1-aten-avx2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"},
    "pinned": PIN, "pinned-but-aten-avx2": {**PIN, "ATEN_CPU_CAPABILITY": "avx2"},
}

if __name__ == "__main__":
    keep = {k: v for k, v in os.environ.items() if k not in {"ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                                                              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DET"}}
    for name, env in CONFIGS.items():
        subprocess.run([sys.executable, "-c", CHILD], env={**keep, **env, "CFG": name}, check=False)
