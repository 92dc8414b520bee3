#!/usr/bin/env bash
# Creates ./.venv with everything igcam-engine needs on CPU (runtime, OpenVINO backend, exporter, demo weights,
# benchmark plots, Ray Serve and Ray Data, test tools).
# torch: a torch the outer Python already has is reused (the venv then sees system packages); otherwise
# torch==2.13.0 (CPU build) is installed first, so that no other package pulls a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[cpu,openvino,export,demo,evaluate,bench,serve,scale,dev]"
echo "igcam-engine is installed in .venv (run .venv/bin/igcam --help)"
