"""Checks and conversions of saved training checkpoints (no DeepSpeed, no process group).

- :func:`verify_checkpoint`: the saved tensors' names and shapes against the architecture in the
  directory's ``config.json`` (a ZeRO-3 save that forgot to gather writes a checkpoint of empty
  shards a few hundred kilobytes large; this catches it before the checkpoint is registered).
- :func:`merge_lora`: a LoRA checkpoint (adapter) merged into its base, as a full model directory.
- :func:`copy_tokenizer_files`: the base's tokenizer files, byte for byte, into a new checkpoint.

A LoRA checkpoint is a plain PEFT adapter directory (``adapter_config.json`` naming the base by
absolute path, ``adapter_model.safetensors``, the tokenizer files, w2s's own JSON files) with no
``config.json``: plain ``AutoModelForCausalLM.from_pretrained(dir)`` (with peft installed) then
loads the base and applies the adapter, as it does for any adapter on the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from models.hf_layout import ADAPTER_CONFIG, TOKENIZER_FILE_NAMES, adapter_base


class CheckpointMismatch(ValueError):
    """The saved tensors do not match the model they claim to be; the message names them."""


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def saved_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the directory's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointMismatch(f"checkpoint {path}: no *.safetensors file")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def config_dir(path: str | Path) -> Path:
    """The directory whose config.json describes the architecture: the checkpoint's own, or for
    an adapter its base's (followed through adapters trained on adapters)."""
    path = Path(path)
    seen = set()
    while is_lora_checkpoint(path) and not (path / "config.json").is_file() and path not in seen:
        seen.add(path)
        path = adapter_base(path)
    return path


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the tokenizer files of ``source`` (a model directory) into ``target`` byte for byte:
    a checkpoint w2s writes carries the tokenizer its base shipped, which every serving stack that
    loads the base also loads. Returns the names copied."""
    source, target = Path(source), Path(target)
    copied = []
    for name in TOKENIZER_FILE_NAMES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"{source}: no tokenizer files to copy ({', '.join(TOKENIZER_FILE_NAMES[:2])})")
    return copied


def _meta_model(config_dir: Path) -> Any:
    """The architecture of ``config_dir/config.json`` with no memory behind its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def expected_tensor_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]]]:
    """What the checkpoint at ``path`` should hold: ``(name → shape, name → names it may be
    saved under instead)`` (tied weights such as a shared embedding and LM head are saved once)."""
    path = Path(path)
    model = _meta_model(config_dir(path))
    if is_lora_checkpoint(path):
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        config = LoraConfig.from_pretrained(str(path))
        peft_model = get_peft_model(model, config)
        state = get_peft_model_state_dict(peft_model)
        return {k: tuple(v.shape) for k, v in state.items()}, {}
    aliases: dict[int, set[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(tensor), set()).add(name)
    tied = {name: names - {name} for names in aliases.values() for name in names if len(names) > 1}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, tied


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Raise :class:`CheckpointMismatch` unless every expected tensor is saved with its shape.

    Returns a summary (tensor count, parameter count, lora) for the registration's metrics.
    """
    path = Path(path)
    if not (config_dir(path) / "config.json").is_file():
        what = "the base model's config.json" if is_lora_checkpoint(path) else "config.json"
        raise CheckpointMismatch(f"checkpoint {path}: {what} is missing")
    saved = saved_tensor_shapes(path)
    expected, tied = expected_tensor_shapes(path)
    problems = []
    for name, shape in expected.items():
        if name in saved:
            if saved[name] != shape:
                problems.append(f"{name}: saved {list(saved[name])}, model has {list(shape)}")
        elif not tied.get(name, set()) & saved.keys():
            problems.append(f"{name}: missing")
    unexpected = sorted(saved.keys() - expected.keys())
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}" + (" …" if len(unexpected) > 5 else ""))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointMismatch(
            f"checkpoint {path}: {len(saved)} tensors saved, {len(expected)} expected: {shown}"
        )
    return {
        "tensors": len(saved),
        "parameters": sum(int(torch.Size(s).numel()) for s in saved.values()),
        "lora": is_lora_checkpoint(path),
    }


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, *, base_dir: str | Path | None = None) -> Path:
    """Merge the LoRA adapter at ``adapter_dir`` into its base model; write a full safetensors
    model directory (config, tokenizer, ``w2s.json`` with the lineage) at ``out_dir``.

    The base is ``base_dir`` or the adapter's ``base_model_name_or_path``. Written under a
    temporary name and renamed when complete; refuses to overwrite.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_lora_checkpoint(adapter_dir):
        raise ValueError(f"checkpoint {adapter_dir}: not a LoRA checkpoint (no {ADAPTER_CONFIG})")
    if out_dir.exists():
        raise FileExistsError(f"output {out_dir} already exists; refusing to overwrite")
    base = Path(base_dir) if base_dir else adapter_base(adapter_dir)
    if not (base / "config.json").is_file() and not is_lora_checkpoint(base):
        raise FileNotFoundError(
            f"base model {base} of LoRA checkpoint {adapter_dir} is not a model directory (give --base)"
        )
    if is_lora_checkpoint(base):
        model = load_trained_model(base).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        merged.save_pretrained(tmp)
        copy_tokenizer_files(adapter_dir, tmp)  # the base's own files, as the adapter carries them
        metadata_file = adapter_dir / "w2s.json"
        metadata = json.loads(metadata_file.read_text(encoding="utf-8")) if metadata_file.is_file() else {}
        metadata["lineage"] = {**metadata.get("lineage", {}), "merged_from": str(adapter_dir.resolve()),
                               "merged_base": str(base.resolve())}
        metadata["lora"] = False
        (tmp / "w2s.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        verify_checkpoint(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_trained_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A trained checkpoint as a causal LM in eval mode: a full model as is, a LoRA checkpoint as
    its base with the adapter applied, unmerged (served as is)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not is_lora_checkpoint(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True).eval()
    from peft import PeftModel

    base = adapter_base(path)
    if is_lora_checkpoint(base):  # an adapter trained on a merged adapter (training merges a LoRA student)
        model = load_trained_model(base, dtype=dtype).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True, local_files_only=True)
    return PeftModel.from_pretrained(model, str(path)).eval()
