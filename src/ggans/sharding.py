"""The replica axis over many devices: a 1-D mesh, every state leaf split on its first axis.

Multi-host: call :func:`jax.distributed.initialize` before anything else (``distributed:
true`` in the config does it); ``jax.devices()`` then spans all hosts and the same code runs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ggans.errors import ConfigError


def replica_sharding(n: int, devices: list | None = None) -> NamedSharding | None:
    """A sharding of the leading (replica) axis over ``devices`` (default: all), or None
    on one device. N must be a multiple of the device count."""
    devices = jax.devices() if devices is None else devices
    if len(devices) == 1:
        return None
    if n % len(devices):
        raise ConfigError(
            f"nodes={n}: must be a multiple of the {len(devices)} devices to shard the "
            "machine axis (or set shard=false)"
        )
    return NamedSharding(Mesh(np.asarray(devices), ("replica",)), PartitionSpec("replica"))


def replicated(sharding: NamedSharding) -> NamedSharding:
    """Every device holds the whole array (for the shared image table)."""
    return NamedSharding(sharding.mesh, PartitionSpec())
