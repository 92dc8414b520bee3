#!/usr/bin/env bash
# Regenerates kernels/igcam.ptx, the precompiled kernel shipped in the wheel (so that no nvcc is needed at run
# time: the driver JIT-compiles PTX for the GPU at hand). compute_75 is the oldest target CUDA 13 supports.
set -euo pipefail
cd "$(dirname "$0")"
nvcc -ptx -arch=compute_75 -O3 -o igcam.ptx igcam.cu
