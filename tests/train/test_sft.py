"""SFT: the example builder, and the real DeepSpeed launcher on a tiny Llama (CPU, gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.prompts import training_target, zero_shot
from models.train.common import linear_warmup_decay
from models.train.launch import LaunchError, launch_training, parse_progress
from models.train.sft import IGNORE_INDEX, SFTConfig, build_example, collate

WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()


def make_tokenizer():
    """A word-level tokenizer over the words of the synthetic task, with BOS added to inputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = [zero_shot(f"what comes after {w} ?") + training_target(w) for w in WORDS]
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator(sentences, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_rows(path: Path, n: int = 64) -> None:
    """A learnable pattern: the answer is the next number word."""
    with open(path, "w") as f:
        for i in range(n):
            a = WORDS[i % (len(WORDS) - 1)]
            b = WORDS[i % (len(WORDS) - 1) + 1]
            f.write(json.dumps({"prompt": zero_shot(f"what comes after {a} ?"), "response": training_target(b)}) + "\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- pure pieces -----------------------------------------------------------------------------------


def test_build_example_masks_exactly_the_prompt_and_appends_eos(tokenizer):
    prompt, response = zero_shot("what comes after two ?"), training_target("three")
    ex = build_example(tokenizer, prompt, response, max_seq_len=64)

    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id  # the prompt gets BOS, the response does not
    assert ex["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == "three [EOS]"


def test_build_example_cuts_on_the_right(tokenizer):
    prompt, response = zero_shot("what comes after two ?"), training_target("three four five")
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ex = build_example(tokenizer, prompt, response, max_seq_len=n_prompt + 1)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 1
    assert ex["labels"][-1] == tokenizer.convert_tokens_to_ids("three")  # eos cut away
    only_prompt = build_example(tokenizer, prompt, response, max_seq_len=n_prompt)
    assert all(t == IGNORE_INDEX for t in only_prompt["labels"])


def test_collate_pads_on_the_right():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_linear_warmup_decay():
    lrs = [linear_warmup_decay(s, warmup_steps=2, total_steps=10) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert 0 < lrs[-1] < 0.2
    assert linear_warmup_decay(0, warmup_steps=0, total_steps=5) == 1.0


def test_config_names_the_bad_field(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        SFTConfig(base_model=tmp_path, train_file=tmp_path, output_dir=tmp_path, learning_rate=0)
    with pytest.raises(ValueError, match="epoch"):
        SFTConfig(base_model=tmp_path, train_file=tmp_path, output_dir=tmp_path, epoch=3)


def test_parse_progress():
    assert parse_progress('{"step": 3, "loss": 1.5, "epoch": 0.5}\n') == {"step": 3, "loss": 1.5, "epoch": 0.5}
    assert parse_progress("[rank0]: " + json.dumps({"step": 1, "loss": 2.0})) == {"step": 1, "loss": 2.0}
    assert parse_progress('{"event": "saved"}') is None
    assert parse_progress("[2026] [INFO] {not json") is None
    assert parse_progress("") is None


# -- through the real launcher -----------------------------------------------------------------------


def write_job(tmp_path: Path, **fields) -> Path:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}))
    return job


def test_sft_through_deepspeed_launcher(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_file = tmp_path / "train.jsonl"
    write_rows(train_file, 64)
    out = tmp_path / "ckpt" / "sft-r1"
    lineage = {"parent": "tiny-llama", "round": 1, "job": 7}
    job = write_job(
        tmp_path,
        base_model=tiny_model,
        train_file=train_file,
        output_dir=out,
        lineage=lineage,
        learning_rate=1e-2,
        epochs=4,
        micro_batch_size=8,
        warmup_ratio=0.1,
        log_every=2,
    )
    seen = []
    result = launch_training(
        "models.train.sft", job, num_ranks=1, log_path=tmp_path / "train.log", timeout_s=300,
        on_progress=seen.append,
    )  # fmt: skip

    assert result.returncode == 0, result.log_tail
    # one rank: the rank alone, no DeepSpeed launcher, with the variables the launcher would set
    assert result.command[1:] == ["-u", "-m", "models.train.sft", "--config", str(job.resolve())]
    assert result.env["RANK"] == "0" and result.env["WORLD_SIZE"] == "1" and result.env["LOCAL_SIZE"] == "1"
    # DeepSpeed's inference-only CPU collective is neither built nor loaded (it prints this when it is).
    assert "deepspeed_shm_comm" not in (tmp_path / "train.log").read_text()
    assert out.is_dir()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert (out / "model.safetensors").is_file()
    assert [r["step"] for r in seen] == list(range(2, 33, 2))  # 8 micro-batches x 4 epochs, no accumulation
    assert seen == result.progress
    assert all(math.isfinite(r["loss"]) for r in seen)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 32 and metrics["examples"] == 64
    assert metrics["initial_loss"] == seen[0]["loss"] and metrics["final_loss"] == seen[-1]["loss"]
    assert metrics["final_loss"] < 0.75 * metrics["initial_loss"]
    assert metrics["tokens_per_s"] > 0

    meta = json.loads((out / "w2s.json").read_text())
    assert meta["lineage"] == lineage
    assert meta["config"]["method"] == "sft" and meta["config"]["learning_rate"] == 1e-2

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))
    tok = AutoTokenizer.from_pretrained(out)
    inputs = tok(zero_shot("what comes after four ?"), return_tensors="pt", return_token_type_ids=False)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    (tmp_path / "train.log").read_text().index('"step": 32')


def test_failed_launch_raises_with_the_cause_and_writes_nothing(tmp_path):
    train_file = tmp_path / "train.jsonl"
    write_rows(train_file, 4)
    out = tmp_path / "ckpt" / "never"
    job = write_job(
        tmp_path, base_model=tmp_path / "no-such-model", train_file=train_file, output_dir=out
    )
    log = tmp_path / "train.log"

    with pytest.raises(LaunchError) as err:
        launch_training("models.train.sft", job, log_path=log, timeout_s=120)
    assert err.value.returncode != 0
    assert "base_model" in err.value.log_tail and "no-such-model" in err.value.log_tail
    assert "no-such-model" in log.read_text()
    assert not out.exists() and not out.parent.exists()


def test_failed_launch_without_check_returns_the_code(tmp_path):
    job = write_job(tmp_path, anything="at all")
    result = launch_training(
        "models.train.no_such_module", job, log_path=tmp_path / "x.log", timeout_s=120, check=False
    )
    assert result.returncode != 0 and not result.ok and not result.timed_out
    assert "No module named models.train.no_such_module" in result.log_tail


def test_a_stopped_job_kills_the_launch_process_group(tmp_path, tiny_model):
    """The job's stop signal (set by its heartbeat on a cancel) ends the launch's wait at once and
    takes every rank with it: the launcher's whole process group."""
    import time

    import psutil

    from models.stopping import Stopped, StopSignal, stopping

    train_file = tmp_path / "train.jsonl"
    write_rows(train_file, 640)
    out = tmp_path / "ckpt" / "cancelled"
    job = write_job(tmp_path, base_model=tiny_model, train_file=train_file, output_dir=out, epochs=100)
    signal, stopped_at = StopSignal(), []

    def cancel_once_training(record):  # from the log reader thread, as a heartbeat thread would
        if not signal.is_set():
            stopped_at.append(time.monotonic())
            signal.set("cancelled by the test")

    with pytest.raises(Stopped, match="cancelled by the test"), stopping(signal):
        launch_training("models.train.sft", job, log_path=tmp_path / "s.log", timeout_s=600,
                        on_progress=cancel_once_training)
    assert stopped_at and time.monotonic() - stopped_at[0] < 60, "the wait did not end soon after the signal"
    survivors = [
        p for p in psutil.process_iter(["cmdline"]) if str(job) in " ".join(p.info["cmdline"] or [])
    ]
    assert survivors == []
    assert not out.exists()


def test_timeout_kills_the_whole_process_group(tmp_path, tiny_model):
    import psutil

    train_file = tmp_path / "train.jsonl"
    write_rows(train_file, 64)
    out = tmp_path / "ckpt" / "slow"
    job = write_job(
        tmp_path, base_model=tiny_model, train_file=train_file, output_dir=out, epochs=100
    )
    with pytest.raises(LaunchError, match="timed out") as err:
        launch_training("models.train.sft", job, log_path=tmp_path / "t.log", timeout_s=10)
    assert err.value.result.timed_out
    survivors = [
        p for p in psutil.process_iter(["cmdline"]) if str(job) in " ".join(p.info["cmdline"] or [])
    ]
    assert survivors == []
    assert not out.exists()
