"""Stage II training: DPO and ORPO through the real DeepSpeed launcher on a tiny Llama (CPU, gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.prompts import training_target, zero_shot
from models.train.launch import launch_training
from models.train.losses import sequence_logps
from models.train.preference import PreferenceConfig, collate_pairs, load_pairs
from models.train.sft import IGNORE_INDEX, build_example, collate
from tests.train.test_sft import WORDS, tiny_model, tokenizer, write_job  # noqa: F401 - fixtures


def pair_rows(n: int = 32) -> list[dict[str, str]]:
    """A learnable preference: the next number word is chosen, one eight further on rejected."""
    rows = []
    for i in range(n):
        k = i % (len(WORDS) - 1)
        rows.append({
            "prompt": zero_shot(f"what comes after {WORDS[k]} ?"),
            "chosen": training_target(WORDS[k + 1]),
            "rejected": training_target(WORDS[(k + 8) % len(WORDS)]),
        })  # fmt: skip
    return rows


def write_pairs(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def margin(model_dir: Path, rows: list[dict[str, str]]) -> float:
    """Mean (chosen - rejected) summed response log-prob, computed here from a saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = [build_example(tok, r["prompt"], r[side], 64) for side in ("chosen", "rejected") for r in rows]
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _, _ = sequence_logps(logits, batch["labels"])
    chosen, rejected = logps.chunk(2)
    return float((chosen - rejected).mean())


# -- fast: config and data errors ---------------------------------------------------------------------


def test_config_names_the_bad_field(tmp_path):
    paths = dict(base_model=tmp_path, train_file=tmp_path, output_dir=tmp_path)
    assert PreferenceConfig(**paths).loss == "dpo" and PreferenceConfig(**paths).beta == 0.1
    for bad, field in [
        ({"beta": 0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"loss": "ppo"}, "loss"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"betaa": 0.1}, "betaa"),
    ]:
        with pytest.raises(ValueError, match=field):
            PreferenceConfig(**paths, **bad)


def test_config_from_job_file(tmp_path):
    job = write_job(tmp_path, base_model=tmp_path, train_file=tmp_path, output_dir=tmp_path, loss="orpo", beta=0.2)
    cfg = PreferenceConfig.from_json_file(job)
    assert cfg.loss == "orpo" and cfg.beta == 0.2
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        PreferenceConfig.from_json_file(tmp_path / "bad.json")


def test_data_errors_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: field 'rejected'"):
        load_pairs(path)
    path.write_text(good + "\n" + "{nope\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: malformed JSON"):
        load_pairs(path)
    path.write_text(json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field 'chosen'"):
        load_pairs(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: expected a JSON object"):
        load_pairs(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_pairs(path)
    path.write_text(good + "\n")
    assert load_pairs(path) == [("p", "a", "b")]


def test_collate_pairs_puts_chosen_rows_first():
    pairs = [
        {"chosen": {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, "rejected": {"input_ids": [1, 4], "labels": [-100, 4]}, "index": 5},
        {"chosen": {"input_ids": [1, 6], "labels": [-100, 6]}, "rejected": {"input_ids": [1, 7, 8, 9], "labels": [-100, 7, 8, 9]}, "index": 2},
    ]  # fmt: skip
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 6, 0, 0], [1, 4, 0, 0], [1, 7, 8, 9]]
    assert batch["labels"][:, 0].tolist() == [IGNORE_INDEX] * 4
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert batch["index"].tolist() == [5, 2]


# -- through the real launcher -----------------------------------------------------------------------


LOSSES = ("dpo", "orpo")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model):  # noqa: F811
    """A DPO and an ORPO job run one after the other in one DeepSpeed launch (tests/train/several_jobs.py):
    a launch costs three Python processes importing torch and DeepSpeed, the training itself seconds.
    Returns the launch's result and, by loss, the job's rows, output directory and lineage."""
    root = tmp_path_factory.mktemp("preference")
    rows = pair_rows(32)
    train_file = root / "pairs.jsonl"
    write_pairs(train_file, rows)
    jobs, runs = [], {}
    for number, loss in enumerate(LOSSES):
        out = root / "ckpt" / f"{loss}-r1"
        lineage = {"parent": "sft-r1", "round": 1, "job": 9 + number}
        (root / loss).mkdir()
        job = write_job(
            root / loss,
            base_model=tiny_model,
            train_file=train_file,
            output_dir=out,
            lineage=lineage,
            loss=loss,
            beta=0.1,
            learning_rate=3e-2,  # a tiny random model: big steps (DPO +~20, ORPO +~2.7 nats of margin)
            epochs=8,
            micro_batch_size=8,
            warmup_ratio=0.1,
            log_every=4,
        )
        jobs.append({"module": "models.train.preference", "config": str(job)})
        runs[loss] = (rows, out, lineage)
    (root / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    result = launch_training("tests.train.several_jobs", root / "jobs.json", num_ranks=1, log_path=root / "train.log",
                             timeout_s=300)
    return result, runs


@pytest.mark.parametrize("loss", LOSSES)
def test_preference_through_deepspeed_launcher(launched, tiny_model, loss):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, runs = launched
    rows, out, lineage = runs[loss]
    assert result.returncode == 0, result.log_tail
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    # The jobs log in turn: this job's records are its share of the launch's, in order.
    assert len(result.progress) == 8 * len(LOSSES), result.progress
    seen = result.progress[8 * LOSSES.index(loss):][:8]
    assert [r["step"] for r in seen] == list(range(4, 33, 4))  # 4 micro-batches x 8 epochs
    for record in seen:
        assert {"step", "loss", "epoch", "lr", "reward_margin", "reward_accuracy"} <= record.keys()
        assert all(math.isfinite(record[k]) for k in ("loss", "reward_margin", "reward_accuracy"))

    # the margin, measured here on the saved checkpoint and on the base model
    before, after = margin(tiny_model, rows), margin(out, rows)
    print(f"{loss}: margin before {before:.4f}, after {after:.4f}")
    assert after > before + 1.0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_type"] == loss and metrics["steps"] == 32 and metrics["pairs"] == 32
    assert metrics["initial_margin"] == pytest.approx(before, abs=1e-3)
    assert metrics["final_margin"] == pytest.approx(after, abs=1e-3)
    assert metrics["final_loss"] < metrics["initial_loss"]
    assert metrics["final_reward_accuracy"] > 0.5
    meta = json.loads((out / "w2s.json").read_text())
    assert meta["lineage"] == lineage
    assert meta["config"]["method"] == loss and meta["config"]["beta"] == 0.1

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    inputs = tok(zero_shot("what comes after four ?"), return_tensors="pt", return_token_type_ids=False)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
