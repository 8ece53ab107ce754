"""The shipped MNIST classifier: accuracy on the real test split, integrity check, shapes."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggans.classifier import (
    FEATURES_DIM,
    accuracy,
    init_params,
    load_classifier,
    random_shift,
)
from ggans.errors import DataError


def test_shipped_weights_test_accuracy(mnist):
    clf = load_classifier()
    acc = accuracy(clf.params, mnist.test_images, mnist.test_labels)
    print(f"\nshipped classifier {clf.sha256[:12]}: test accuracy {acc:.4%} on 10,000 images")
    print(f"recorded in classifier.json: {clf.recipe['test_accuracy']:.4%}")
    assert acc >= 0.99
    assert abs(acc - clf.recipe["test_accuracy"]) < 1e-3


def test_load_is_cached_and_checks_sha(tmp_path):
    clf = load_classifier()
    assert load_classifier() is clf
    assert len(clf.sha256) == 64
    weights = tmp_path / "classifier.msgpack"
    shutil.copy(_asset("json"), tmp_path / "classifier.json")
    blob = bytearray(_asset("msgpack").read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256"):
        load_classifier(str(weights))
    with pytest.raises(DataError, match="missing"):
        load_classifier(str(tmp_path / "absent.msgpack"))


def _asset(ext: str) -> Path:
    import ggans

    return Path(ggans.__file__).parent / "assets" / f"classifier.{ext}"


def test_shapes_and_vmap():
    clf = load_classifier()
    x = jnp.zeros((3, 5, 28, 28, 1))
    logits = jax.vmap(lambda b: clf.logits(clf.params, b))(x)
    feats = jax.vmap(lambda b: clf.features(clf.params, b))(x)
    both = clf.outputs(clf.params, x[0])
    assert logits.shape == (3, 5, 10) and feats.shape == (3, 5, FEATURES_DIM)
    np.testing.assert_allclose(both[0], logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], feats[0], rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_structure(init_params(0)) == jax.tree_util.tree_structure(clf.params)


def test_random_shift():
    x = jnp.arange(2 * 28 * 28, dtype=jnp.float32).reshape(2, 28, 28, 1)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(random_shift(key, x, 0), x)
    y = random_shift(key, x, 2)
    assert y.shape == x.shape
    # every shifted image is a window of the -1-padded original
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1)
    for i in range(2):
        hits = [
            (a, b)
            for a in range(5)
            for b in range(5)
            if np.array_equal(padded[i, a : a + 28, b : b + 28], np.asarray(y[i]))
        ]
        assert len(hits) == 1
