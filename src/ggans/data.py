"""Image loading (IDX files, tensorflow-datasets) and per-machine shards; which dataset is
which is :mod:`ggans.datasets`'s.

Images stay uint8 on the host and on the device; :func:`to_model_range` maps them to the
GAN's pixel range inside the compiled step, as the TF reference does: (x - 128) / 128.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ggans.errors import ConfigError, DataError

DATA_DIR_ENV = "GGANS_DATA_DIR"

# md5 of the uncompressed IDX payloads (../shared/data/mnist/README.md).
IDX_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}


class Images(NamedTuple):
    """A labelled image dataset as uint8 arrays: images [n, H, W, C], labels [n]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The folder to read IDX files from: the given one, else $GGANS_DATA_DIR, else None (tfds)."""
    if data_dir in (None, ""):
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def _idx_bytes(array: np.ndarray) -> int:
    return 4 + 4 * array.ndim + array.size


def _read_payload(folder: Path, stem: str, what: str = "MNIST") -> bytes:
    for name in (stem, stem + ".gz"):
        path = folder / name
        if path.is_file():
            try:
                raw = path.read_bytes()
                return gzip.decompress(raw) if name.endswith(".gz") else raw
            except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
                raise DataError(f"data.dir: cannot read {path}: {err}") from None
    raise DataError(f"data.dir: missing {what} file {folder / stem}[.gz] (need the four IDX files)")


def _parse_idx(payload: bytes, name: str, ndim: int) -> np.ndarray:
    magic = int.from_bytes(payload[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(f"data.dir: {name} is not an IDX file with {ndim} dimension(s)")
    dims = [int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


Mnist = Images  # the name the paper's dataset had here first


def load_idx(
    folder: str | os.PathLike, md5: dict[str, str] | None = None, what: str = "MNIST"
) -> Images:
    """Read the four IDX files of MNIST's layout (plain or .gz), checking their md5 checksums
    when ``md5`` is given (default: MNIST's) or their sizes (60,000 and 10,000) when ``{}``."""
    md5 = {k: v[1] for k, v in IDX_FILES.items()} if md5 is None else md5
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"data.dir: folder {folder} does not exist (set data.dir or ${DATA_DIR_ENV})"
        )
    arrays = {}
    for key, (stem, _) in IDX_FILES.items():
        payload = _read_payload(folder, stem, what)
        want = md5.get(key)
        if want is not None and hashlib.md5(payload).hexdigest() != want:
            raise DataError(f"data.dir: {folder / stem} is corrupt (md5 differs from {want})")
        arrays[key] = _parse_idx(payload, stem, 3 if key.endswith("images") else 1)
        size = 60000 if key.startswith("train") else 10000
        if want is None and (len(payload) != _idx_bytes(arrays[key]) or len(arrays[key]) != size):
            raise DataError(f"data.dir: {folder / stem} is corrupt (not {size} records)")
    return Images(
        arrays["train_images"][..., None],
        arrays["train_labels"],
        arrays["test_images"][..., None],
        arrays["test_labels"],
    )


def load_tfds(data_dir: str | None = None, name: str = "mnist") -> Images:
    """A tensorflow-datasets image set (``image`` and ``label`` features) through
    ``tfds.data_source``, from data tfds has prepared (no download: offline it would retry for
    minutes; no TensorFlow)."""
    import tensorflow_datasets as tfds

    def split(split_name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            source = tfds.data_source(name, split=split_name, data_dir=data_dir, download=False)
        except Exception as err:  # noqa: BLE001 - offline, no prepared data, broken install
            raise DataError(
                f"data.dir: not set (nor $GGANS_DATA_DIR), and tensorflow-datasets could not "
                f"load {name} ({type(err).__name__}: {err}); set data.dir to a folder with the "
                f"four IDX files, or prepare tfds's {name} once, online: python -c "
                f"\"import tensorflow_datasets as t; t.data_source('{name}')\""
            ) from None
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
        return images.reshape(images.shape[:3] + (-1,)), labels

    return Images(*split("train"), *split("test"))


def load_mnist(data_dir: str | os.PathLike | None = None) -> Images:
    """MNIST from ``data_dir`` (or $GGANS_DATA_DIR) when set, else from tensorflow-datasets."""
    folder = resolve_data_dir(data_dir)
    return load_tfds() if folder is None else load_idx(folder)


def to_model_range(images):
    """uint8 pixels to the GAN's range, (x - 128) / 128 as in the TF MNIST GAN: about [-1, 1]."""
    return (images.astype("float32") - 128.0) / 128.0


def subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded random ``fraction`` of the training set (all of it for 1.0)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.fraction={fraction}: must be in (0, 1]")
    n = len(labels)
    if fraction == 1.0:
        return np.arange(n)
    keep = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:keep])


def pad_shards(shards: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Shards as one int32 [N, max_size] index table (rows padded by repetition) and sizes [N]."""
    sizes = np.array([len(s) for s in shards], np.int32)
    table = np.stack([np.resize(s, sizes.max()) for s in shards]).astype(np.int32)
    return table, sizes
