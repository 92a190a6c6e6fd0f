"""What a checkpoint's files decide at load (issue 17 item 8): generation_config.json's decoding
settings apply unless a registration overrides them, and the dtype follows the device."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from models.backends import ModelCache
from models.generation import generate
from models.prompts import zero_shot


@pytest.fixture
def penalised(demo_assets, tmp_path):
    """The tiny strong model, shipped in bf16 by its config with a repetition penalty in its generation config."""
    path = tmp_path / "penalised"
    shutil.copytree(demo_assets.strong_model, path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 5.0}))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return path


def test_generation_config_applies_unless_the_registration_overrides_it(penalised, demo_assets):
    cache = ModelCache(capacity=2)
    as_shipped = cache.get(penalised)
    overridden = cache.get(penalised, decoding={"repetition_penalty": 1.0})
    assert len(cache) == 2 and cache.loads == 2  # another decoding is another model in the cache
    assert as_shipped.model.generation_config.repetition_penalty == 5.0
    assert overridden.model.generation_config.repetition_penalty == 1.0
    # The penalty changes what greedy decoding writes; without it the answers are the plain model's.
    plain = ModelCache().get(demo_assets.strong_model)
    prompts = [zero_shot("Sam has 3 beads. He gives away 1. He finds 3 more. How many beads does Sam have now?")]
    texts = {name: generate(backend, prompts, max_new_tokens=24)[0][0].text
             for name, backend in (("shipped", as_shipped), ("overridden", overridden), ("plain", plain))}
    assert texts["overridden"] == texts["plain"] != texts["shipped"]


def test_a_bf16_checkpoint_loads_in_float32_on_cpu(penalised):
    loaded = ModelCache().get(penalised)
    assert loaded.model.device.type == "cpu"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    # and a generate job records that dtype with the engine (loader.describe)
    from models.backends.loader import describe

    engine = describe(loaded)
    assert engine["name"] == "transformers" and engine["dtype"] == loaded.dtype == "float32", engine
