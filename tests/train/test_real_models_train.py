"""Training on checkpoints shaped like the real ones (tests/real_models.py), through the real
DeepSpeed launcher: SFT, DPO and ORPO, full and LoRA, spread over Llama, Qwen2 (chat format),
Mistral and Gemma; then every output — full, LoRA adapter, merged — reloaded with plain
transformers (``AutoModelForCausalLM`` + ``AutoTokenizer``, peft installed) and with w2s's own
loader, its tokenizer files byte for byte the base's.

The jobs are 1-2 optimiser steps each and run in one launch (``tests/train/several_jobs.py``): what
is tested is the checkpoint each writes, not what it learned (tests/train/test_sft.py and
test_preference.py check learning)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from models.backends import check_checkpoint_dir, load_backend
from models.generation import generate
from models.hf_layout import TOKENIZER_FILE_NAMES
from models.prompts import model_text, training_target, zero_shot
from models.train.checkpoint import is_lora_checkpoint, load_trained_model, verify_checkpoint
from models.train.launch import launch_training

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# (model, method, lora, prompt format): each method with and without LoRA, each model at least once
JOBS = [
    ("llama", "sft", False, "plain"),
    ("gemma", "sft", True, "chat"),
    ("mistral", "dpo", False, "plain"),
    ("qwen2", "dpo", True, "chat"),
    ("gemma", "orpo", False, "plain"),
    ("llama", "orpo", True, "plain"),
]
IDS = [f"{m}-{method}-{'lora' if lora else 'full'}" for m, method, lora, _ in JOBS]


def _rows(n: int = 8) -> tuple[list[dict], list[dict]]:
    from models.demo import make_problems

    problems = make_problems(random.Random(1), "target", n + 1)
    sft = [{"prompt": zero_shot(p.question), "response": training_target(p.solution)} for p in problems[:n]]
    pairs = [{"prompt": zero_shot(p.question), "chosen": training_target(p.solution),
              "rejected": training_target(q.solution)} for p, q in zip(problems[:n], problems[1:])]
    return sft, pairs


@pytest.fixture(scope="module")
def trained(real_models, tmp_path_factory) -> dict[str, Path]:
    """Every job of JOBS run in one DeepSpeed launch; output directory by job id."""
    root = tmp_path_factory.mktemp("real-train")
    sft, pairs = _rows()
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    jobs, outputs = [], {}
    for job_id, (name, method, lora, prompt_format) in zip(IDS, JOBS):
        outputs[job_id] = root / "out" / job_id
        config = {"base_model": str(real_models[name]), "output_dir": str(outputs[job_id]),
                  "train_file": str(root / ("sft.jsonl" if method == "sft" else "pairs.jsonl")),
                  "epochs": 1, "micro_batch_size": 4, "max_seq_len": 160, "learning_rate": 1e-3, "log_every": 1,
                  "prompt_format": prompt_format, "lineage": {"job": job_id},
                  **({"lora": LORA} if lora else {}), **({} if method == "sft" else {"loss": method})}
        (root / f"{job_id}.json").write_text(json.dumps(config))
        jobs.append({"module": "models.train.sft" if method == "sft" else "models.train.preference",
                     "config": str(root / f"{job_id}.json")})
    (root / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    launch_training("tests.train.several_jobs", root / "jobs.json", num_ranks=1, log_path=root / "train.log",
                    timeout_s=600, env={"OMP_NUM_THREADS": "1", **_environ()})
    return outputs


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def _job(job_id: str) -> tuple[str, str, bool, str]:
    return JOBS[IDS.index(job_id)]


def _assert_same_tokenizer_files(base: Path, out: Path) -> None:
    base_files = {n for n in TOKENIZER_FILE_NAMES if (base / n).is_file()}
    assert base_files == {n for n in TOKENIZER_FILE_NAMES if (out / n).is_file()}
    for name in base_files:
        assert (out / name).read_bytes() == (base / name).read_bytes(), f"{out / name} differs from the base's"


def _plain_logits(path: Path, text: str) -> torch.Tensor:
    """Last-position logits of ``text`` from the checkpoint loaded with plain transformers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt", return_token_type_ids=False)).logits[0, -1]


@pytest.mark.parametrize("job_id", IDS)
def test_every_output_loads_anywhere(trained, real_models, job_id):
    name, method, lora, prompt_format = _job(job_id)
    out, base = trained[job_id], real_models[name]
    assert (out / "w2s.json").is_file() and json.loads((out / "metrics.json").read_text())["steps"] >= 1
    _assert_same_tokenizer_files(base, out)
    assert verify_checkpoint(out)["lora"] is lora
    check_checkpoint_dir(out)  # what `model register` checks
    if lora:  # a plain PEFT adapter directory: no config.json that would send transformers looking for weights
        assert is_lora_checkpoint(out) and not (out / "config.json").exists()
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert Path(adapter["base_model_name_or_path"]) == base.resolve()
        assert not list(out.glob("model*.safetensors"))
    else:
        assert (out / "config.json").is_file()
    prompt = model_text(load_backend(base).tokenizer, zero_shot("Tom has 3 apples. He buys 2 more."), prompt_format)
    plain = _plain_logits(out, prompt)
    ours = load_trained_model(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        expected = ours(**tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)).logits[0, -1]
    torch.testing.assert_close(plain, expected)  # plain transformers applies the adapter as w2s does
    assert not torch.allclose(plain, _plain_logits(base, prompt)), "training changed nothing"
    loaded = load_backend(out).formatted(prompt_format)
    (completion,) = generate(loaded, [zero_shot("Sam has 5 cards.")], max_new_tokens=6)[0]
    assert completion.output_tokens >= 0 and completion.input_tokens == loaded.count_tokens([zero_shot("Sam has 5 cards.")])[0]


@pytest.mark.parametrize("job_id", [i for i, job in zip(IDS, JOBS) if job[2]])
def test_merged_lora_loads_anywhere_and_answers_as_the_adapter(trained, real_models, job_id, cli_runner, w2s_home,
                                                               tmp_path):
    name, _, _, _ = _job(job_id)
    merged = tmp_path / "merged"
    cli_runner("checkpoint", "merge", trained[job_id], "--out", merged)
    assert not is_lora_checkpoint(merged) and verify_checkpoint(merged)["lora"] is False
    _assert_same_tokenizer_files(real_models[name], merged)
    check_checkpoint_dir(merged)
    base_config = json.loads((real_models[name] / "config.json").read_text())
    assert json.loads((merged / "config.json").read_text())["architectures"] == base_config["architectures"]
    prompt = zero_shot("Ann has 7 pens.")
    torch.testing.assert_close(_plain_logits(merged, prompt), _plain_logits(trained[job_id], prompt), atol=1e-4, rtol=1e-4)


def test_a_chat_model_is_trained_on_the_chat_text(real_models, tmp_path):
    """The training prompt is the text generation reads: the chat template's user turn and the
    assistant header, with one BOS."""
    from transformers import AutoTokenizer

    from models.train.sft import IGNORE_INDEX, build_example

    tokenizer = AutoTokenizer.from_pretrained(real_models["qwen2"])
    prompt = zero_shot("Tom has 3 apples.")
    chat = model_text(tokenizer, prompt, "chat")
    example = build_example(tokenizer, chat, training_target("3 + 0 = 3.\n#### 3"), 200)
    served = load_backend(real_models["qwen2"]).formatted("chat")
    n_prompt = served.count_tokens([prompt])[0]
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and example["labels"][n_prompt] != IGNORE_INDEX
    assert tokenizer.decode(example["input_ids"][:n_prompt]) == chat
    assert example["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the turn ends as the template's
