#!/usr/bin/env bash
# The paper's scalability and non-iid experiments at the paper's settings (I = 20,000, K = 200)
# within 9 minutes on one GPU, as far as they get (plan.json says how far), seeds in one
# program each. Writes non_iid.tar.gz and scalability.tar.gz (metrics, summaries, final grids)
# to OUT_DIR; draw them here with: tar xzf ...; python -m ggans.report non_iid scalability
#   bash scripts/gpu_reproduce.sh [OUT_DIR] [SEEDS]      (default $OUT, else .; 3 seeds)
# Needs jax (CUDA), flax, optax, orbax-checkpoint, numpy, pillow, tqdm; MNIST in $GGANS_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
export PYTHONPATH=src XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
timeout 570 python3 benchmarks/gpu_reproduce.py "$out" --deadline 480 --seeds "${2:-3}"
