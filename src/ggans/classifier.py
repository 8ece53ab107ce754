"""The frozen MNIST classifier behind the MNIST score and the FIDs (reference notes, section 2).

The paper's TF-GAN classifier cannot be downloaded here, so this small CNN, trained on the
MNIST training split and shipped in ``ggans/assets``, plays its role. Every score computed
with it should name it by the sha256 of its weights (:func:`load_classifier` returns it).

Architecture (images in [-1, 1], shape [B, 28, 28, 1]; about 455k parameters, ~1.8 MB)::

    conv 5x5x32 SAME, relu, maxpool 2  ->  conv 5x5x64 SAME, relu, maxpool 2
    -> flatten 3136 -> dense 128, relu (the "pool" features) -> dense 10 (the logits)

Training recipe (:data:`RECIPE`, :func:`train_recipe`), seeded, batch 128, Adam with a
cosine-decayed learning rate in each of two stages over the 60,000 training images:
stage 1, 8 epochs at 2e-3, each image shifted by its own random integer offset of up to
2 pixels (black, i.e. -1, shifted in); stage 2, 2 epochs at 3e-4 on unshifted images, which
makes the classifier confident on clean digits (real test MNIST score ~9.8+, as the
reference's ~9.9; stage 1 alone gives 9.76). No batch norm or dropout.
Regenerate the shipped weights with ``python -m ggans.classifier --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from ggans.data import load_mnist, to_model_range
from ggans.errors import DataError

ASSET_WEIGHTS = "classifier.msgpack"
ASSET_RECIPE = "classifier.json"
FEATURES_DIM = 128

RECIPE: dict[str, Any] = {
    "seed": 0,
    "batch_size": 128,
    "optimizer": "adam",
    "schedule": "cosine decay to 0 over each stage's steps",
    # stage 1: shift-augmented training
    "epochs": 8,
    "learning_rate": 2e-3,
    "max_shift": 2,
    # stage 2: un-augmented fine-tuning from stage 1 (seed + 1), which makes the classifier
    # as confident on clean digits as the reference's (real-data MNIST score ~9.8-9.9)
    "finetune_epochs": 2,
    "finetune_learning_rate": 3e-4,
    "finetune_max_shift": 0,
    "eval_batch_size": 1000,
}


class Classifier(nn.Module):
    """Small MNIST CNN: images in [-1, 1] [B, 28, 28, 1] -> logits [B, 10].

    With ``features=True`` it returns ``(logits, features)``, the features being the
    128 post-relu activations the last layer reads (the second FID's "pool" features).
    """

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False):
        x = nn.relu(nn.Conv(32, (5, 5), padding="SAME", name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (5, 5), padding="SAME", name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        feats = nn.relu(nn.Dense(FEATURES_DIM, name="dense1")(x))
        logits = nn.Dense(10, name="logits")(feats)
        return (logits, feats) if features else logits


def classifier_logits(params: Any, images: jax.Array) -> jax.Array:
    """Logits [B, 10] of images in [-1, 1] [B, 28, 28, 1]; pure, jit/vmap friendly."""
    return Classifier().apply({"params": params}, images)


def classifier_features(params: Any, images: jax.Array) -> jax.Array:
    """Penultimate (post-relu dense) features [B, 128] of images in [-1, 1]."""
    return Classifier().apply({"params": params}, images, features=True)[1]


def classifier_outputs(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, 10] and features [B, 128] in one pass."""
    return Classifier().apply({"params": params}, images, features=True)


class FrozenClassifier(NamedTuple):
    """The shipped classifier: pure apply functions ``fn(params, images)``, weights, identity."""

    logits: Callable[[Any, jax.Array], jax.Array]
    features: Callable[[Any, jax.Array], jax.Array]
    outputs: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    params: Any
    sha256: str
    recipe: dict


def init_params(seed: int = 0) -> Any:
    """Freshly initialised parameters (used by :func:`train`)."""
    return Classifier().init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def _params_shape() -> Any:
    """The parameters' tree of shapes, to restore saved bytes into (no initialisation run)."""
    return jax.eval_shape(init_params)


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Shift each image by its own random integer offset in [-max_shift, max_shift]^2.

    Pixels shifted in are -1 (black in model range), as on the MNIST canvas border.
    """
    if max_shift == 0:
        return images
    b = images.shape[0]
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, constant_values=-1.0)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), images.shape[1:])

    return jax.vmap(crop)(padded, offsets)


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``params`` on uint8 images [n, 28, 28, 1] (batched, jitted)."""
    predict = jax.jit(lambda p, x: jnp.argmax(classifier_logits(p, to_model_range(x)), -1))
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = np.asarray(predict(params, images[i : i + batch_size]))
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(images)


def _print_flush(line: str) -> None:
    print(line, flush=True)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = RECIPE["seed"],
    epochs: int = RECIPE["epochs"],
    batch_size: int = RECIPE["batch_size"],
    learning_rate: float = RECIPE["learning_rate"],
    max_shift: int = RECIPE["max_shift"],
    params: Any = None,
    log: Callable[[str], None] | None = _print_flush,
) -> Any:
    """One training stage on uint8 images [n, 28, 28, 1]; returns the params.

    Starts from ``params`` when given (stage 2), else from :func:`init_params` (``seed``).
    Seeded (init, shuffling, shifts all derive from ``seed``); the last partial batch of each
    epoch is dropped. Bit-exact reproduction across machines is not promised (XLA CPU kernels).
    :func:`train_recipe` runs both stages of the :data:`RECIPE`.
    """
    n = len(images)
    steps_per_epoch = n // batch_size
    total = steps_per_epoch * epochs
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, total))
    params = init_params(seed) if params is None else params
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key, x, y):
        x = random_shift(key, to_model_range(x), max_shift)

        def loss_fn(p):
            logits = classifier_logits(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed + 1)
    labels = labels.astype(np.int32)
    for epoch in range(epochs):
        order = rng.permutation(n)
        t0, losses = time.perf_counter(), []
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, sub, images[idx], labels[idx])
            losses.append(loss)
        if log:
            mean_loss = float(np.mean(jax.device_get(losses)))
            seconds = time.perf_counter() - t0
            log(f"epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f} ({seconds:.0f}s)")
    return params


def train_recipe(
    images: np.ndarray, labels: np.ndarray, recipe: dict = RECIPE, params: Any = None
) -> Any:
    """Both stages of ``recipe``; with ``params`` (stage-1 weights) only stage 2 runs."""
    common = {"batch_size": recipe["batch_size"]}
    if params is None:
        params = train(
            images,
            labels,
            seed=recipe["seed"],
            epochs=recipe["epochs"],
            learning_rate=recipe["learning_rate"],
            max_shift=recipe["max_shift"],
            **common,
        )
    if recipe["finetune_epochs"] == 0:
        return params
    return train(
        images,
        labels,
        seed=recipe["seed"] + 1,
        epochs=recipe["finetune_epochs"],
        learning_rate=recipe["finetune_learning_rate"],
        max_shift=recipe["finetune_max_shift"],
        params=params,
        **common,
    )


def _asset_dir() -> Path:
    return Path(str(resources.files("ggans") / "assets"))


def save_classifier(params: Any, out: Path, recipe: dict) -> dict:
    """Write ``out`` (msgpack weights) and its sibling ``.json`` recipe with the weights' sha256."""
    blob = serialization.to_bytes(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    meta = dict(recipe, weights=out.name, sha256=hashlib.sha256(blob).hexdigest())
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | None = None) -> FrozenClassifier:
    """Load the shipped (or given ``.msgpack``) weights, checking their sha256 against the json.

    No network. Raises :class:`DataError` if a file is missing or the sha256 differs.
    """
    weights = Path(path) if path else _asset_dir() / ASSET_WEIGHTS
    meta_path = weights.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise DataError(f"classifier: missing {weights} or {meta_path}")
    blob = weights.read_bytes()
    meta = json.loads(meta_path.read_text())
    sha = hashlib.sha256(blob).hexdigest()
    if sha != meta.get("sha256"):
        raise DataError(
            f"classifier: {weights} has sha256 {sha}, but {meta_path} records "
            f"{meta.get('sha256')}; the weights file is corrupt or was replaced"
        )
    params = jax.tree.map(jnp.asarray, serialization.from_bytes(_params_shape(), blob))
    return FrozenClassifier(
        classifier_logits, classifier_features, classifier_outputs, params, sha, meta
    )


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m ggans.classifier --data-dir DIR [--out PATH] [--seed S] [--init W]``.

    ``--init`` skips stage 1 and fine-tunes the given stage-1 weights (a ``.msgpack`` written
    by ``--stage1-only``), recording that stage's json next to the new recipe.
    """
    parser = argparse.ArgumentParser(description="Train the frozen MNIST classifier.")
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX folder (default $GGANS_DATA_DIR)"
    )
    parser.add_argument(
        "--out", default=str(_asset_dir() / ASSET_WEIGHTS), help="weights path (json beside)"
    )
    parser.add_argument("--seed", type=int, default=RECIPE["seed"])
    parser.add_argument("--stage1-only", action="store_true", help="stop after stage 1")
    parser.add_argument("--init", default=None, help="stage-1 weights to fine-tune (stage 2)")
    args = parser.parse_args(argv)
    mnist = load_mnist(args.data_dir)
    recipe = dict(RECIPE, seed=args.seed)
    if args.stage1_only:
        recipe.update(finetune_epochs=0)
    init, stage1 = None, None
    if args.init:
        init_path = Path(args.init)
        init = serialization.from_bytes(_params_shape(), init_path.read_bytes())
        stage1_json = init_path.with_suffix(".json")
        stage1 = json.loads(stage1_json.read_text()) if stage1_json.is_file() else {}
        stage1["sha256"] = hashlib.sha256(init_path.read_bytes()).hexdigest()
    t0 = time.perf_counter()
    params = train_recipe(mnist.train_images, mnist.train_labels, recipe, init)
    seconds = time.perf_counter() - t0
    acc = accuracy(params, mnist.test_images, mnist.test_labels)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    recipe.update(
        architecture="conv5x5x32-pool2-conv5x5x64-pool2-dense128(features)-dense10",
        parameters=n_params,
        train_images=len(mnist.train_images),
        test_accuracy=acc,
        train_seconds=round(seconds, 1),
        jax_version=jax.__version__,
    )
    if stage1 is not None:
        recipe["train_seconds_note"] = "stage 2 only; stage 1 was loaded with --init"
        recipe["stage1"] = {
            k: stage1[k] for k in ("sha256", "test_accuracy", "train_seconds") if k in stage1
        }
    meta = save_classifier(params, Path(args.out), recipe)
    print(f"test accuracy {acc:.4%}, {n_params} params, {seconds:.0f}s; wrote {args.out}")
    print(f"sha256 {meta['sha256']}")


if __name__ == "__main__":
    main()
