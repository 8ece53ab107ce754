"""MNIST loading (IDX with checksums, tfds mock) and per-machine splits."""

import gzip
import shutil

import numpy as np
import pytest

from ggans.data import load_idx, load_tfds, pad_shards, subsample, to_model_range
from ggans.errors import ConfigError, DataError
from ggans.partitions import split_indices


def test_idx_files_load_with_expected_shapes(mnist):
    assert mnist.train_images.shape == (60000, 28, 28, 1)
    assert mnist.test_images.shape == (10000, 28, 28, 1)
    assert mnist.train_images.dtype == np.uint8
    assert np.bincount(mnist.train_labels).tolist()[:3] == [5923, 6742, 5958]
    x = to_model_range(mnist.train_images[:100])
    assert x.min() == -1.0 and x.max() <= 1.0


def test_missing_file_is_one_clear_error(mnist_dir, tmp_path):
    for f in mnist_dir.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing MNIST file .*t10k-labels-idx1-ubyte"):
        load_idx(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_idx(tmp_path / "nowhere")


def test_corrupt_file_is_one_clear_error(mnist_dir, tmp_path):
    for f in mnist_dir.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(path.read_bytes()))
    payload[100] ^= 1
    path.write_bytes(gzip.compress(bytes(payload)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is corrupt"):
        load_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_idx(tmp_path)


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
        data = load_tfds()
    assert data.train_images.shape == (50, 28, 28, 1)
    assert data.train_images.dtype == np.uint8
    assert data.test_labels.shape == (50,)
    assert data.train_labels.max() < 10


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100])
def test_iid_split_disjoint_equal_complete(mnist, n):
    shards = split_indices(mnist.train_labels, n, "iid", seed=0)
    sizes = {len(s) for s in shards}
    assert sizes == {60000 // n}
    allidx = np.concatenate(shards)
    assert len(np.unique(allidx)) == len(allidx) == n * (60000 // n)  # disjoint
    if 60000 % n == 0:
        np.testing.assert_array_equal(np.sort(allidx), np.arange(60000))  # complete


def test_iid_split_is_seeded():
    labels = np.arange(100) % 10
    a = split_indices(labels, 4, "iid", seed=1)
    b = split_indices(labels, 4, "iid", seed=1)
    c = split_indices(labels, 4, "iid", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_non_iid_one_digit_per_machine(mnist):
    shards = split_indices(mnist.train_labels, 10, "non_iid", seed=0)
    for i, s in enumerate(shards):
        assert set(mnist.train_labels[s].tolist()) == {i}
        assert len(s) == (mnist.train_labels == i).sum()


@pytest.mark.parametrize("n", [2, 3, 20, 100])
def test_non_iid_other_n_partitions_by_digit(n):
    labels = np.repeat(np.arange(10), 120)
    shards = split_indices(labels, n, "non_iid", seed=0)
    allidx = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
    for i, s in enumerate(shards):
        digits = set(labels[s].tolist())
        expected = {i % 10} if n >= 10 else {d for d in range(10) if d % n == i}
        assert digits == expected


def test_split_errors():
    labels = np.arange(50) % 10
    with pytest.raises(ConfigError, match="nodes=0"):
        split_indices(labels, 0, "iid", 0)
    with pytest.raises(ConfigError, match="data.split='foo'"):
        split_indices(labels, 2, "foo", 0)
    with pytest.raises(ConfigError, match="more machines than training images"):
        split_indices(labels, 51, "iid", 0)


def test_fraction_and_padding():
    labels = np.arange(1000) % 10
    pool = subsample(labels, 0.1, seed=0)
    assert len(pool) == 100 and len(np.unique(pool)) == 100
    shards = split_indices(labels, 3, "non_iid", 0, pool)
    table, sizes = pad_shards(shards)
    assert table.shape == (3, sizes.max())
    for row, size, s in zip(table, sizes, shards):
        np.testing.assert_array_equal(row[:size], s)
        assert set(row.tolist()) == set(s.tolist())


def test_tfds_failure_is_one_clear_error(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "data_source", offline)
    with pytest.raises(DataError, match=r"data.dir: not set .*ConnectionError: no network"):
        load_tfds()


def test_tensorflow_datasets_path_loads_mnist_where_tfds_has_it(monkeypatch):
    """No data.dir and no $GGANS_DATA_DIR: MNIST from tensorflow-datasets (mocked: offline)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from ggans.data import load_mnist

    monkeypatch.delenv("GGANS_DATA_DIR", raising=False)
    with tfds.testing.mock_data(num_examples=12):
        mnist = load_mnist(None)
    assert mnist.train_images.shape == (12, 28, 28, 1) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (12, 28, 28, 1)
    assert mnist.train_labels.shape == (12,) and mnist.train_labels.max() <= 9


def _write_idx(folder, stem, array):
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(folder / f"{stem}.gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_mnist_layout_and_refuses_mnist_itself(tmp_path, mnist_dir):
    from ggans import datasets

    rng = np.random.default_rng(0)
    for split, n in (("train", 60000), ("t10k", 10000)):
        _write_idx(tmp_path, f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path, f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    images = datasets.load("fashion_mnist", tmp_path)
    assert images.train_images.shape == (60000, 28, 28, 1) and images.test_labels.shape == (10000,)
    with pytest.raises(DataError, match="holds MNIST, not Fashion-MNIST"):
        datasets.load("fashion_mnist", mnist_dir)
    _write_idx(tmp_path, "t10k-labels-idx1-ubyte", rng.integers(0, 10, 9999))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is corrupt"):
        datasets.load("fashion_mnist", tmp_path)


def test_any_tfds_image_set_by_name(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from ggans import datasets

    with tfds.testing.mock_data(num_examples=8):
        images = datasets.load("tfds:cifar10")
    assert images.train_images.shape == (8, 32, 32, 3) and images.train_images.dtype == np.uint8
    assert not datasets.get("tfds:cifar10").scored
    with pytest.raises(ConfigError, match="data.name='cifar': must be one of mnist, fashion_mnist"):
        datasets.get("cifar")
