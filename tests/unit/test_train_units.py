"""Training supervision as pure pieces: DeepSpeed configs, hostfiles, the per-rank exit check,
failure reasons, redaction, resume positions, resumable-state fingerprints, checkpoint checks."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from models.train.common import render_ds_config, resume_batches
from models.train.launch import (
    ClusterSpec,
    RankStatus,
    check_devices,
    check_ranks,
    failure_reason,
    launch_training,
    parse_hostfile,
    plan_launch,
    prepare_state_dir,
    redact_env,
)
from models.train.options import DEFAULT_LORA_TARGETS, LoraOptions
from models.train.sft import SFTConfig
from services.config import ConfigError
from services.settings import load_settings

# -- DeepSpeed configs -----------------------------------------------------------------------------


def test_zero_templates_are_filled_and_unused_offload_removed():
    z2 = render_ds_config(2, micro_batch_size=4, gradient_accumulation_steps=8, max_grad_norm=1.0, bf16=False)
    assert z2["train_micro_batch_size_per_gpu"] == 4 and z2["gradient_accumulation_steps"] == 8
    assert z2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in z2["zero_optimization"]
    assert z2["bf16"] == {"enabled": False}
    assert "auto" not in json.dumps(z2)

    z3 = render_ds_config(3, micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=0.5, bf16=True,
                          offload_optimizer="cpu", offload_params="cpu", pin_memory=True)
    zero = z3["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z3["bf16"] == {"enabled": True} and z3["gradient_clipping"] == 0.5
    assert "auto" not in json.dumps(z3)


def test_job_config_checks_offload_and_resume_fields(tmp_path):
    base = {"base_model": tmp_path, "train_file": tmp_path, "output_dir": tmp_path / "out"}
    with pytest.raises(ValueError, match="offload_params: needs zero_stage 3"):
        SFTConfig(**base, zero_stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="save_every_steps"):
        SFTConfig(**base, save_every_steps=10)
    with pytest.raises(ValueError, match="offload_optimizer"):
        SFTConfig(**base, offload_optimizer="nvme")
    assert SFTConfig(**base, lora={}).lora.target_modules == list(DEFAULT_LORA_TARGETS)


def test_lora_options_defaults_and_errors():
    options = LoraOptions()
    assert options.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="r"):
        LoraOptions(r=0)
    with pytest.raises(ValueError, match="target_modules"):
        LoraOptions(target_modules=["q proj"])


def test_round_config_training_fields_name_the_field():
    from services.config import ConfigError, parse_round_config

    base = {"stage": "sft", "weak": "w", "strong": "s", "pool": "p", "eval": {"dataset": "e"}}
    config = parse_round_config({**base, "training": {"lora": {"r": 8}, "zero_stage": 3, "offload_params": "cpu"}})
    assert config.training.lora.r == 8 and config.training.num_ranks is None
    with pytest.raises(ConfigError, match="training.lora.dropout"):
        parse_round_config({**base, "training": {"lora": {"dropout": 1.5}}})
    with pytest.raises(ConfigError, match="offload_params"):
        parse_round_config({**base, "training": {"offload_params": "cpu"}})


# -- resume positions ------------------------------------------------------------------------------


def positions(n_batches: int, epochs: int, skip: int) -> tuple[list[tuple[int, int]], list[int]]:
    epochs_set: list[int] = []
    got = [(e, i) for e, i, _ in resume_batches(list(range(n_batches)), epochs_set.append, epochs=epochs, skip=skip)]
    return got, epochs_set


def test_resume_batches_from_the_start_mid_epoch_and_at_an_epoch_boundary():
    got, shuffled = positions(4, 3, 0)
    assert got == [(e, i) for e in range(3) for i in range(4)] and shuffled == [0, 1, 2]
    got, shuffled = positions(4, 3, 6)  # two batches into the second epoch
    assert got[0] == (1, 2) and len(got) == 12 - 6 and shuffled == [1, 2]
    got, shuffled = positions(4, 3, 4)  # saved exactly at the end of epoch 1: epochs 2 and 3 still run
    assert got[0] == (1, 0) and len(got) == 8 and shuffled == [1, 2]
    got, shuffled = positions(4, 3, 12)  # everything trained already
    assert got == [] and shuffled == []


def test_state_dir_is_kept_only_for_the_same_job(tmp_path):
    state = tmp_path / "state"
    fingerprint = {"data_sha256": "abc", "training": {"epochs": 2}}
    assert prepare_state_dir(state, fingerprint) == 0
    (state / "step6").mkdir()
    (state / "latest").write_text("step6")
    assert prepare_state_dir(state, fingerprint) == 6  # a retry of the same job resumes
    assert prepare_state_dir(state, {**fingerprint, "data_sha256": "other"}) == 0  # other data: clean
    assert not (state / "step6").exists() and not (state / "latest").exists()


# -- launch: hostfiles, commands, ranks, reasons, redaction ------------------------------------------


def test_hostfile_parsing_and_errors(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=4  # the small one\n")
    assert parse_hostfile(hostfile) == {"node-a": 8, "node-b": 4}
    hostfile.write_text("node-a slots=8\nnode-b\n")
    with pytest.raises(ValueError, match=r"hostfile .*:2: expected 'HOST slots=N'"):
        parse_hostfile(hostfile)
    hostfile.write_text("node-a slots=1\nnode-a slots=2\n")
    with pytest.raises(ValueError, match="listed twice"):
        parse_hostfile(hostfile)
    with pytest.raises(FileNotFoundError, match="hostfile"):
        parse_hostfile(tmp_path / "missing")


def test_multi_node_command_and_world_size(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    cluster = ClusterSpec(**load_settings({"W2S_TRAIN_HOSTFILE": str(hostfile), "W2S_TRAIN_MASTER_ADDR": "10.0.0.1",
                                           "W2S_TRAIN_MASTER_PORT": "29600", "W2S_TRAIN_LAUNCHER": "openmpi",
                                           "W2S_TRAIN_SSH_CHECK": "0"}).cluster_options())
    assert cluster.world_size(num_ranks=1) == 4
    plan = plan_launch("models.train.sft", tmp_path / "job.json", num_ranks=1, master_port=29600, cluster=cluster)
    joined = " ".join(plan.command)
    assert plan.command[1:4] == ["-u", "-m", "deepspeed.launcher.runner"] and plan.env == {}  # several nodes: the runner
    assert f"--hostfile {hostfile}" in joined and "--launcher openmpi" in joined
    assert "--master_addr 10.0.0.1" in joined and "--master_port 29600" in joined and "--no_ssh_check" in joined
    assert joined.endswith(f"--module --no_local_rank models.train.sft --config {tmp_path / 'job.json'}")
    with pytest.raises(ConfigError, match="W2S_TRAIN_MASTER_PORT='x'"):
        load_settings({"W2S_TRAIN_MASTER_PORT": "x"})
    with pytest.raises(ValueError, match="launcher"):
        ClusterSpec(launcher="ssh-loop")


def world_info(command: list[str]) -> dict:
    (arg,) = [a for a in command if a.startswith("--world_info=")]
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


def test_one_node_starts_deepspeeds_node_launcher_and_one_rank_alone_without_the_runner(tmp_path):
    """What DeepSpeed's runner would run for localhost, without the runner (docs/design-notes.md)."""
    job = tmp_path / "job.json"
    two = plan_launch("models.train.sft", job, num_ranks=2, master_port=29501, cluster=ClusterSpec())
    assert two.kind == "launch" and two.env == {} and "deepspeed.launcher.runner" not in two.command
    assert two.command[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert world_info(two.command) == {"localhost": [0, 1]}  # the runner's --num_gpus 2
    assert two.command[5:] == ["--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29501", "--module",
                               "--no_local_rank", "models.train.sft", "--config", str(job)]
    # named devices, in order, the first num_ranks of them (the runner's --include localhost:3,5)
    named = plan_launch("models.train.sft", job, num_ranks=2, master_port=1, cluster=ClusterSpec(gpus="3, 5,7"))
    assert world_info(named.command) == {"localhost": [3, 5]}
    visible = plan_launch("models.train.sft", job, num_ranks=2, master_port=1, visible_devices="6,2")
    assert world_info(visible.command) == {"localhost": [6, 2]}
    with pytest.raises(ValueError, match=r"3 ranks but only 2 visible devices \(6,2\)"):
        plan_launch("models.train.sft", job, num_ranks=3, master_port=1, visible_devices="6,2")

    one = plan_launch("models.train.sft", job, num_ranks=1, master_port=29502, visible_devices="4,1")
    assert one.kind == "rank" and one.command[1:] == ["-u", "-m", "models.train.sft", "--config", str(job)]
    assert one.env == {"CUDA_VISIBLE_DEVICES": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29502",
                       "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "0",
                       "CROSS_SIZE": "1"}
    assert plan_launch("m", job, num_ranks=1, master_port=1).env["CUDA_VISIBLE_DEVICES"] == "0"  # as --num_gpus 1
    # the worker's --gpus wins over CUDA_VISIBLE_DEVICES, as before
    assert plan_launch("m", job, num_ranks=1, master_port=1, visible_devices="4", cluster=ClusterSpec(gpus="2")
                       ).env["CUDA_VISIBLE_DEVICES"] == "2"


def test_a_named_device_the_host_lacks_is_refused_before_any_rank_starts(tmp_path, monkeypatch):
    """Without the runner's check the ranks would see no GPU and train on the CPU. A stand-in
    nvidia-smi lists two GPUs, whatever CUDA_VISIBLE_DEVICES says (as the real one does)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=index" ] || exit 2\nprintf "0\\n1\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    check_devices((1, 0))
    check_devices(("GPU-5f2c", 0))  # UUIDs are CUDA's to resolve
    with pytest.raises(ValueError, match=r"devices: 7 named, but this host's GPUs are 0, 1 \(nvidia-smi\)"):
        check_devices((0, 7))
    job = tmp_path / "job.json"
    job.write_text("{}")
    with pytest.raises(ValueError, match="devices: 3 named"):  # launch_training checks before it starts anything
        launch_training("models.train.sft", job, num_ranks=1, log_path=tmp_path / "x.log", cluster=ClusterSpec(gpus="3"))
    assert not (tmp_path / "x.log").exists()


def test_check_ranks_reads_one_record_per_rank(tmp_path):
    (tmp_path / "rank0.json").write_text(json.dumps({"rank": 0, "status": "ok", "host": "a", "node_rank": 0}))
    (tmp_path / "rank2.json").write_text(json.dumps({"rank": 2, "status": "error", "host": "b", "node_rank": 1,
                                                     "error": "RuntimeError: boom"}))
    statuses = check_ranks(tmp_path, 3)
    assert [s.status for s in statuses] == ["ok", "missing", "error"]
    assert statuses[2].host == "b" and statuses[2].error == "RuntimeError: boom"


def test_failure_reasons_name_the_cause_and_every_failed_rank():
    ok = [RankStatus(0, "ok"), RankStatus(1, "ok")]
    assert failure_reason(returncode=0, timed_out=False, timeout_s=60, ranks=ok, log_tail="") is None

    killed = [RankStatus(0, "error", host="a", node_rank=0, error="RuntimeError: Connection closed by peer"),
              RankStatus(1, "missing")]
    reason = failure_reason(returncode=0, timed_out=False, timeout_s=60, ranks=killed,
                            log_tail=f"[launch.py] ['python'] exits with return code = -{int(signal.SIGKILL)}")
    assert reason.startswith("rank 1 left no exit record: killed by SIGKILL")
    assert "rank 0 (host a, node 0) failed: RuntimeError: Connection closed by peer" in reason
    assert reason.endswith("the launcher itself exited 0")  # the case a launcher's status alone misses

    oom = [RankStatus(0, "error", error="OutOfMemoryError: CUDA out of memory", out_of_memory=True)]
    assert failure_reason(returncode=1, timed_out=False, timeout_s=60, ranks=oom, log_tail="").startswith(
        "out of memory on rank 0")
    hang = failure_reason(returncode=-15, timed_out=True, timeout_s=30, ranks=[], log_tail="")
    assert hang.startswith("hang: still running after the time limit of 30 s")
    assert failure_reason(returncode=2, timed_out=False, timeout_s=None, ranks=[], log_tail="") == \
        "launcher exited with status 2"
    # one rank started without a launcher: its own status names the signal
    alone = failure_reason(returncode=-int(signal.SIGKILL), timed_out=False, timeout_s=None,
                           ranks=[RankStatus(0, "missing")], log_tail="", process="rank")
    assert alone.startswith("rank 0 left no exit record: killed by SIGKILL (the kernel's OOM killer")
    assert alone.endswith(f"rank exited with status -{int(signal.SIGKILL)}")


def test_recorded_environment_hides_secrets():
    env = redact_env({"HF_TOKEN": "hf_abc", "W2S_DATABASE_URL": "postgresql+psycopg://w2s:s3cret@db/w2s",
                      "W2S_BROKER_URL": "redis://:pw@redis:6379/0", "TOKENIZERS_PARALLELISM": "false",
                      "AWS_SECRET_ACCESS_KEY": "x", "OMP_NUM_THREADS": "4", "HOME": "/root"})
    assert env == {"HF_TOKEN": "***", "W2S_DATABASE_URL": "postgresql+psycopg://w2s:***@db/w2s",
                   "W2S_BROKER_URL": "redis://:***@redis:6379/0", "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": "4"}
    assert "s3cret" not in json.dumps(env)


# -- checkpoint verification ---------------------------------------------------------------------


def tiny_llama(out: Path, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_verify_checkpoint_accepts_full_and_tied_models_and_names_what_is_wrong(tmp_path):
    from safetensors.torch import load_file, save_file

    from models.train.checkpoint import CheckpointMismatch, verify_checkpoint

    full = tiny_llama(tmp_path / "full")
    summary = verify_checkpoint(full)
    assert summary["tensors"] == 12 and not summary["lora"]
    assert verify_checkpoint(tiny_llama(tmp_path / "tied", tie=True))["tensors"] == 11  # lm_head saved once

    # what a ZeRO-3 save without gathering looks like: every tensor an empty shard
    weights = load_file(full / "model.safetensors")
    save_file({k: torch.empty(0) for k in weights}, full / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match=r"model.embed_tokens.weight: saved \[0\], model has \[40, 16\]"):
        verify_checkpoint(full)
    save_file({k: v for k, v in weights.items() if "mlp" not in k}, full / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match="mlp.down_proj.weight: missing"):
        verify_checkpoint(full)


def test_launch_record_keeps_rank_0_and_shows_gloo_errors_as_text():
    """`jobs show` prints a failed launch: rank 0 keeps its number, and an error holding
    "[/path:line]" (as gloo's do) is printed as text, not read as rich markup."""
    from rich.console import Console

    from cli.jobs import launch_table

    ranks = [RankStatus(rank=0, status="ok"), RankStatus(rank=1, status="error", error="[/__w/gloo/transport.cc:154] Connection closed by peer")]
    records = [status.as_dict() for status in ranks]
    assert records[0]["rank"] == 0 and "out_of_memory" not in records[0]
    console = Console(record=True, width=200)
    console.print(launch_table({"command": ["deepspeed", "--num_gpus", "2"], "ranks": records, "failure": "rank 1 [/x] died"}))
    text = console.export_text()
    assert "rank 0" in text and "[/__w/gloo/transport.cc:154] Connection closed by peer" in text
    assert "rank 1 [/x] died" in text
