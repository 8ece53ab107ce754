"""oneDNN's convolutions and skinny matrix products inside XLA's CPU programs, as XLA FFI
custom calls.

On the CPU, XLA runs the paper's wide convolutions (64 -> 128 channels and the generator's
transposed ones) at 70-130 GFLOP/s in place; oneDNN, which PyTorch calls for the same layers,
runs them at 200-360. :mod:`ggans.layers` lowers its three convolution primitives (the forward
convolution, its transpose in the input and its transpose in the kernel) to oneDNN's forward,
backward-data and backward-weights primitives when :func:`available` is true: a float32, 2-d
convolution with non-negative padding, on the CPU; with a leading replica axis on every operand
(stacked replicas), one call runs them all, split over the OpenMP threads, one single-threaded
convolution per replica (``GGANS_ONEDNN_REPLICA_THREADS=1``: one replica after another, each on
oneDNN's own threads), which for the tiny model's layers is 4-6x faster than a loop of calls.
Where oneDNN is slow the kernels run direct, vectorised loops instead, one replica's batch
split over the threads: a convolution onto one output channel at stride 1 (the generator's
output layer: forward and kernel gradient, ``csrc/one_channel.h``; oneDNN leaves its vector
lanes idle there, 3-8x slower), a strided backward data onto 8-16 channels and a transposed
convolution onto one channel (``csrc/backward_data.h``; oneDNN's strided backward data runs at
a third of its forward's rate).

A dense layer's products with few rows and a large kernel (the paper's 6272 x 1024 layers at
batch 32 and 64: x @ W and its transposes) run on oneDNN's matmul where :func:`skinny` says so;
XLA's own run them 1.5-2x slower.

The kernels (``csrc/onednn_kernels.cc``, and ``csrc/adam_kernel.cc``, :mod:`ggans.adam`'s one-pass
update, which shares their OpenMP threads) are compiled on first use with the system's C++
compiler against jaxlib's FFI headers and the oneDNN of the ``onednn-cpu-gomp`` wheels, and cached
in ``$GGANS_CACHE_DIR`` (default ``~/.cache/ggans``). Without a compiler or those wheels, or with
``GGANS_ONEDNN=0``, everything runs on XLA's own convolutions and products and optax's update,
with the same results to float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "available",
    "conv",
    "conv_backward_data",
    "conv_backward_weights",
    "matmul",
    "skinny",
    "status",
]

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / f for f in ("onednn_kernels.cc", "adam_kernel.cc")]
HEADERS = [
    Path(__file__).parent / "csrc" / f for f in ("vec16.h", "one_channel.h", "backward_data.h")
]
ADAM_TARGET = "ggans_adam"  # ggans.adam's one-pass update, built into the same library
TARGETS = {
    "fwd": ("ggans_onednn_conv_fwd", "GgansConvFwd"),
    "bwd_data": ("ggans_onednn_conv_bwd_data", "GgansConvBwdData"),
    "bwd_weights": ("ggans_onednn_conv_bwd_weights", "GgansConvBwdWeights"),
    "matmul": ("ggans_onednn_matmul", "GgansMatmul"),
    "adam": (ADAM_TARGET, "GgansAdam"),
}
# A product goes to oneDNN when it has at most SKINNY_ROWS rows and a kernel of at least
# SKINNY_KERNEL elements, and is not a kernel gradient (XLA's are as fast there).
SKINNY_ROWS = 64
SKINNY_KERNEL = 1 << 20


def _wheel_file(dist: str, suffix: str) -> Path:
    for f in importlib.metadata.files(dist) or ():
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise FileNotFoundError(f"{suffix} not in the {dist} wheel")


def _cache_dir() -> Path:
    if os.environ.get("GGANS_CACHE_DIR"):
        return Path(os.environ["GGANS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ggans"


def _build() -> Path:
    """Compile the kernels (once per source, jax and oneDNN), returning the shared library."""
    lib = _wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
    header = _wheel_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    include = header.parent.parent.parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++ or $CXX)")
    cmd = [
        cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{include}", *map(str, SOURCES),
        f"-L{lib.parent}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib.parent}",
    ]  # fmt: skip
    sources = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    build = " ".join([*cmd, jax.__version__, sys.version]).encode()
    key = hashlib.sha256(sources + build).hexdigest()[:16]
    out = _cache_dir() / f"onednn-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        done = subprocess.run([*cmd, "-o", str(so)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
        os.replace(so, out)  # atomic: concurrent builders agree on the result
    return out


_STATUS_LOCK = threading.Lock()  # a warm-up thread and the tracing thread build it once


def status() -> str:
    """``"ready"`` once the kernels are built and registered, else why they are not used."""
    with _STATUS_LOCK:
        return _status()


@functools.cache
def _status() -> str:
    if os.environ.get("GGANS_ONEDNN", "1") == "0":
        return "off (GGANS_ONEDNN=0)"
    try:
        lib = ctypes.CDLL(str(_build()))
        for name, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    except importlib.metadata.PackageNotFoundError as e:  # e.g. not Linux x86-64
        log.info("oneDNN kernels unavailable (no %s wheel); using XLA's", e)
        return f"unavailable: no {e} wheel"
    except (OSError, RuntimeError, AttributeError) as e:  # no compiler, failed build, old jax
        log.warning("oneDNN kernels unavailable (%s); using XLA's, which are slower", e)
        return f"unavailable: {e}"
    return "ready"


status.cache_clear = _status.cache_clear  # type: ignore[attr-defined]  # tests rebuild it


def available(*arrays: jax.Array, padding, stacked: bool = False) -> bool:
    """Whether a convolution on these operands (and explicit ``padding`` pairs) runs on oneDNN;
    ``stacked``: each operand has a leading replica axis."""
    return (
        all(a.dtype == np.float32 and a.ndim == 4 + stacked for a in arrays)
        and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and status() == "ready"
    )


def _call(slot: str, shape: tuple[int, ...], a, b, strides, padding):
    pads = np.asarray([p[0] for p in padding] + [p[1] for p in padding], np.int64)
    out = jax.ShapeDtypeStruct(shape, a.dtype)
    return jax.ffi.ffi_call(TARGETS[slot][0], out)(
        a, b, strides=np.asarray(strides, np.int64), pads=pads
    )


# Each slot takes operands with or without one leading replica axis R (on all of them): with
# it, the R convolutions run in one call, split over the threads.
def conv(u, w, strides, padding, v_spatial):
    """``u [R?, B, H, W, ci]`` convolved with ``w [R?, kh, kw, ci, co]`` ->
    ``[R?, B, *v_spatial, co]``."""
    return _call("fwd", (*u.shape[:-3], *v_spatial, w.shape[-1]), u, w, strides, padding)


def conv_backward_data(v, w, strides, padding, u_spatial):
    """The convolution's transpose in its input: ``v [R?, B, Ho, Wo, co]`` ->
    ``[R?, B, *u_spatial, ci]`` (a transposed convolution)."""
    return _call("bwd_data", (*v.shape[:-3], *u_spatial, w.shape[-2]), v, w, strides, padding)


def conv_backward_weights(u, v, strides, padding, k_spatial):
    """The convolution's transpose in its kernel: ``(u, v)`` -> ``[R?, *k_spatial, ci, co]``."""
    shape = (*u.shape[:-4], *k_spatial, u.shape[-1], v.shape[-1])
    return _call("bwd_weights", shape, u, v, strides, padding)


def skinny(a: jax.Array, b: jax.Array, ca: int, cb: int) -> bool:
    """Whether ``dot(a, b)`` contracting ``a``'s axis ``ca`` with ``b``'s axis ``cb`` (both 2-d)
    runs on oneDNN: float32, ``a`` contracted in its last axis, at most :data:`SKINNY_ROWS` rows
    and a kernel ``b`` of at least :data:`SKINNY_KERNEL` elements, on the CPU."""
    return (
        a.ndim == b.ndim == 2
        and a.dtype == b.dtype == np.float32
        and ca == 1
        and a.shape[0] <= SKINNY_ROWS
        and b.size >= SKINNY_KERNEL
        and jax.default_backend() == "cpu"
        and status() == "ready"
    )


def matmul(a: jax.Array, b: jax.Array, cb: int) -> jax.Array:
    """``a [m, k]`` times ``b`` (``[k, n]`` if ``cb == 0``, ``[n, k]`` if ``cb == 1``), giving
    ``[m, n]``; under ``vmap`` the batch becomes oneDNN's batch axis."""
    n = b.shape[0] if cb else b.shape[1]
    out = jax.ShapeDtypeStruct((a.shape[0], n), a.dtype)
    call = jax.ffi.ffi_call(TARGETS["matmul"][0], out, vmap_method="broadcast_all")
    return call(a, b, tb=np.int64(cb))
