"""Shared fixtures and helpers: the MNIST folder (skip when absent), small synthetic data, and a
tolerance check for pytrees of arrays."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Tests run tiny models for a few steps: compile time dominates, so ask XLA for less
# optimisation, and share compiled programs between the CLI subprocesses of one session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

MNIST_DIR = Path(os.environ.get("GGANS_DATA_DIR") or ROOT.parent / "shared" / "data" / "mnist")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR} (set GGANS_DATA_DIR)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from ggans.data import load_mnist

    return load_mnist(mnist_dir)


def synthetic_shards(n: int, images: int = 64, seed: int = 0):
    """Random uint8 images split evenly over n machines (no MNIST needed)."""
    from ggans.training import Shards

    rng = np.random.default_rng(seed)
    pics = rng.integers(0, 256, (images, 28, 28, 1), dtype=np.uint8)
    index = np.arange(images).reshape(n, -1) if images % n == 0 else None
    assert index is not None
    return Shards(
        jnp.asarray(pics), jnp.asarray(index, jnp.int32), jnp.full((n,), images // n, jnp.int32)
    )


def assert_close(a, b, rtol: float, what: str = "") -> None:
    """Same tree, shapes and dtypes, and each leaf of ``b`` within ``rtol`` times the largest
    magnitude of the matching leaf of ``a`` (the reference)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, x.shape, y.shape)
        scale = float(jnp.max(jnp.abs(x))) + 1e-30
        err = float(jnp.max(jnp.abs(x - y)))
        assert err <= rtol * scale, f"{what}: max err {err:.3g} > {rtol} * {scale:.3g}"
