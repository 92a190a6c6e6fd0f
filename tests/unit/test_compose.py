"""docker-compose.yml, the Dockerfile and .env.example agree with each other and with the code:
every role has a service, every service an image or a build, the stateful ones their volumes, the
model workers their GPUs, and every W2S_* variable they set is a field of the settings model
(services/settings.py), the one place the code reads W2S_* variables from."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from services.config import QUEUES

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("cli", "services", "workers", "models", "db")


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def variables_read_by_code() -> set[str]:
    from services.settings import env_names

    return env_names()


def test_every_role_has_a_service_with_an_image_or_a_build():
    services = compose()["services"]
    assert {"redis", "postgres", "flower", *QUEUES} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, f"service {name}: neither image nor build"
    for role in QUEUES:
        command = services[role]["command"]
        assert command[:3] == ["worker", "--role", role], f"service {role}: {command}"
        assert services[role]["build"] == "." and (REPO / "Dockerfile").is_file()


def test_state_lives_in_volumes_and_the_checkpoint_store_is_shared():
    data = compose()
    services, volumes = data["services"], set(data["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") and v.split(":")[0] in volumes
               for v in services["postgres"]["volumes"])
    assert any(v.split(":")[0] in volumes for v in services["redis"]["volumes"])
    for role in QUEUES:  # one named volume, mounted where every worker's W2S_CHECKPOINT_DIR points
        store = services[role]["environment"]["W2S_CHECKPOINT_DIR"]
        assert f"checkpoints:{store}" in services[role]["volumes"], role


def test_model_workers_reserve_gpus_and_the_broker_never_evicts():
    services = compose()["services"]
    for role in ("weak", "strong", "train"):
        devices = services[role]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] for d in devices), role
        assert "--gpus" in services[role]["command"], role
    assert "control" in services and "deploy" not in services["control"]
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in command and "--appendonly" in command
    # Nothing but Flower is published, and Flower only on the loopback address.
    published = {name: s.get("ports") for name, s in services.items() if s.get("ports")}
    assert set(published) == {"flower"} and all(p.startswith("127.0.0.1:") for p in published["flower"])


def test_environment_names_are_the_ones_the_code_reads():
    read = variables_read_by_code()
    assert {"W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR"} <= read
    text = (REPO / "docker-compose.yml").read_text() + (REPO / ".env.example").read_text()
    used = set(re.findall(r"\bW2S_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert used, "no W2S_ variable in the compose file or .env.example"
    assert used <= read, f"set but never read by the code: {sorted(used - read)}"
    for role in QUEUES:
        env = compose()["services"][role]["environment"]
        assert {"W2S_DATABASE_URL", "W2S_BROKER_URL", "W2S_CHECKPOINT_DIR"} <= set(env), role
    # Secrets come from .env, never written into the compose file.
    assert "change-me" not in (REPO / "docker-compose.yml").read_text()
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    interpolated = set(re.findall(r"\$\{([A-Z_]+)[:}?-]", (REPO / "docker-compose.yml").read_text()))
    assert interpolated <= set(example), f"used by the compose file, missing from .env.example: {interpolated - set(example)}"


def test_dockerfile_copies_what_the_package_needs():
    dockerfile = (REPO / "Dockerfile").read_text()
    for directory in CODE_DIRS:
        assert f"COPY {directory} {directory}" in dockerfile and (REPO / directory).is_dir()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M), "the image runs as root"
    assert 'ENTRYPOINT ["w2sctl"]' in dockerfile
