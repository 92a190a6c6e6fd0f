"""Tiny models vLLM can serve: the demo's trained tiny Llamas have head_dim 16, which vLLM's CPU
attention does not take (32, 64, 80, ... only). ``widen_heads`` writes the same model with head_dim
32: every head's query/key/value dims spread over twice as many, the new ones zero, placed so that
RoPE rotates each original pair with its original frequency (dim i of a half goes to 2i), and the
queries scaled by sqrt(2) so that the attention's 1/sqrt(head_dim) is unchanged. Its outputs are the
original's up to float rounding, so the demo's answers (and the round's votes) carry over.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


def widen_heads(src: Path, dst: Path, head_dim: int = 32) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    old = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % old or (head_dim // old) & (head_dim // old - 1):
        raise ValueError(f"head_dim {head_dim} is not a power-of-two multiple of {old}")
    factor = head_dim // old
    marker = dst / "config.json"
    if marker.is_file() and json.loads(marker.read_text()).get("head_dim") == head_dim:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy2(file, dst / file.name)
    # old dim i (first half) -> new 2i*factor/2 spacing; second half -> head_dim/2 + same
    half = old // 2
    place = [factor * i for i in range(half)] + [head_dim // 2 + factor * i for i in range(half)]
    weights = load_file(src / "model.safetensors")
    out = {}
    for name, tensor in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            heads = tensor.shape[0] // old
            wide = tensor.new_zeros((heads, head_dim, tensor.shape[1]))
            wide[:, place] = tensor.view(heads, old, -1)
            if name.endswith("q_proj.weight"):
                wide *= math.sqrt(head_dim / old)
            tensor = wide.reshape(heads * head_dim, -1)
        elif name.endswith("o_proj.weight"):
            heads = tensor.shape[1] // old
            wide = tensor.new_zeros((tensor.shape[0], heads, head_dim))
            wide[:, :, place] = tensor.view(tensor.shape[0], heads, old)
            tensor = wide.reshape(tensor.shape[0], heads * head_dim)
        out[name] = tensor.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config["head_dim"] = head_dim
    marker.write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    return dst
