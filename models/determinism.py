"""Pin what can be pinned of torch's CPU numerics, for runs that must repeat bit for bit.

The same code and seed give different figures on two machines of the same kind because the
kernels are chosen at run time: torch's own vectorised kernels by the CPU's instruction set
(ATEN_CPU_CAPABILITY: avx512 here, avx2 on another), MKL's BLAS by its code path (MKL_CBWR),
oneDNN by its ISA (ONEDNN_MAX_CPU_ISA), and every parallel reduction by the thread count (each
thread sums its own slice, then the partial sums are added: another split, another rounding).
Different roundings in step 1 of a training run become different weights by step 100, and a
greedy answer flips when two logits are close. bench/determinism.py measures each lead.

The three environment variables are read once, when torch, MKL and oneDNN load: they must be set
before the process imports torch (the launcher of the training ranks passes the environment on;
`pinned_environment()` is what to set). The rest is set here, in the process.
"""

from __future__ import annotations

import os

PINNED_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "default",  # torch's kernels without AVX: the same on every x86-64 CPU
    "MKL_CBWR": "COMPATIBLE,STRICT",  # MKL's conditional numerical reproducibility: one code path
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN's oldest x86-64 path
    "OMP_NUM_THREADS": "1",  # one thread: one reduction order
    "MKL_NUM_THREADS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # on a GPU, deterministic cuBLAS (torch asks for it)
    "W2S_DETERMINISTIC": "1",  # the training ranks turn on torch.use_deterministic_algorithms (models/train/common.py)
}


def pinned_environment() -> dict[str, str]:
    """The variables to set before torch is imported (a child process's environment)."""
    return dict(PINNED_ENVIRONMENT)


def pin_determinism(seed: int | None = None) -> None:
    """In this process: one thread, deterministic algorithms (an op without one raises instead of
    varying), and the seeds. Call before any model work."""
    import torch

    for key, value in PINNED_ENVIRONMENT.items():
        os.environ.setdefault(key, value)  # for child processes; this one's libraries have loaded
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if seed is not None:
        import random

        random.seed(seed)
        torch.manual_seed(seed)
