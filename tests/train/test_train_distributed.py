"""Training through the real DeepSpeed launcher on the CPU accelerator (gloo): several ranks,
ZeRO-2 and ZeRO-3, LoRA, resume at an epoch boundary, a killed rank in a train job and its retry,
and a rank on another "host" that dies.

Tiny randomly initialised Llamas on the next-number-word task of ``test_sft`` (it learns in a few
dozen updates), so each launch takes seconds of training; most of a test's time is the start of
the DeepSpeed processes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import torch

from models.prompts import zero_shot
from models.train.launch import ClusterSpec, launch_training
from tests.train.test_preference import margin, pair_rows, write_pairs
from tests.train.test_sft import tiny_model, tokenizer, write_job, write_rows  # noqa: F401 - fixtures

TESTS = Path(__file__).resolve().parents[1]


def rank_processes(job_file: Path, **env: str) -> list[psutil.Process]:
    """The rank processes of a launch (found by their job file), with these environment values."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(job_file) not in cmdline or "deepspeed.launcher" in cmdline:
            continue
        try:
            proc_env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if all(proc_env.get(k) == v for k, v in env.items()):
            found.append(proc)
    return found


def kill_when(predicate, job_file: Path, timeout_s: float = 240, **env: str) -> threading.Thread:
    """In the background: once ``predicate()`` holds, SIGKILL the rank matching ``env``."""

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                for proc in rank_processes(job_file, **env):
                    proc.kill()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def greedy(model, tok, prompts: list[str], new_tokens: int = 4) -> list[list[int]]:
    out = []
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def response_loss(model_dir, rows: list[dict[str, str]]) -> float:
    """Mean cross-entropy of the response tokens (the prompt masked), as SFT optimises it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.train.sft import build_example, collate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate([build_example(tok, r["prompt"], r["response"], 256) for r in rows], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


PROMPTS = [zero_shot(f"what comes after {w} ?") for w in ("two", "five", "nine")]


def test_dpo_two_ranks_margin_grows(tmp_path, tiny_model):
    rows = pair_rows(32)
    write_pairs(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "ckpt" / "dpo-2ranks"
    job = write_job(tmp_path, base_model=tiny_model, train_file=tmp_path / "pairs.jsonl", output_dir=out,
                    loss="dpo", beta=0.1, learning_rate=3e-2, epochs=4, micro_batch_size=4, log_every=1,
                    status_dir=tmp_path / "ranks")
    result = launch_training("models.train.preference", job, num_ranks=2, log_path=tmp_path / "dpo.log",
                             timeout_s=300, status_dir=tmp_path / "ranks")
    assert result.ok and [r.status for r in result.ranks] == ["ok", "ok"]
    assert result.command[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]  # one node: the node launcher, no runner

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["final_margin"] > metrics["initial_margin"] + 1.0
    # and measured independently of the trainer, from the saved checkpoints
    assert margin(out, rows) > margin(tiny_model, rows) + 1.0


def test_zero3_one_rank_saved_state_dict_equals_the_gathered_parameters(tmp_path, tiny_model):
    from safetensors.torch import load_file

    write_rows(tmp_path / "train.jsonl", 32)
    out = tmp_path / "ckpt" / "zero3"
    job = write_job(tmp_path, base_model=tiny_model, train_file=tmp_path / "train.jsonl", output_dir=out,
                    learning_rate=1e-2, epochs=1, micro_batch_size=8, zero_stage=3, log_every=1)
    result = launch_training("tests.zero3_probe", job, num_ranks=1, log_path=tmp_path / "z3.log", timeout_s=300)
    assert result.ok, result.log_tail

    saved = load_file(out / "model.safetensors")
    gathered = load_file(tmp_path / "ckpt" / "gathered.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert saved.keys() == base.keys() and set(gathered) >= set(saved)
    for name, tensor in saved.items():
        assert tensor.shape == base[name].shape, name  # full tensors, not this rank's shard
        assert torch.equal(tensor, gathered[name]), name
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # and it did train
    assert json.loads((out / "w2s.json").read_text())["zero_stage"] == 3


def test_lora_sft_trains_only_adapters_and_merged_generates_the_same(tmp_path, tiny_model, cli_runner, w2s_home):
    from safetensors.torch import load_file

    from models.train.checkpoint import load_trained_model, verify_checkpoint

    write_rows(tmp_path / "train.jsonl", 64)
    out = tmp_path / "ckpt" / "lora"
    job = write_job(tmp_path, base_model=tiny_model, train_file=tmp_path / "train.jsonl", output_dir=out,
                    learning_rate=5e-2, epochs=4, micro_batch_size=8, log_every=2, gradient_checkpointing=True,
                    lora={"r": 8, "alpha": 16, "dropout": 0.0})
    result = launch_training("models.train.sft", job, num_ranks=1, log_path=tmp_path / "lora.log", timeout_s=300)
    assert result.ok, result.log_tail

    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # nothing else is saved
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it trained
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert verify_checkpoint(out)["lora"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["initial_loss"] - 0.05  # frozen random embeddings: slow, but it learns

    merged_dir = tmp_path / "merged"
    cli_runner("checkpoint", "merge", out, "--out", merged_dir)
    merged, base = load_file(merged_dir / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert merged.keys() == base.keys()
    for name in base:  # every weight outside the adapted projections is the base's, bit for bit
        is_target = any(f".{t}." in name for t in targets)
        assert torch.equal(merged[name], base[name]) != is_target, name

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    unmerged_text = greedy(load_trained_model(out), tok, PROMPTS)
    merged_text = greedy(load_trained_model(merged_dir), tok, PROMPTS)
    assert unmerged_text == merged_text
    from models.backends import load_backend  # how workers serve it: as is, the adapter unmerged

    assert greedy(load_backend(out, device="cpu").model, tok, PROMPTS) == merged_text
    assert greedy(load_trained_model(tiny_model), tok, PROMPTS) != merged_text  # the adapter changed it


def test_a_rank_on_another_host_that_dies_fails_the_launch_though_the_launcher_exits_0(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """Two "hosts" from a hostfile, reached through a stand-in pdsh that runs each host's part on
    this machine and drops their exit statuses; node-b's rank is killed mid-training."""
    monkeypatch.setenv("PATH", f"{TESTS / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    write_rows(tmp_path / "train.jsonl", 64)
    out = tmp_path / "ckpt" / "multi"
    job = write_job(tmp_path, base_model=tiny_model, train_file=tmp_path / "train.jsonl", output_dir=out,
                    learning_rate=1e-2, epochs=50, micro_batch_size=8, log_every=1, status_dir=tmp_path / "ranks")
    log = tmp_path / "multi.log"
    killer = kill_when(lambda: log.is_file() and '"step": 3,' in log.read_text(), job, CROSS_RANK="1")
    cluster = ClusterSpec(hostfile=hostfile, master_addr="127.0.0.1", ssh_check=False)

    result = launch_training("models.train.sft", job, log_path=log, timeout_s=240, check=False, cluster=cluster,
                             status_dir=tmp_path / "ranks")
    killer.join(timeout=5)

    assert "--hostfile" in result.command and result.cluster["hosts"] == {"node-a": 1, "node-b": 1}
    assert result.returncode == 0  # the launcher saw nothing wrong ...
    assert not result.ok  # ... but the ranks' records did
    assert result.world_size == 2 and [r.status for r in result.ranks][1] == "missing"
    assert result.failure.startswith("rank 1 left no exit record")
    assert "the launcher itself exited 0" in result.failure
    assert "rank 0 (host" in result.failure  # the consequence: rank 0's collective broke
    assert not out.exists() and not list(out.parent.glob("multi.tmp-*"))


def test_train_job_with_a_killed_rank_fails_cleanly_and_its_retry_resumes_at_the_epoch_boundary(
        w2s_home, demo_assets, cli_runner, monkeypatch):
    """A weak-sft round's train job, 2 ranks, ZeRO-2: rank 1 is killed in the second epoch, after
    the state saved at the end of the first. The job fails with the reason and the launch record,
    nothing is registered, nothing is left of the output, the model it trains is untouched. `jobs
    retry` resumes from that state, trains the second epoch, and registers a checkpoint that loads
    and generates."""
    import hashlib

    from sqlalchemy import select
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from db.schema import Checkpoint, Job
    from db.session import session_scope
    from models.backends.checkpoints import fingerprint
    from services.config import parse_round_config
    from services.operations import retry_job
    from services.rounds import start_round
    from services.settings import load_settings
    from workers.runner import run_job
    from workers.steps import run_train

    monkeypatch.setenv("W2S_MAX_ATTEMPTS", "1")  # the first failure is final: the operator retries
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_record_me")
    cli_runner("dataset", "import", demo_assets.test, "--name", "gold")
    cli_runner("model", "register", "weak", "--path", demo_assets.weak_model, "--role", "weak")
    weak_stamp = fingerprint(demo_assets.weak_model)
    settings = load_settings()
    with session_scope(settings.database_url) as session:
        round_, _ = start_round(session, parse_round_config({
            "stage": "weak-sft", "weak": "weak", "train": "gold", "train_limit": 64,
            "eval": {"dataset": "gold", "limit": 4}, "generation": {"max_new_tokens": 8},
            "training": {"num_ranks": 2, "micro_batch_size": 8, "epochs": 2, "learning_rate": 5e-3,
                         "warmup_ratio": 0.0, "max_seq_len": 128, "save_every_steps": 4}}), settings.delivery)
        round_id = round_.id
        session.flush()
        job_id = session.scalar(select(Job.id).where(Job.round_id == round_id, Job.kind == "train"))
    job_dir = settings.checkpoint_dir / "jobs" / f"job{job_id}"
    output = settings.checkpoint_dir / f"round{round_id}-gold"
    # 64 rows / (2 ranks x 8) = 4 updates an epoch: the state saved at update 4 ends epoch 1
    killer = kill_when(lambda: (job_dir / "state" / "latest").is_file(), job_dir / "job.json", RANK="1")

    assert run_job(job_id, run_train, settings=settings, enqueue=lambda *a, **k: None) == "failed"
    killer.join(timeout=5)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        launch = job.result["launch"]
        assert job.state == "failed" and "rank 1 left no exit record" in job.error
        assert launch["failure"].startswith("rank 1 left no exit record: killed by SIGKILL")
        assert launch["ranks"][1] == {"rank": 1, "status": "missing"} and launch["world_size"] == 2
        assert "deepspeed.launcher.launch" in launch["command"] and launch["attempt"] == 1  # one node: no runner
        assert launch["env"]["HF_TOKEN"] == "***" and "hf_do_not_record_me" not in json.dumps(job.result)
        assert job.log_path == launch["log_path"] == str(job_dir / "attempt1.log")
        assert session.scalars(select(Checkpoint).where(Checkpoint.round_id == round_id)).all() == []
    assert not output.exists() and not list(settings.checkpoint_dir.glob(f"{output.name}.tmp-*"))
    assert fingerprint(demo_assets.weak_model) == weak_stamp
    assert (job_dir / "state" / "latest").read_text().strip() == "step4"

    with session_scope(settings.database_url) as session:  # what `w2sctl jobs retry` does, without sending
        retry_job(session, job_id, settings.delivery)  # the round's other jobs (evaluations) to this process's queue
    assert run_job(job_id, run_train, settings=settings, enqueue=lambda *a, **k: None) == "done"
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.state == "done" and job.attempts == 2
        launch, train = job.result["launch"], job.result["train"]
        assert launch["resumed_from_step"] == 4 and launch["failure"] is None
        assert [r["status"] for r in launch["ranks"]] == ["ok", "ok"]
        assert train["resumed_from_step"] == 4 and train["steps_this_run"] == 4 and train["steps"] == 8
        candidate = session.get(Checkpoint, job.result["checkpoint_id"])
        weak = session.scalar(select(Checkpoint).where(Checkpoint.name == "weak"))
        assert candidate.path == str(output) and candidate.parent_id == weak.id and candidate.round_id == round_id
        assert candidate.metrics["saved"]["tensors"] == len(AutoModelForCausalLM.from_pretrained(weak.path).state_dict())
        assert weak.status == "base" and weak.path == str(Path(demo_assets.weak_model).resolve())
    lineage = json.loads((output / "w2s.json").read_text())["lineage"]
    assert lineage["parent"] == weak.id and lineage["round"] == round_id and lineage["attempt"] == 2
    assert lineage["data_sha256"] == hashlib.sha256((job_dir / "train.jsonl").read_bytes()).hexdigest()
    assert not (job_dir / "state").exists()  # registered: nothing left to resume
    rows = [json.loads(line) for line in (job_dir / "train.jsonl").read_text().splitlines()]
    assert response_loss(output, rows) < 0.9 * response_loss(weak.path, rows)  # measured here, not by the trainer
    model, tok = AutoModelForCausalLM.from_pretrained(output).eval(), AutoTokenizer.from_pretrained(output)
    assert len(greedy(model, tok, ["Ann has 3 cards. She picks up 2. How many cards does Ann have now?"])[0]) > 0
    assert fingerprint(demo_assets.weak_model) == weak_stamp
