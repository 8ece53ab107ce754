"""Image datasets by name (``data.name``): where the images come from, how many classes they
have, and whether a classifier scores them (MS, FID).

Built in: ``mnist`` (the paper's; IDX files in ``data.dir`` checked by md5, else
tensorflow-datasets), ``fashion_mnist`` (the same IDX layout; no classifier yet) and
``tfds:<name>``, any image set tensorflow-datasets has prepared (``image`` and ``label``
features). Add one with ``@register("name", classes=...)`` on ``fn(data_dir) -> Images``.
Image height and width must be multiples of 4 (the generator upsamples twice by 2).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from ggans.data import Images, load_idx, load_mnist, load_tfds, resolve_data_dir
from ggans.errors import ConfigError, DataError

Loader = Callable[[str | os.PathLike | None], Images]


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its loader, its number of classes, and whether MS and FID can
    score it (a classifier trained on it ships with ggans)."""

    load: Loader
    classes: int
    scored: bool = False


DATASETS: dict[str, Dataset] = {}
TFDS = "tfds:"


def register(name: str, classes: int, scored: bool = False) -> Callable[[Loader], Loader]:
    """Register ``fn(data_dir) -> Images`` as dataset ``name``."""

    def add(fn: Loader) -> Loader:
        DATASETS[name] = Dataset(fn, classes, scored)
        return fn

    return add


def names() -> tuple[str, ...]:
    return (*DATASETS, f"{TFDS}<name>")


def get(name: str) -> Dataset:
    """The dataset ``name`` (``tfds:<name>``: a tensorflow-datasets image set, unscored)."""
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(TFDS) and len(name) > len(TFDS):
        tfds_name = name[len(TFDS) :]
        return Dataset(lambda d: load_tfds(None if d is None else str(d), tfds_name), 0)
    raise ConfigError(f"data.name={name!r}: must be one of {', '.join(names())}")


def load(name: str, data_dir: str | os.PathLike | None = None) -> Images:
    """The dataset's images, checked: uint8 [n, H, W, C] with H and W multiples of 4."""
    images = get(name).load(data_dir)
    shape = images.train_images.shape
    if images.train_images.dtype.name != "uint8" or len(shape) != 4:
        raise DataError(f"data.name={name!r}: images must be uint8 [n, H, W, C], got {shape}")
    if shape[1] % 4 or shape[2] % 4:
        raise DataError(
            f"data.name={name!r}: image height and width must be multiples of 4, got {shape[1:3]}"
        )
    return images


def classes(name: str, images: Images) -> int:
    """The number of classes (for tfds sets: one more than the largest label)."""
    return get(name).classes or int(images.train_labels.max()) + 1


@register("mnist", classes=10, scored=True)
def mnist(data_dir: str | os.PathLike | None) -> Images:
    return load_mnist(data_dir)


@register("fashion_mnist", classes=10)
def fashion_mnist(data_dir: str | os.PathLike | None) -> Images:
    """Fashion-MNIST's four IDX files (the MNIST names and layout) in ``data.dir``, checked by
    their sizes; else tensorflow-datasets' fashion_mnist."""
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return load_tfds(None, "fashion_mnist")
    images = load_idx(folder, md5={}, what="Fashion-MNIST")
    if hashlib.md5(images.train_images.tobytes()).hexdigest() == MNIST_TRAIN_PIXELS_MD5:
        raise DataError(f"data.dir: {folder} holds MNIST, not Fashion-MNIST")
    return images


# md5 of MNIST's 47,040,000 training pixels (the IDX payload less its 16-byte header)
MNIST_TRAIN_PIXELS_MD5 = "6510e85a72c3e9475c492d559d3770d2"
