"""Layer sets, chosen by name (``model.impl``), and the step plug-ins that come with them.

The core builds its models from the layer set named in :class:`ggans.gan.GanSpec` and steps
its optimisers with optax, on every backend. Two layer sets are built in:

* ``patches``: convolutions as patches and one matrix product (:mod:`ggans.patches`), so that
  under ``vmap`` the replica axis is the batch dimension of every product: the accelerator
  default;
* ``flax``: Flax's own layers; under ``vmap`` a grouped convolution (``feature_group_count=N``).

A plug-in is a module with an ``impl()`` returning an :class:`Impl`, registered by name with
:func:`register` or through the ``ggans.impls`` entry-point group. It may bring, besides its
layers, a fused optimiser step, a rewrite of the discriminator's gradient and XLA compiler
options for its platform. ``cpu`` (:mod:`ggans.cpu`, installed with ``pip install
"ggans[cpu]"``) is the one shipped: oneDNN kernels for XLA's CPU backend. ``auto`` is the CPU
plug-in on a CPU where it is installed, ``patches`` elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import optax

from ggans.errors import ConfigError

__all__ = ["Impl", "apply_optimizer", "get", "names", "register", "resolve", "warm_up"]

log = logging.getLogger(__name__)
PyTree = Any


def apply_optimizer(
    tx: optax.GradientTransformation, grads: PyTree, state: PyTree, params: PyTree
) -> tuple[PyTree, PyTree]:
    """``tx``'s update applied to ``params``: ``(new_params, new_state)``."""
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@dataclass(frozen=True)
class Impl:
    """A layer set (constructors with Flax's signatures) and optional step plug-ins."""

    name: str
    dense: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    conv_transpose: Callable[..., nn.Module]
    doc: str = ""
    #: ``adam_step(grads, state, params, **optax_adam_kwargs) -> (params, state)``, replacing
    #: ``apply_optimizer(optax.adam(**kwargs), ...)`` with the same results (None: optax's).
    adam_step: Callable[..., tuple[PyTree, PyTree]] | None = None
    #: Wraps ``jax.value_and_grad(d_loss)`` (same values, faster program); None: unchanged.
    wrap_d_grad: Callable[[Callable], Callable] | None = None
    #: XLA compiler options for the jitted round on ``platforms``.
    compiler_options: Mapping[str, Any] = field(default_factory=dict)
    #: Backends it runs on (None: any).
    platforms: tuple[str, ...] | None = None
    #: Why it cannot run here, or None: asked before a run starts.
    unavailable: Callable[[], str | None] = lambda: None
    #: One-off work before first use (a kernel build), run in a background thread while a
    #: run loads its data, so that it does not add to the time before the first round.
    warm_up: Callable[[], Any] | None = None


def _flax() -> Impl:
    return Impl(
        "flax",
        nn.Dense,
        nn.Conv,
        nn.ConvTranspose,
        "Flax's layers; stacked replicas run as grouped convolutions",
    )


def _patches() -> Impl:
    from ggans import patches

    return Impl(
        "patches",
        nn.Dense,
        patches.Conv,
        patches.ConvTranspose,
        "convolutions as patches and one product, the replicas its batch dimension",
    )


# name -> a function returning the Impl, or "module" (whose impl() does), imported on first use
_REGISTRY: dict[str, Callable[[], Impl] | str] = {
    "patches": _patches,
    "flax": _flax,
    "cpu": "ggans.cpu",
}
_LOADED: dict[str, Impl] = {}
AUTO = "auto"


def register(name: str, factory: Callable[[], Impl] | str) -> None:
    """Make ``model.impl=<name>`` build its models from ``factory()`` (or ``module.impl()``)."""
    _REGISTRY[name] = factory
    _LOADED.pop(name, None)


def _entry_points() -> None:
    for ep in importlib.metadata.entry_points(group="ggans.impls"):
        _REGISTRY.setdefault(ep.name, ep.value.partition(":")[0])


def names() -> tuple[str, ...]:
    """Every choice of ``model.impl``, ``auto`` first."""
    _entry_points()
    return (AUTO, *_REGISTRY)


def get(name: str) -> Impl:
    """The :class:`Impl` registered as ``name`` (``auto`` resolved for the default backend)."""
    name = resolve(name)
    if name not in _LOADED:
        if name not in _REGISTRY:
            _entry_points()
        factory = _REGISTRY.get(name)
        if factory is None:
            raise ConfigError(f"model.impl={name!r}: must be one of {', '.join(names())}")
        if isinstance(factory, str):
            factory = importlib.import_module(factory).impl
        _LOADED[name] = factory()
    return _LOADED[name]


def warm_up(name: str) -> threading.Thread | None:
    """Start layer set ``name``'s :attr:`Impl.warm_up` in a thread (None if it has none)."""
    impl = get(name)
    if impl.warm_up is None:
        return None
    return in_background(impl.warm_up, f"ggans-warm-up-{impl.name}")


def in_background(work: Callable[[], Any], name: str) -> threading.Thread:
    """Run ``work()`` in a thread that keeps quiet on failure: whoever needs the result asks
    again in the foreground and meets the error there, as one line."""

    def quietly() -> None:
        try:
            work()
        except Exception as err:  # noqa: BLE001
            log.debug("%s failed in the background: %s", name, err)

    thread = threading.Thread(target=quietly, name=name)
    thread.start()
    return thread


def why_not(name: str, platform: str | None = None) -> str | None:
    """Why layer set ``name`` cannot run on ``platform`` (default: JAX's backend), or None."""
    impl = get(name)
    platform = platform or jax.default_backend()
    if impl.platforms is not None and platform not in impl.platforms:
        return f"runs on {', '.join(impl.platforms)} only, and this run is on {platform}"
    return impl.unavailable()


def resolve(name: str, platform: str | None = None) -> str:
    """``auto`` -> ``cpu`` on a CPU where the CPU plug-in can run, else ``patches``; any other
    name is returned as it is."""
    if name != AUTO:
        return name
    platform = platform or jax.default_backend()
    if platform == "cpu":
        try:
            if why_not("cpu", platform) is None:
                return "cpu"
        except ImportError:  # the plug-in's module is not there
            pass
    return "patches"


def check(name: str, platform: str | None = None) -> str:
    """``name`` resolved, or :class:`ConfigError` naming ``model.impl`` when it cannot run."""
    resolved = resolve(name, platform)
    try:
        reason = why_not(resolved, platform)
    except ImportError as err:
        reason = f"cannot be imported ({err})"
    if reason:
        allowed = ", ".join(n for n in names() if n == AUTO or _runs(n, platform))
        raise ConfigError(f"model.impl={resolved!r}: {reason}; allowed here: {allowed}")
    return resolved


def _runs(name: str, platform: str | None) -> bool:
    try:
        return why_not(name, platform) is None
    except Exception:  # noqa: BLE001 (a broken plug-in is simply not offered)
        return False
