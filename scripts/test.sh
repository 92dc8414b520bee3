#!/usr/bin/env bash
# The project's test command: installs what is missing, runs the suite, then re-runs the torch-free tests
# in a second virtualenv where torch is not installed at all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Node.js embedding example (tests/test_node.py): onnxruntime-node's CPU binaries ship in the package; its
# install script, which would download CUDA binaries, is switched off.
(cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"

PYTHON=${PYTHON:-python3}
[ -x .venv-notorch/bin/python ] || "$PYTHON" -m venv .venv-notorch
.venv-notorch/bin/python -m pip install -q --upgrade pip
.venv-notorch/bin/python -m pip install -q -e ".[cpu,onnx]" pytest
if .venv-notorch/bin/python -c "import torch" 2>/dev/null; then
  echo "error: torch is importable in .venv-notorch; the torch-free check would prove nothing" >&2
  exit 1
fi
.venv-notorch/bin/python -m pytest -q -m notorch tests/test_without_torch.py
