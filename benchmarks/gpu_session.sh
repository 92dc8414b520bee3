#!/usr/bin/env bash
# One GPU session: install this project beside the carried onnxruntime-gpu and pycuda (see
# ../shared/device/pack-gpu-stack.sh), run the GPU tests and the GPU benchmark, keep logs under $OUT.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/igcam-gpu}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
python3 -m igcam_engine.benchmarks.gpu --steps 50 --repeats 50 --json "$OUT/results-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log" | tail -12
