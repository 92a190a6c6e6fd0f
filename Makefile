# The two commands of the quick start. Each sets up what it needs first.
.PHONY: setup demo test test-fast venv-vllm test-vllm

# DeepSpeed compiles a small op on first use into this cache; one per checkout, so a build killed in
# another checkout (its lock file left behind) can never make this one's launches wait forever.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/w2sctl demo

test: setup
	.venv/bin/pytest -q

# The folders that need no server (PostgreSQL, Redis) and launch no DeepSpeed training. Naming the
# folders as well as the markers keeps pytest from importing the other folders' modules to collect them.
test-fast: setup
	.venv/bin/pytest -q -m "unit or models or conformance" tests/unit tests/models tests/conformance

# The vLLM backend: its own environment (vLLM pins its own torch and transformers), never needed by
# the targets above. test-vllm compares it with transformers on the tiny models (tests/vllm).
venv-vllm:
	@scripts/setup-vllm.sh

test-vllm: setup venv-vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/pytest -q tests/vllm tests/models/test_vllm_outputs.py
