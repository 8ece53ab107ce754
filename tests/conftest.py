"""Shared fixtures and helpers: the MNIST folder (skip when absent), small synthetic data, a
tolerance check for pytrees of arrays, the command line as a subprocess, and the oneDNN
kernels' state (asked for at test time only: collecting the tests never starts a compiler)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Tests run tiny models for a few steps: compile time dominates, so ask XLA for less
# optimisation, and share compiled programs between the CLI subprocesses of a session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after XLA_FLAGS)

# The persistent cache serves the command-line subprocesses only: read back in this long-lived
# process, the CPU plug-in's round crashed XLA's deserialiser late in a full session (twice on
# 2026-12-02, at the same test; never when that test ran alone).
jax.config.update("jax_enable_compilation_cache", False)
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


def tiny_run_config(**overrides):
    """A RunConfig of a few seconds: two machines of the tiny model, federated, two rounds of
    two steps on 1% of MNIST, no scores, no checkpoints before the end."""
    from ggans.config import CheckpointConfig, DataConfig, EvalConfig, ProtocolConfig, RunConfig
    from ggans.gan import GanSpec

    base = dict(
        nodes=2,
        protocol=ProtocolConfig("federated"),
        local_steps=2,
        iterations=4,
        model=GanSpec(arch="tiny", noise_dim=16, batch_size=8),
        data=DataConfig(fraction=0.01),
        eval=EvalConfig(every=0),
        checkpoint=CheckpointConfig(0),
    )
    return RunConfig(**{**base, **overrides})


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


def ggans(*args, data_dir=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m ggans *args`` in a subprocess, its output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if data_dir is not None:
        env["GGANS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "ggans", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


@pytest.fixture
def onednn_ready():
    """Skip unless the oneDNN kernels are built and in use (building them if need be)."""
    from ggans.cpu import onednn

    if jax.default_backend() != "cpu" or onednn.status() != "ready":
        pytest.skip(f"oneDNN kernels not in use here: {onednn.status()} on {jax.default_backend()}")


needs_onednn = pytest.mark.usefixtures("onednn_ready")


@contextlib.contextmanager
def status_under(monkeypatch, patch):
    """``onednn.status()`` recomputed with ``patch(m)``'s monkeypatches in force; the patches
    are undone and the status recomputed afresh after the block."""
    from ggans.cpu import onednn

    with monkeypatch.context() as m:
        patch(m)
        onednn.status.cache_clear()
        try:
            yield
        finally:
            onednn.status.cache_clear()


def onednn_off(m) -> None:
    m.setenv("GGANS_ONEDNN", "0")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: each compiled round holds about
    2,000 memory mappings on XLA's CPU backend, and past the kernel's 65,530 a compile
    segfaults (it did, late in full sessions, before this)."""
    yield
    jax.clear_caches()
