"""Choosing the vllm backend (no vLLM needed): a worker's --backend vllm runs one solo process over
its GPU set with vLLM's process settings; W2S_VLLM_* settings reach the engine's loader; a round or
a voter names its backend; one vLLM engine per process (a new checkpoint closes the one before)."""

from __future__ import annotations

import pytest

from models.backends import loader
from services.config import ConfigError, GenerationConfig, StrategyConfig
from services.errors import InputError
from services.settings import load_settings
from workers.roles import WorkerPlan, apply_gpus, celery_argv, plan_worker, vllm_environment


def plan(**kwargs) -> WorkerPlan:
    return plan_worker(**{"roles": "strong", "queues": None, "gpus": None, "concurrency": None, **kwargs})


def test_a_vllm_worker_is_one_solo_process_over_its_gpus():
    two = plan(gpus="0,1", backend="vllm")
    assert (two.concurrency, two.pool, two.pin_per_process, two.backend) == (1, "solo", False, "vllm")
    assert "--pool=solo" in celery_argv(two, loglevel="info", hostname=None)
    assert "--pool=solo" not in celery_argv(plan(gpus="0,1"), loglevel="info", hostname=None)
    for kwargs, message in [({"gpus": "0,1", "concurrency": 2}, "one engine per worker process"),
                            ({"roles": "train"}, "only the weak and strong roles"),
                            ({"backend": "tgi"}, "--backend: unknown 'tgi'")]:
        with pytest.raises(InputError, match=message):
            plan(**{"backend": "vllm", **kwargs})


def test_vllm_process_settings():
    assert vllm_environment(["0", "1"], {}) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "CUDA_VISIBLE_DEVICES": "0,1",
                                                "W2S_VLLM_TENSOR_PARALLEL_SIZE": "2"}
    one = vllm_environment(["3"], {"W2S_VLLM_TENSOR_PARALLEL_SIZE": "1"})
    assert one == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "CUDA_VISIBLE_DEVICES": "3",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one device: the engine core in-process
    assert vllm_environment([], {})["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # CPU


def test_apply_gpus_sets_the_workers_environment(monkeypatch):
    for name in ("W2S_BACKEND", "CUDA_VISIBLE_DEVICES", "W2S_PIN_GPUS", "W2S_VLLM_TENSOR_PARALLEL_SIZE",
                 "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(name, "")  # recorded, so what apply_gpus sets is undone after the test
        monkeypatch.delenv(name)
    import os

    apply_gpus(plan(gpus="2,3", backend="vllm"))
    assert (os.environ["W2S_BACKEND"], os.environ["CUDA_VISIBLE_DEVICES"]) == ("vllm", "2,3")
    assert "W2S_PIN_GPUS" not in os.environ  # not pinned per pool process: one engine sees both
    settings = load_settings(dict(os.environ))
    assert settings.backend == "vllm" and settings.backend_options()["vllm"]["tensor_parallel_size"] == 2


def test_vllm_settings():
    options = load_settings({"W2S_VLLM_GPU_MEMORY_UTILIZATION": "0.5", "W2S_VLLM_ENFORCE_EAGER": "true",
                             "W2S_VLLM_MAX_MODEL_LEN": "4096"}).backend_options()["vllm"]
    assert options == {"gpu_memory_utilization": 0.5, "enforce_eager": True, "tensor_parallel_size": 1,
                       "max_model_len": 4096, "max_lora_rank": 64, "block_size": None}
    for env, name in [({"W2S_VLLM_GPU_MEMORY_UTILIZATION": "1.5"}, "W2S_VLLM_GPU_MEMORY_UTILIZATION=.1.5."),
                      ({"W2S_BACKEND": "tgi"}, "W2S_BACKEND='tgi'")]:
        with pytest.raises(ConfigError, match=name):
            load_settings(env)


def test_a_round_and_a_voter_name_their_backend():
    assert GenerationConfig(backend="vllm").backend == "vllm" and GenerationConfig().backend is None
    assert StrategyConfig(backend="vllm").label() == "cot"  # stored figures are named as before
    with pytest.raises(ValueError, match="backend"):
        StrategyConfig(backend="tgi")


class FakeEngine:
    def __init__(self, name: str, path, closed: list):
        self.name, self.path, self.fingerprint, self.closed = name, path, "same", closed

    def close(self):
        self.closed.append(self.path)

    def formatted(self, prompt_format):
        return self


def test_one_vllm_engine_per_process_and_options_reach_its_loader(tmp_path, monkeypatch):
    loads, closed = [], []

    def fake_load(path, *, backend=None, **options):
        loads.append((str(path), backend, options))
        return FakeEngine(backend, path, closed)

    monkeypatch.setattr(loader, "load_backend", fake_load)
    monkeypatch.setattr(loader, "check_checkpoint_dir", lambda path, backend=None: tmp_path / path)
    monkeypatch.setattr(loader, "fingerprint", lambda path: "same")
    cache = loader.ModelCache(capacity=2, backend_options={"vllm": {"enforce_eager": True}})
    weak = cache.get("weak", backend="vllm")
    assert cache.get("weak", backend="vllm") is weak and closed == []
    cache.get("strong", backend="vllm")  # a new checkpoint: the engine before is shut down first
    assert closed == [str(tmp_path / "weak")] and len(cache) == 1
    cache.get("other", backend="transformers")  # other backends keep the usual capacity
    assert len(cache) == 2 and closed == [str(tmp_path / "weak")]
    assert loads[0][2]["enforce_eager"] is True and "enforce_eager" not in loads[-1][2]


def test_a_vllm_engine_decodes_with_the_settings_transformers_applies():
    from models.backends.decoding import UnsupportedDecoding, vllm_sampling

    shipped = {"repetition_penalty": 1.2, "top_k": 20, "temperature": 0.6, "do_sample": True, "eos_token_id": 2}
    # the file's penalty, as transformers applies it; w2s's own sampling fields never count
    assert vllm_sampling(shipped) == {"repetition_penalty": 1.2}
    # a registration's override wins over the file, as the transformers loader writes it over
    assert vllm_sampling(shipped, {"repetition_penalty": 1.05}) == {"repetition_penalty": 1.05}
    assert vllm_sampling(shipped, {"repetition_penalty": 1.0}) == {}
    assert vllm_sampling({}) == {}
    # plain values of fields vLLM lacks are no change: nothing to refuse
    assert vllm_sampling({"no_repeat_ngram_size": 0, "num_beams": 1, "min_p": None}) == {}
    for config, named in (({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size=3"), ({"num_beams": 4}, "num_beams=4"),
                          ({"min_p": 0.05}, "min_p=0.05"), ({"typical_p": 0.9}, "typical_p=0.9")):
        with pytest.raises(UnsupportedDecoding, match=named) as refused:
            vllm_sampling({**shipped, **config})
        field = named.split("=")[0]
        assert f"--decoding {field}=" in str(refused.value)
        # the override it suggests makes the model load
        fix = str(refused.value).split(f"--decoding {field}=", 1)[1].split()[0]
        from models.backends.decoding import parse_overrides

        assert vllm_sampling({**shipped, **config}, parse_overrides([f"{field}={fix}"], config)) == {"repetition_penalty": 1.2}
    with pytest.raises(UnsupportedDecoding, match="no_repeat_ngram_size"):  # an override can add one, too
        vllm_sampling({}, {"no_repeat_ngram_size": 2})


def test_registered_decoding_overrides_reach_a_vllm_engine(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(loader, "load_backend", lambda path, *, backend=None, **options: loads.append(options) or
                        FakeEngine(backend, path, []))
    monkeypatch.setattr(loader, "check_checkpoint_dir", lambda path, backend=None: tmp_path / path)
    monkeypatch.setattr(loader, "fingerprint", lambda path: "same")
    loader.ModelCache().get("m", backend="vllm", decoding={"repetition_penalty": 1.0})
    assert loads[-1]["decoding"] == {"repetition_penalty": 1.0}
