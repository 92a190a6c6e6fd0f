#!/usr/bin/env bash
# Creates .venv and installs w2s into it. Idempotent: a second run only checks.
# CPU machines get torch's CPU build (torch==2.13.0, the file on disk here); on a GPU cluster
# install the CUDA build of torch first (see README), and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
fi
stamp=.venv/.w2s-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi
