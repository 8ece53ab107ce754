"""The CPU plug-in (``model.impl=cpu``): XLA's CPU backend made fast for the paper's model.

Installed with ``pip install -e ".[cpu]"``, which brings the oneDNN wheels; the kernels are
compiled on first use (:mod:`ggans.cpu.onednn`). It plugs into the core through
:class:`ggans.impls.Impl`:

* :mod:`ggans.cpu.layers`: Flax-compatible layers whose convolutions, transposed convolutions
  and kernel gradients (of every order) run on oneDNN, on direct loops where oneDNN is slow
  (one channel, strided backward data onto few channels), or in the layouts XLA's CPU runs
  fast;
* :mod:`ggans.cpu.adam`: ``optax.adam``'s update in one in-place pass over each large leaf;
* :mod:`ggans.cpu.gradsum`: WGAN-GP's three kernel-gradient products of a dense layer as one;
* copy insertion with region analysis for the compiled round.

Each computes what the core's plain path computes (tested against it); none is imported unless
this plug-in is chosen.
"""

from __future__ import annotations

import importlib.metadata

from ggans.impls import Impl

#: On XLA's CPU backend, copy insertion with region analysis keeps fewer copies of the state in
#: the loop body (the paper model at N = 2: 200 copies instead of 287).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
WHEELS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")


def unavailable() -> str | None:
    """Why the plug-in cannot run here (its wheels missing), or None."""
    for dist in WHEELS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            return f'needs the cpu extra ({dist} is not installed): pip install -e ".[cpu]"'
    return None


def impl() -> Impl:
    """The plug-in's :class:`~ggans.impls.Impl`."""
    from ggans.cpu import adam, gradsum, layers, onednn

    return Impl(
        "cpu",
        layers.Dense,
        layers.Conv,
        layers.ConvTranspose,
        "oneDNN kernels, a one-pass Adam and merged kernel gradients for XLA's CPU",
        adam_step=adam.step,
        wrap_d_grad=gradsum.merge_kernel_grads,
        compiler_options=COMPILER_OPTIONS,
        platforms=("cpu",),
        unavailable=unavailable,
        warm_up=onednn.status,
    )
