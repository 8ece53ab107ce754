"""Does a run fit in memory? The chunk of machines trained at once, chosen before training.

The state of N machines (parameters, batch statistics, Adam moments) stays resident; a round's
temporaries grow with the number of machines vmapped at once (``chunk``). :func:`fit_round`
compiles the round (the compiled program is the one the run then calls, from JAX's cache), reads
XLA's own memory analysis, and either keeps the chunk, picks the largest one that fits, or stops
with one line saying what the run needs and which setting makes it fit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ggans.errors import ConfigError

log = logging.getLogger(__name__)
GiB = 2**30
#: Share of the available memory a run may plan to use (the rest: evaluation, host copies, XLA).
HEADROOM = 0.85


def available_bytes(device: jax.Device | None = None) -> int:
    """Memory a run can still take: the device's free memory on an accelerator; on a CPU the
    host's available memory (``MemAvailable``, or ``GGANS_MEMORY_GIB`` where set)."""
    if os.environ.get("GGANS_MEMORY_GIB"):
        return int(float(os.environ["GGANS_MEMORY_GIB"]) * GiB)
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def tree_bytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) in ``tree``."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _divisors(n: int) -> list[int]:
    return [c for c in range(n, 0, -1) if n % c == 0]


def check_state_fits(state_shape, shards_bytes: int, n: int, budget: int | None = None) -> None:
    """Refuse, before anything is allocated, a run whose resident state alone cannot fit."""
    budget = int(HEADROOM * available_bytes()) if budget is None else budget
    need = tree_bytes(state_shape) + shards_bytes
    if need > budget:
        per = tree_bytes(state_shape) / n
        fit = max(int((budget - shards_bytes) // per), 0)
        raise ConfigError(
            f"nodes={n}: the machines' state alone needs {_gib(need)} GiB and "
            f"{_gib(budget)} GiB are available here; nodes={fit} or fewer would fit "
            "(or a smaller model.arch)"
        )


def fit_round(spec, lower: Callable, n: int, budget: int | None = None):
    """``spec`` with the chunk the round can run at within ``budget`` bytes (default: the share
    :data:`HEADROOM` of :func:`available_bytes`), or :class:`ConfigError`.

    ``lower(spec)`` lowers the round for ``spec`` (its arguments fixed); ``spec.chunk`` None
    (every machine at once) is tried first, then the largest divisor of N that the measured
    temporaries per machine say fits. An explicit chunk is checked, never changed.
    """
    budget = int(HEADROOM * available_bytes()) if budget is None else budget

    def need(chunk: int | None) -> tuple[int, int]:
        stats = lower(dataclasses.replace(spec, chunk=chunk)).compile().memory_analysis()
        if stats is None:  # a backend without the analysis: trust the setting
            return 0, 0
        resident = stats.argument_size_in_bytes + stats.output_size_in_bytes
        resident -= stats.alias_size_in_bytes
        return resident + stats.temp_size_in_bytes, stats.temp_size_in_bytes

    explicit = spec.chunk is not None
    chunk = spec.chunk if explicit and spec.chunk < n else None
    total, temp = need(chunk)
    if total <= budget:
        return dataclasses.replace(spec, chunk=chunk)
    per_machine = temp / (chunk or n)
    resident = total - temp
    measured = {chunk or n: total}
    if not explicit:
        for c in _divisors(n)[1:]:
            if c > 1 and resident + c * per_machine * 1.1 > budget:
                continue  # by the temporaries per machine measured above, too large
            measured[c] = need(c)[0]
            if measured[c] <= budget:
                log.info("chunk=%d: %d machines trained at once fit in memory", c, c)
                return dataclasses.replace(spec, chunk=c)
    at_one = measured.get(1, resident + per_machine)
    hint = "chunk=1 and fewer nodes=" if at_one > budget else "a smaller chunk="
    key = f"chunk={spec.chunk}" if explicit else f"nodes={n}"
    raise ConfigError(
        f"{key}: the round needs about {_gib(total)} GiB ({_gib(resident)} GiB resident, "
        f"{_gib(at_one)} GiB at chunk=1) and {_gib(budget)} GiB are available; "
        f"{hint} would fit"
    )


def _gib(x: float) -> str:
    return f"{x / GiB:.3g}"
