"""How the training images are dealt to the machines: a partitioner per ``data.split``.

A partitioner is ``fn(labels, pool, nodes, rng, classes, params) -> list of index arrays``,
registered by name with ``@register("name")``: machine i's training images are
``labels``' indices in its array, drawn from ``pool``, seeded by ``rng``; ``params`` is the
:class:`Params` of the run's ``data`` config. Every partitioner here but ``iid`` deals every
image of the pool to exactly one machine (disjoint and complete); ``iid`` leaves out the
``len(pool) % nodes`` remainder so that shares are equal, as the paper does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ggans.errors import ConfigError


@dataclass(frozen=True)
class Params:
    alpha: float = 0.1  # dirichlet: concentration over labels; quantity: over machine sizes
    classes_per_machine: int = 2  # classes: labels each machine holds (pathological)
    shards_per_machine: int = 2  # shards: label-sorted shards dealt to each machine


Partitioner = Callable[
    [np.ndarray, np.ndarray, int, np.random.Generator, int, Params], list[np.ndarray]
]
PARTITIONERS: dict[str, Partitioner] = {}


def register(name: str) -> Callable[[Partitioner], Partitioner]:
    def add(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return add


def names() -> tuple[str, ...]:
    return tuple(PARTITIONERS)


def split_indices(
    labels: np.ndarray,
    nodes: int,
    split: str,
    seed: int,
    pool: np.ndarray | None = None,
    classes: int = 10,
    params: Params = Params(),  # noqa: B008 (frozen, immutable)
) -> list[np.ndarray]:
    """Per-machine shards of training-image indices (drawn from ``pool``, default: all),
    each sorted; seeded by ``seed``."""
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    if nodes < 1:
        raise ConfigError(f"nodes={nodes}: must be an integer >= 1")
    if split not in PARTITIONERS:
        raise ConfigError(f"data.split={split!r}: must be one of {', '.join(names())}")
    if nodes > len(pool):
        raise ConfigError(f"nodes={nodes}: more machines than training images ({len(pool)})")
    check(split, nodes, classes, params)
    parts = PARTITIONERS[split](labels, pool, nodes, np.random.default_rng(seed), classes, params)
    out = [np.sort(np.asarray(p, np.int64)) for p in parts]
    empty = [i for i, s in enumerate(out) if len(s) == 0]
    if empty:
        raise ConfigError(
            f"nodes={nodes}: machine {empty[0]} gets no images with data.split={split}"
        )
    return out


def check(split: str, nodes: int, classes: int | None, params: Params) -> None:
    """ConfigError (one line naming the key) for parameters the partitioner cannot use
    (``classes`` None: not known before the data is read; checked again then)."""
    if split in ("dirichlet", "quantity"):
        a = params.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not a > 0:
            raise ConfigError(f"data.alpha={a!r}: must be a number > 0")
    if split == "classes":
        k = params.classes_per_machine
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"data.classes_per_machine={k!r}: must be an integer >= 1")
        if classes is None:
            return
        if k > classes:
            raise ConfigError(f"data.classes_per_machine={k!r}: must be an integer in 1..{classes}")
        if nodes * k < classes:
            raise ConfigError(
                f"data.classes_per_machine={k}: nodes x classes_per_machine ({nodes} x {k}) "
                f"must be >= {classes} classes, so that every image is dealt"
            )
    if split == "shards":
        s = params.shards_per_machine
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"data.shards_per_machine={s!r}: must be an integer >= 1")


def histogram(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> np.ndarray:
    """[N, classes] int: how many images of each label machine i holds."""
    return np.stack([np.bincount(labels[p], minlength=classes)[:classes] for p in parts])


@register("iid")
def iid(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """A random permutation cut into ``nodes`` equal, disjoint shares."""
    share = len(pool) // nodes
    order = rng.permutation(pool)
    return [order[i * share : (i + 1) * share] for i in range(nodes)]


@register("non_iid")
def non_iid(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """The paper's: machine i holds class ``i % C`` when ``nodes >= C`` (a class's images
    divided evenly among the machines sharing it); when ``nodes < C`` machine i holds the
    classes d with ``d % nodes == i``. So N = 10 on MNIST is one digit per machine."""
    shards: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for digit in range(classes):
        owners = [
            i
            for i in range(nodes)
            if (i % classes == digit if nodes >= classes else digit % nodes == i)
        ]
        images = rng.permutation(pool[labels[pool] == digit])
        for owner, part in zip(owners, np.array_split(images, len(owners)), strict=True):
            shards[owner].append(part)
    return [np.concatenate(parts) if parts else np.zeros(0, int) for parts in shards]


@register("dirichlet")
def dirichlet(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """Each class's images dealt in proportions drawn from Dirichlet(alpha) over the
    machines (small alpha: few classes per machine); redrawn, up to 100 times, until every
    machine holds at least one image."""
    for _ in range(100):
        shards: list[list[np.ndarray]] = [[] for _ in range(nodes)]
        for c in range(classes):
            images = rng.permutation(pool[labels[pool] == c])
            cuts = np.cumsum(rng.dirichlet(np.full(nodes, float(params.alpha)))) * len(images)
            for i, part in enumerate(np.split(images, cuts.astype(int)[:-1])):
                shards[i].append(part)
        parts = [np.concatenate(p) for p in shards]
        if min(map(len, parts)) > 0:
            return parts
    raise ConfigError(
        f"data.alpha={params.alpha}: a machine got no images in 100 draws; raise data.alpha "
        "or data.fraction, or lower nodes"
    )


@register("classes")
def classes_per_machine(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """Pathological: machine i holds k = classes_per_machine labels, the (i k + j)-th of a
    seeded order of the classes (j < k), each class's images divided evenly among the
    machines holding it."""
    k = params.classes_per_machine
    order = rng.permutation(classes)
    held = [[order[(i * k + j) % classes] for j in range(k)] for i in range(nodes)]
    shards: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for c in range(classes):
        owners = [i for i in range(nodes) if c in held[i]]
        images = rng.permutation(pool[labels[pool] == c])
        for owner, part in zip(owners, np.array_split(images, len(owners)), strict=True):
            shards[owner].append(part)
    return [np.concatenate(p) for p in shards]


@register("shards")
def shards(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """McMahan et al.'s: the pool sorted by label (ties shuffled) cut into nodes x s shards,
    s = shards_per_machine of them dealt at random to each machine."""
    s = params.shards_per_machine
    shuffled = rng.permutation(pool)
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(ordered, nodes * s)
    deal = rng.permutation(nodes * s).reshape(nodes, s)
    return [np.concatenate([pieces[j] for j in row]) for row in deal]


@register("quantity")
def quantity(labels, pool, nodes, rng, classes, params) -> list[np.ndarray]:
    """Quantity skew: iid labels, shard sizes in proportions drawn from Dirichlet(alpha) over
    the machines, each machine at least one image."""
    m = len(pool)
    p = rng.dirichlet(np.full(nodes, float(params.alpha)))
    sizes = 1 + np.floor(p * (m - nodes)).astype(int)
    sizes[np.argmax(p)] += m - sizes.sum()
    order = rng.permutation(pool)
    return np.split(order, np.cumsum(sizes)[:-1])
