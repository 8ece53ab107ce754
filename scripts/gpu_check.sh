#!/usr/bin/env bash
# The GPU check of the backends issue, within 6 minutes and with no downloads: replica-steps/s of
# the paper model's round for each candidate layer set and precision at N in {1, 10, 100, 400},
# compile time, peak memory, share of the matmul rate, the PyTorch loop on the same GPU, and a
# short run per precision with MS and FID (when GGANS_DATA_DIR holds MNIST; carry it in).
# Needs jax (CUDA), flax, optax, orbax-checkpoint, numpy, pillow, torch:
#   bash scripts/gpu_check.sh [OUT_DIR]      (default $OUT, else .)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONPATH=src XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 350 python3 benchmarks/gpu_check.py "$out" --deadline 330
