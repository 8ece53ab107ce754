#!/usr/bin/env bash
# The benchmark on a GPU, within about five minutes and with no downloads: the paper model,
# WGAN-GP, N in {1, 10, 100}, against the naive per-replica loop; the exchange (N = 100) and one
# evaluation at N = 10 and 100. Needs only jax (CUDA), flax, optax, numpy, pillow:
#   bash scripts/gpu_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
export PYTHONPATH=src XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m ggans.bench --models paper --losses wgan_gp --nodes 1,10,100 \
  --steps 10 --repeats 2 --naive-max-replica-steps 40 --exchange 100 --eval 10,100 \
  --timeout 240 --out "$out/gpu_bench.json" | tee "$out/gpu_bench.md"
