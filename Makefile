# The two commands of the quick start. Each sets up what it needs first.
.PHONY: setup demo test test-fast

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/w2sctl demo

test: setup
	.venv/bin/pytest -q

# The folders that need no server (PostgreSQL, Redis) and launch no DeepSpeed training.
test-fast: setup
	.venv/bin/pytest -q -m "unit or models or conformance"
