#!/usr/bin/env bash
# The GPU verification to run first on a machine with a GPU (under 10 minutes on one GPU):
# cuda-python as runtime/cuda.py uses it (graph capture and replay), TensorRT engines built
# from a tiny export (strongly typed and pinned) checked against ONNX Runtime, loc3r-run's
# tensorrt / onnxruntime / torch backends at 16:9 and 9:16, the int4 GQA decoder on the CUDA
# provider against the CPU, --backend onnxruntime with and without `import tensorrt` first.
# Prints one table; a missing piece is a "skipped: why" row. Exit 1 when a row fails.
#   benchmarks/gpu_verify.sh [--keep DIR]      (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec timeout 600 "$python" -m loc3r.bench.gpu_verify "$@"
