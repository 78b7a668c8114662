#!/usr/bin/env bash
# vLLM on one CUDA GPU, full-size IXC2-4KHD architecture with random bf16 weights: HD-25 and HD-55 A4 pages
# at 1/16/64 concurrent requests, CUDA graphs on; throughput, time to first token, peak GPU memory.
# Needs CUDA vLLM: either already installed in $PYTHON's environment, or a package index to install
# `hd4k-tools[vllm]` from (set INSTALL=1). Figures go to stdout and, with --append-results, RESULTS.md.
#   benchmarks/gpu_bench_vllm.sh [--concurrency 1 16 64] [--hd-nums 25 55] [--append-results]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${INSTALL:-0}" = 1 ]; then
  "$PYTHON" -m venv .venv-gpu
  PYTHON=.venv-gpu/bin/python
  "$PYTHON" -m pip install -e ".[vllm]"
fi
"$PYTHON" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU'; print('vllm', vllm.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
exec "$PYTHON" benchmarks/gpu_bench_vllm.py "$@"
