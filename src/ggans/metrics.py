"""MNIST score and Fréchet distances of generated images, batched over replicas (notes, section 2).

All statistics are float64 numpy on the host, as TF-GAN computes FID (float64, unbiased
covariance); only the classifier pass runs in JAX. Every function takes arrays with any
leading "replica" axes, e.g. logits [R, S, 10] -> MS [R], and never loops over replicas
in Python: the classifier sees all replicas' images in one jitted call, and the matrix
square roots use stacked ``np.linalg.eigh``.

Features: ``fid`` uses the classifier's 10 logits (the paper's metric); ``fid_pool`` uses
its 128 penultimate (post-relu) features, as does ``kid`` (Binkowski et al. 2018), against
a fixed seeded subset of 2,000 real images. ``fid_pooled`` and ``kid_pooled`` score all
machines' samples as one population. Neither is comparable with Inception FIDs, and
both carry a finite-sample bias (real test images: logit FID ~0.4 with 10,000 samples,
~2.7 with 1,000). Scores are tied to one classifier, named by its sha256.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ggans.classifier import FrozenClassifier, classifier_outputs, load_classifier
from ggans.data import to_model_range

IMAGE_SHAPE = (28, 28, 1)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def mnist_score(logits: Any) -> np.ndarray:
    """MS = exp(E_x KL(p(y|x) || p(y))) of logits [..., S, 10] -> [...] (float64 numpy).

    p(y|x) = softmax(logits), p(y) = its mean over the S samples. 1 (one class or no
    confidence) to 10 (confident and balanced over the ten digits).
    """
    logits = np.asarray(logits, np.float64)
    log_p = logits - _logsumexp(logits, -1)
    p = np.exp(log_p)
    log_py = np.log(np.mean(p, axis=-2, keepdims=True))
    kl = np.sum(p * (log_p - log_py), axis=-1)
    return np.exp(np.mean(kl, axis=-1))


class Gaussian(NamedTuple):
    """Mean [..., D] and unbiased covariance [..., D, D] of a feature sample, float64."""

    mu: np.ndarray
    cov: np.ndarray


def gaussian_stats(features: Any) -> Gaussian:
    """Mean and unbiased (S - 1) covariance of features [..., S, D], in float64."""
    f = np.asarray(features, np.float64)
    if f.shape[-2] < 2:
        raise ValueError(f"gaussian_stats: need at least 2 samples, got shape {f.shape}")
    mu = f.mean(axis=-2)
    centred = f - mu[..., None, :]
    cov = np.einsum("...si,...sj->...ij", centred, centred) / (f.shape[-2] - 1)
    return Gaussian(mu, cov)


def _sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of stacked PSD matrices (tiny negative eigenvalues clipped)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> np.ndarray:
    """Tr (cov1 cov2)^(1/2) for stacked PSD matrices, broadcasting leading axes.

    cov1 cov2 has the eigenvalues of the PSD matrix sqrt(cov1) cov2 sqrt(cov1), so the
    trace is the sum of the square roots of the latter's (clipped) eigenvalues.
    """
    s1 = _sqrtm_psd(np.asarray(cov1, np.float64))
    m = s1 @ np.asarray(cov2, np.float64) @ s1
    m = 0.5 * (m + np.swapaxes(m, -1, -2))
    return np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum(axis=-1)


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> np.ndarray:
    """|mu1 - mu2|^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), float64, batched.

    Leading axes broadcast (e.g. one real Gaussian against [R] generated ones -> [R]).
    Not clipped at 0: identical inputs give 0 up to about 1e-12 of the traces.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    diff = np.sum((mu1 - mu2) ** 2, axis=-1)
    traces = np.trace(cov1, axis1=-2, axis2=-1) + np.trace(cov2, axis1=-2, axis2=-1)
    return diff + traces - 2.0 * trace_sqrt_product(cov1, cov2)


def gaussian_distance(a: Gaussian, b: Gaussian) -> np.ndarray:
    """:func:`frechet_distance` of two :class:`Gaussian`s."""
    return frechet_distance(a.mu, a.cov, b.mu, b.cov)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 of features [..., S, d] and [..., T, d] -> [..., S, T]."""
    d = x.shape[-1]
    return (np.einsum("...sd,...td->...st", x, y) / d + 1.0) ** 3


def kernel_inception_distance(gen: Any, real: Any) -> np.ndarray:
    """The unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018, KID) between
    generated features [..., S, d] and real features [T, d] -> [...] (float64): the mean
    kernel within each set over distinct pairs, minus twice the mean across. 0 in
    expectation when both come from one distribution, and, unlike FID, without a bias
    that depends on S."""
    x = np.asarray(gen, np.float64)
    y = np.asarray(real, np.float64)
    s, t = x.shape[-2], y.shape[-2]
    if s < 2 or t < 2:
        raise ValueError(f"kernel_inception_distance: need 2 samples a side, got {s} and {t}")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    within_x = (kxx.sum((-2, -1)) - np.trace(kxx, axis1=-2, axis2=-1)) / (s * (s - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (t * (t - 1))
    return within_x + within_y - 2.0 * kxy.mean((-2, -1))


@functools.partial(jax.jit, static_argnames="chunk")
def _chunked_outputs(params: Any, images: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Classifier logits/features of [n_chunks * chunk, 28, 28, 1] images, one compiled map."""
    if images.dtype == jnp.uint8:
        images = to_model_range(images)
    x = images.astype(jnp.float32).reshape((-1, chunk) + IMAGE_SHAPE)
    logits, feats = jax.lax.map(lambda b: classifier_outputs(params, b), x)
    return logits.reshape(-1, logits.shape[-1]), feats.reshape(-1, feats.shape[-1])


def classify(
    images: Any, classifier: FrozenClassifier | None = None, chunk: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [..., 10] and pool features [..., 128] of images [..., 28, 28, 1], as numpy.

    Float images must be in the model range [-1, 1]; uint8 images are mapped with
    :func:`ggans.data.to_model_range`. All leading axes (replicas, samples) are flattened
    into one jitted, chunked classifier pass (``chunk`` images at a time bounds memory).
    """
    clf = classifier or load_classifier()
    images = jnp.asarray(images)
    if images.shape[-3:] != IMAGE_SHAPE:
        raise ValueError(f"classify: images must end in {IMAGE_SHAPE}, got {images.shape}")
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + IMAGE_SHAPE)
    n = flat.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,) + IMAGE_SHAPE, flat.dtype)])
    logits, feats = jax.device_get(_chunked_outputs(clf.params, flat, chunk))
    return logits[:n].reshape(lead + (-1,)), feats[:n].reshape(lead + (-1,))


@dataclass(frozen=True)
class RealStats:
    """Gaussians of the classifier's logits and pool features on real images.

    ``classifier_sha256`` names the classifier; ``data_sha256`` the exact uint8 images.
    """

    logits: Gaussian
    pool: Gaussian
    classifier_sha256: str
    data_sha256: str
    num_images: int
    kid_pool: np.ndarray  # [KID_REAL, 128] pool features of a seeded subset, KID's real side

    def to_npz(self, path: Path) -> None:
        """Save to ``path`` (numpy .npz)."""
        np.savez(
            path,
            logits_mu=self.logits.mu,
            logits_cov=self.logits.cov,
            pool_mu=self.pool.mu,
            pool_cov=self.pool.cov,
            classifier_sha256=self.classifier_sha256,
            data_sha256=self.data_sha256,
            num_images=self.num_images,
            kid_pool=self.kid_pool,
        )

    @classmethod
    def from_npz(cls, path: Path) -> RealStats:
        """Load what :meth:`to_npz` wrote."""
        with np.load(path) as z:
            return cls(
                Gaussian(z["logits_mu"], z["logits_cov"]),
                Gaussian(z["pool_mu"], z["pool_cov"]),
                str(z["classifier_sha256"]),
                str(z["data_sha256"]),
                int(z["num_images"]),
                z["kid_pool"],
            )


_REAL_STATS_CACHE: dict[tuple[str, str], RealStats] = {}
_REAL_STATS_LOCK = threading.Lock()


def images_sha256(images: np.ndarray) -> str:
    """sha256 of a uint8 image array's shape and bytes (the real-stats cache key)."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def real_stats(
    images: np.ndarray,
    classifier: FrozenClassifier | None = None,
    cache_dir: str | Path | None = None,
    chunk: int = 1000,
) -> RealStats:
    """Real-image statistics (e.g. of ``mnist.train_images``, the paper's reference).

    Cached in memory, and on disk under ``cache_dir`` when given, keyed by the classifier's
    sha256 and the images' sha256, so a changed classifier or data set is never served
    stale statistics.
    """
    clf = classifier or load_classifier()
    key = (clf.sha256, images_sha256(images))
    with _REAL_STATS_LOCK:  # a run's warm-up thread and its evaluator compute them once
        if key not in _REAL_STATS_CACHE:
            _REAL_STATS_CACHE[key] = _real_stats(images, clf, key, cache_dir, chunk)
        return _REAL_STATS_CACHE[key]


def _real_stats(images, clf, key, cache_dir, chunk) -> RealStats:
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"real_stats_{key[0][:16]}_{key[1][:16]}.npz"
        if path.is_file():
            try:
                stats = RealStats.from_npz(path)
            except KeyError:  # written before KID: computed again
                stats = None
            if stats is not None and (stats.classifier_sha256, stats.data_sha256) == key:
                return stats
    logits, feats = classify(images, clf, chunk)
    subset = np.random.default_rng(0).permutation(len(images))[:KID_REAL]
    stats = RealStats(
        gaussian_stats(logits), gaussian_stats(feats), key[0], key[1], len(images), feats[subset]
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.to_npz(path)
    return stats


# Real images on KID's real side, and the most generated ones of a population it pools.
KID_REAL = 2000


def scores_from_outputs(logits: Any, feats: Any, real: RealStats) -> dict[str, np.ndarray]:
    """``ms``, ``fid`` (logits), ``fid_pool`` and ``kid`` (pool features) of [..., S, D]
    classifier outputs."""
    gen_logits, gen_pool = gaussian_stats(logits), gaussian_stats(feats)
    return {
        "ms": mnist_score(logits),
        "fid": gaussian_distance(real.logits, gen_logits),
        "fid_pool": gaussian_distance(real.pool, gen_pool),
        "kid": kernel_inception_distance(feats, real.kid_pool),
    }


def pooled_scores(logits: Any, feats: Any, real: RealStats, seed: int = 0) -> dict[str, float]:
    """FID and KID of all machines' samples [R, S, D] taken as one population (the pooled
    scores of arXiv 2310.11714); KID on a seeded subset of at most ``KID_REAL`` of them."""
    flat = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    pool = np.asarray(feats, np.float64).reshape(-1, np.shape(feats)[-1])
    pick = np.random.default_rng(seed).permutation(len(pool))[:KID_REAL]
    return {
        "fid_pooled": float(gaussian_distance(real.logits, gaussian_stats(flat))),
        "kid_pooled": float(kernel_inception_distance(pool[pick], real.kid_pool)),
    }


def score_population(
    gen_images: Any,
    real: RealStats,
    classifier: FrozenClassifier | None = None,
    chunk: int = 1000,
) -> dict[str, np.ndarray]:
    """Per-replica ``ms``, ``fid``, ``fid_pool`` (float64 [R]) of images [R, S, 28, 28, 1].

    Images in [-1, 1] (what generators produce) or uint8. Any leading axes work: [S, ...]
    gives scalars. One jitted classifier pass covers all replicas; the classifier must be
    the one ``real`` was computed with.
    """
    clf = classifier or load_classifier()
    if clf.sha256 != real.classifier_sha256:
        raise ValueError(
            f"score_population: real stats come from classifier {real.classifier_sha256[:12]}, "
            f"scoring with {clf.sha256[:12]}"
        )
    logits, feats = classify(gen_images, clf, chunk)
    scores = scores_from_outputs(logits, feats, real)
    if np.ndim(logits) == 3:  # a population of machines: its pooled scores too
        scores.update(pooled_scores(logits, feats, real))
    return scores
