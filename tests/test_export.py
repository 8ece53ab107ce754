"""The round exported for CUDA on this CPU: all N machines in each product, no loop over them.

A GPU trains the N machines at the same time only if every convolution and matrix product of
the round carries the replica axis (as a batch dimension, a group count, or a free dimension of
one product over all machines). A layer set that runs the machines one after another (a
``lax.map`` over them, or N unrolled products) emits products whose operands and results have no
replica axis, which :func:`serial_products` finds.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax import export

from conftest import synthetic_shards
from ggans.gan import GanSpec
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, _round

N = 5  # no other dimension of the tiny model's round has this size
_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b.*?:\s*\((.*)\)\s*->\s*(tensor<[^>]*>)")
_GROUP = re.compile(r"(feature|batch)_group_count = (\d+)")


def _shape(tensor: str) -> list[int]:
    body = tensor.split("<", 1)[1].rstrip(">")
    return [int(d) for d in body.split("x")[:-1]]


def serial_products(mlir: str, n: int) -> list[str]:
    """The convolutions and dot_generals of ``mlir`` in which no operand or result has an axis
    of size ``n``, nor a group count ``n``: products of one machine at a time."""
    bad = []
    for line in mlir.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        tensors = re.findall(r"tensor<[^>]*>", m.group(2)) + [m.group(3)]
        groups = {int(g) for _, g in _GROUP.findall(line)}
        if n in groups or any(n in _shape(t) for t in tensors):
            continue
        bad.append(line.strip()[:200])
    return bad


def exported_round(impl: str, n: int = N, platform: str = "cuda") -> str:
    gan = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl=impl)
    spec = RoundSpec(gan=gan, protocol="gossip", local_steps=3)
    state = init_replicas(gan, jax.random.key(0), n)
    shards = synthetic_shards(n, images=8 * n)
    fn = jax.jit(partial(_round, spec))
    args = (state, shards, jax.random.key(1), jnp.int32(0), jnp.ones(n, bool))
    return export.export(fn, platforms=(platform,))(*args).mlir_module()


@pytest.mark.parametrize("impl", ["auto", "patches", "flax"])
def test_cuda_round_trains_all_machines_in_every_product(impl, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as `auto` resolves on a GPU
    mlir = exported_round(impl)
    products = [line for line in mlir.splitlines() if _OP.search(line)]
    assert len(products) > 20  # the whole round: G and D, forward, backward, penalty
    assert serial_products(mlir, N) == []
    if impl != "flax":  # the patches layers: no convolution at all, batched products
        assert "stablehlo.convolution" not in mlir
        assert re.search(rf"batching_dims = \[0\] x \[0\].*tensor<{N}x", mlir)


def test_cuda_round_of_the_cpu_plugin_runs_machines_one_by_one():
    """The check above fails for the CPU plug-in's layers, which loop over the replicas."""
    mlir = exported_round("cpu")
    assert len(serial_products(mlir, N)) > 10


def _products(mlir: str) -> list[str]:
    return [line for line in mlir.splitlines() if _OP.search(line)]


@pytest.mark.parametrize("precision", ["default", "highest", "bf16"])
def test_precision_reaches_every_layer_product_and_never_the_exchange(precision, monkeypatch):
    """``highest`` asks every layer product for exact float32, ``bf16`` gives them bfloat16
    operands; ``default`` leaves the choice to the backend (TF32 on recent GPUs). The mixing
    of the stacked models is exact float32 whatever the setting."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gan = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="patches", precision=precision)
    spec = RoundSpec(gan=gan, protocol="federated", local_steps=2, form="dense")
    state = init_replicas(gan, jax.random.key(0), N)
    fn = jax.jit(partial(_round, spec))
    args = (state, synthetic_shards(N, 8 * N), jax.random.key(1), jnp.int32(0), jnp.ones(N, bool))
    mlir = export.export(fn, platforms=("cuda",))(*args).mlir_module()
    mixing = [p for p in _products(mlir) if f"tensor<{N}x{N}xf32>" in p]
    layers = [p for p in _products(mlir) if p not in mixing]
    assert mixing and all("HIGHEST" in p for p in mixing)
    assert len(layers) > 20
    if precision == "highest":
        assert all("precision = [HIGHEST, HIGHEST]" in p for p in layers)
    else:
        assert not any("HIGHEST" in p for p in layers)
    # bf16: every product reads bfloat16 operands (kernel gradients included)
    bf16 = [p for p in layers if re.search(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\)", p)]
    assert len(bf16) == (len(layers) if precision == "bf16" else 0)
