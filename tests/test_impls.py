"""Layer sets by name: a core that imports no CPU-specific code, ``auto``, refusals, plug-ins."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import ROOT, synthetic_shards
from ggans import impls
from ggans.config import from_dict
from ggans.errors import ConfigError
from ggans.gan import GanSpec
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, make_round

CORE = [
    "ggans.data",
    "ggans.models",
    "ggans.gan",
    "ggans.replicas",
    "ggans.protocols",
    "ggans.training",
    "ggans.metrics",
    "ggans.evaluation",
    "ggans.config",
    "ggans.run",
]


def test_core_imports_and_trains_without_any_cpu_specific_module():
    """Importing the core and training a round on the accelerator layers loads nothing of
    ``ggans.cpu``, and builds nothing."""
    code = f"""
import sys, jax
for m in {CORE!r}:
    __import__(m)
from ggans.gan import GanSpec
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, make_round
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import synthetic_shards
gan = GanSpec(arch="tiny", noise_dim=8, batch_size=4, impl="patches")
state = init_replicas(gan, jax.random.key(0), 2)
make_round(RoundSpec(gan=gan, local_steps=1))(state, synthetic_shards(2, 8), jax.random.key(1), 0)
loaded = sorted(m for m in sys.modules if m.startswith("ggans.cpu") or "onednn" in m)
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


def test_auto_is_the_cpu_plugin_on_a_cpu_and_patches_elsewhere(monkeypatch):
    assert impls.resolve("auto", "gpu") == "patches"
    assert impls.resolve("auto", "tpu") == "patches"
    assert impls.resolve("auto", "cpu") == "cpu"
    assert impls.resolve("flax", "cpu") == "flax"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert impls.resolve("auto", "cpu") == "patches"  # no [cpu] extra: the accelerator layers


def test_an_explicit_choice_that_cannot_run_is_one_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"model.impl='cpu': runs on cpu only.*allowed here: "):
        impls.check("cpu", "gpu")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"model.impl='cpu': needs the cpu extra") as err:
        from_dict({"model": {"impl": "cpu"}})
    assert "\n" not in str(err.value)
    assert "auto, patches, flax" in str(err.value)
    with pytest.raises(ConfigError, match="model.impl='nope': must be one of auto, patches"):
        from_dict({"model": {"impl": "nope"}})


def test_config_records_the_resolved_layer_set_and_precision():
    cfg = from_dict({"model": {"arch": "tiny", "precision": "highest"}})
    assert cfg.model.impl == impls.resolve("auto")
    assert cfg.model.precision == "highest"
    with pytest.raises(ConfigError, match="model.precision='fp8': must be one of default"):
        from_dict({"model": {"precision": "fp8"}})


class Dense(nn.Dense):
    """A toy layer set's Dense: Flax's (same name, so the same parameter names), doubled."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


def test_a_layer_set_registered_from_outside_the_package_is_used_by_the_round():
    impls.register(
        "toy_doubled",
        lambda: impls.Impl("toy_doubled", Dense, nn.Conv, nn.ConvTranspose, "test"),
    )
    try:
        assert "toy_doubled" in impls.names()
        assert from_dict({"model": {"arch": "tiny", "impl": "toy_doubled"}}).model.impl == (
            "toy_doubled"
        )
        toy = GanSpec(arch="tiny", noise_dim=8, batch_size=4, impl="toy_doubled")
        plain = dataclasses.replace(toy, impl="flax")
        x = jax.random.normal(jax.random.key(2), (3, 28, 28, 1))
        params = plain.discriminator.init(jax.random.key(0), x)
        # D's hidden dense layer feeds a LayerNorm (blind to the doubling); its logit doubles
        np.testing.assert_allclose(
            toy.discriminator.apply(params, x),
            2.0 * plain.discriminator.apply(params, x),
            rtol=1e-4,
        )
        out, info = make_round(RoundSpec(gan=toy, local_steps=1))(
            init_replicas(toy, jax.random.key(0), 2), synthetic_shards(2, 8), jax.random.key(1), 0
        )
        assert np.asarray(info.finite).all()
    finally:
        impls._REGISTRY.pop("toy_doubled")
        impls._LOADED.pop("toy_doubled", None)


def test_collecting_the_tests_starts_no_compiler(tmp_path):
    """``pytest --collect-only`` with an empty kernel cache and a compiler that logs its calls:
    nothing is built until a test that needs the CPU plug-in's kernels runs."""
    calls = tmp_path / "calls.log"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    cxx.chmod(0o755)
    env = dict(os.environ, CXX=str(cxx), GGANS_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tests collected" in out.stdout
    assert not calls.exists(), calls.read_text()


def test_a_layer_sets_warm_up_runs_beside_a_run_being_prepared_and_fails_quietly(
    mnist, tmp_path, capfd
):
    from conftest import tiny_run_config
    from ggans.run import prepare

    ran = []

    def broken():
        raise RuntimeError("no compiler")

    def toy(name, warm):
        return lambda: impls.Impl(name, nn.Dense, nn.Conv, nn.ConvTranspose, warm_up=warm)

    impls.register("toy_warm", toy("toy_warm", lambda: ran.append(threading.current_thread().name)))
    impls.register("toy_broken", toy("toy_broken", broken))
    try:
        assert impls.warm_up("flax") is None  # nothing to warm up
        spec = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="toy_warm")
        cfg = tiny_run_config(model=spec)
        prepare(cfg, tmp_path / "run", mnist=mnist).folder.close()
        for thread in threading.enumerate():
            if thread.name.startswith("ggans-warm-up"):
                thread.join()
        assert ran == ["ggans-warm-up-toy_warm"]
        impls.warm_up("toy_broken").join()
        assert "Traceback" not in capfd.readouterr().err
    finally:
        for name in ("toy_warm", "toy_broken"):
            impls._REGISTRY.pop(name)
            impls._LOADED.pop(name, None)
