"""MNIST score and Fréchet distances: exact identities, a scipy cross-check, real MNIST figures."""

import numpy as np
import pytest
import scipy.linalg

from ggans.classifier import load_classifier
from ggans.data import to_model_range
from ggans.metrics import (
    RealStats,
    classify,
    frechet_distance,
    gaussian_distance,
    gaussian_stats,
    mnist_score,
    real_stats,
    score_population,
)


def _scipy_fid(mu1, cov1, mu2, cov2):
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean.real))


def _random_features(rng, n, d):
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def test_gaussian_stats_matches_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 50, 4)).astype(np.float32)
    mu, cov = gaussian_stats(f)
    assert mu.dtype == np.float64 and mu.shape == (3, 4) and cov.shape == (3, 4, 4)
    for r in range(3):
        np.testing.assert_allclose(mu[r], f[r].astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(
            cov[r], np.cov(f[r].astype(np.float64), rowvar=False), rtol=1e-12
        )


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(1)
    g = gaussian_stats(_random_features(rng, 500, 10))
    fid = gaussian_distance(g, g)
    print(f"\nFID(x, x) = {fid:.3e} (trace of cov {np.trace(g.cov):.1f})")
    assert abs(fid) < 1e-9 * np.trace(g.cov)


@pytest.mark.parametrize("d", [10, 64])
def test_frechet_distance_agrees_with_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    real = gaussian_stats(_random_features(rng, 2000, d))
    gens = gaussian_stats(np.stack([_random_features(rng, 1000, d) for _ in range(4)]))
    batched = frechet_distance(real.mu, real.cov, gens.mu, gens.cov)  # [D] vs [4, D]
    assert batched.shape == (4,)
    expected = np.array([_scipy_fid(real.mu, real.cov, m, c) for m, c in zip(*gens, strict=True)])
    rel = np.abs(batched - expected) / np.abs(expected)
    print(f"\nd={d}: FID {np.round(batched, 3)}, max relative error vs scipy sqrtm {rel.max():.1e}")
    np.testing.assert_allclose(batched, expected, rtol=1e-6)
    single = frechet_distance(real.mu, real.cov, gens.mu[2], gens.cov[2])
    assert np.ndim(single) == 0 and np.isclose(single, batched[2], rtol=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_rank_deficient_covariance():
    rng = np.random.default_rng(3)
    f = _random_features(rng, 300, 6)
    f[:, 0] = 0.0  # a dead feature: singular covariance, as with relu units
    a, b = gaussian_stats(f), gaussian_stats(_random_features(rng, 300, 6))
    np.testing.assert_allclose(gaussian_distance(a, b), _scipy_fid(*a, *b), rtol=1e-6)


def test_mnist_score_limits_and_batching():
    confident = 50.0 * np.eye(10)[np.arange(1000) % 10]  # confident, balanced
    single = 50.0 * np.eye(10)[np.zeros(1000, int)]  # confident, one class
    uniform = np.zeros((1000, 10))
    ms = mnist_score(np.stack([confident, single, uniform]))
    assert ms.shape == (3,)
    np.testing.assert_allclose(ms, [10.0, 1.0, 1.0], rtol=1e-9)
    assert np.ndim(mnist_score(confident)) == 0


@pytest.fixture(scope="module")
def real(mnist):
    """Real statistics of 10,000 training images (the full split is the runtime default)."""
    return real_stats(mnist.train_images[:10000])


def test_real_mnist_score_and_fid(mnist, real):
    logits, feats = classify(mnist.test_images)
    ms = mnist_score(logits)
    fid = gaussian_distance(real.logits, gaussian_stats(logits))
    fid_pool = gaussian_distance(real.pool, gaussian_stats(feats))
    clf = load_classifier()
    print(f"\nclassifier {clf.sha256[:12]}: MS(10k real test images) = {ms:.4f}")
    print(f"FID(10k train, 10k test) = {fid:.4f} (logits), {fid_pool:.4f} (pool features)")
    assert ms >= 9.8
    assert fid < 1.0  # the paper's (logit) FID
    assert fid_pool < 5.0  # 128 dimensions: larger estimation error


def test_score_population_real_single_digit_noise(mnist, real):
    s = 1000
    test = to_model_range(mnist.test_images)
    ones = test[mnist.test_labels == 1][:s]
    noise = np.random.default_rng(0).uniform(-1, 1, (s, 28, 28, 1)).astype(np.float32)
    pop = np.stack([test[:s], test[s : 2 * s], ones, noise])  # [R=4, S, 28, 28, 1]
    out = score_population(pop, real)
    for name in ("ms", "fid", "fid_pool"):
        print(f"\n{name:8s} real / real / digit-1 / noise: {np.round(out[name], 3)}", end="")
    print()
    assert all(out[k].shape == (4,) for k in ("ms", "fid", "fid_pool", "kid"))
    assert out["ms"][0] > 9.5 and out["ms"][1] > 9.5
    assert out["ms"][2] < 1.5
    assert out["ms"][3] < 0.5 * out["ms"][0]
    # 1,000 samples (the paper's eval size) give real data a finite-sample FID of a few units
    assert out["fid"][:2].max() < 5.0 and out["fid"][2:].min() > 100 * out["fid"][:2].max()
    assert out["fid_pool"][:2].max() < 40.0
    assert out["fid_pool"][2:].min() > 20 * out["fid_pool"][:2].max()
    # the batched pass agrees with scoring one replica alone (uint8 input too)
    alone = score_population(mnist.test_images[:s], real)
    assert "kid_pooled" not in alone  # one machine: nothing to pool
    for name, value in alone.items():
        np.testing.assert_allclose(value, out[name][0], rtol=1e-4)


def test_real_stats_cache(mnist, real, tmp_path):
    images = mnist.train_images[:10000]
    assert real_stats(images) is real  # in memory
    from ggans import metrics

    metrics._REAL_STATS_CACHE.clear()
    first = real_stats(images[:2000], cache_dir=tmp_path)
    (path,) = tmp_path.glob("real_stats_*.npz")
    metrics._REAL_STATS_CACHE.clear()
    again = real_stats(images[:2000], cache_dir=tmp_path)
    assert again is not first  # served from disk, not recomputed
    np.testing.assert_array_equal(RealStats.from_npz(path).logits.cov, first.logits.cov)
    assert again.classifier_sha256 == load_classifier().sha256 and again.num_images == 2000
    np.testing.assert_array_equal(again.pool.cov, first.pool.cov)


def _kid_by_loops(x, y):
    """The unbiased MMD^2 of the cubic kernel, term by term (the reference formula)."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_agrees_with_the_direct_formula_on_random_features():
    from ggans.metrics import kernel_inception_distance

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 30, 5)), rng.normal(0.5, 1.0, size=(40, 5))
    got = kernel_inception_distance(x, y)
    assert got.shape == (2,)
    for i in range(2):
        assert got[i] == pytest.approx(_kid_by_loops(x[i], y), rel=1e-10)


def test_kid_is_unbiased_for_samples_of_one_distribution():
    from ggans.metrics import kernel_inception_distance

    rng = np.random.default_rng(1)
    same = kernel_inception_distance(rng.normal(size=(400, 50, 10)), rng.normal(size=(60, 10)))
    shifted = kernel_inception_distance(
        rng.normal(0.3, 1, size=(50, 10)), rng.normal(size=(60, 10))
    )
    print(f"\nKID of one Gaussian, 50 vs 60 samples: mean {same.mean():.4f} "
          f"(standard error {same.std() / 20:.4f}); shifted by 0.3: {shifted:.3f}")  # fmt: skip
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(400)  # 0 in expectation
    assert (same < 0).any()  # unbiased, so it dips below 0 (FID never does)
    assert shifted > same.mean() + 3 * same.std()


def test_kid_of_real_and_generated_mnist(mnist, real):
    from ggans.metrics import KID_REAL, kernel_inception_distance

    s = 1000
    # ten sets of training images the real statistics never saw: KID's small-sample spread
    _, held = classify(mnist.train_images[10000 : 10000 + 10 * s])
    spread = kernel_inception_distance(held.reshape(10, s, -1), real.kid_pool)
    test = to_model_range(mnist.test_images)
    ones = test[mnist.test_labels == 1][:s]
    noise = np.random.default_rng(0).uniform(-1, 1, (s, 28, 28, 1)).astype(np.float32)
    out = score_population(np.stack([test[:s], ones, noise]), real)
    kid = out["kid"]
    print(f"\nKID real (10 held-out sets of 1,000): {spread.mean():.2f} +- {spread.std():.2f}; "
          f"test / digit-1 / noise: {np.round(kid, 2)}; pooled over the three: "
          f"KID {out['kid_pooled']:.2f}, FID {out['fid_pooled']:.2f}")  # fmt: skip
    assert real.kid_pool.shape == (KID_REAL, 128)
    # real against real: near 0, within a few of its spreads (one fixed real subset offsets
    # every estimate alike); a single digit and noise hundreds of spreads away
    assert abs(spread.mean()) < 3 * spread.std()
    assert kid[1] > 100 * spread.std() and kid[2] > kid[1]
    assert kid[0] < kid[1] / 20  # the test split: real digits too
    assert kid[0] < out["kid_pooled"] < kid[2]


def test_real_stats_asked_from_two_threads_are_computed_once(mnist, monkeypatch):
    """A run computes them in the background while its round compiles; its evaluator, asking
    meanwhile, waits for that result instead of computing it again."""
    import threading
    import time

    from ggans import metrics

    calls, classify = [], metrics.classify

    def slow_classify(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # the other thread asks meanwhile
        return classify(*args, **kwargs)

    monkeypatch.setattr(metrics, "classify", slow_classify)
    images, got = mnist.train_images[:300], {}
    threads = [
        threading.Thread(target=lambda n=n: got.update({n: real_stats(images)}), name=n)
        for n in ("background", "evaluator")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and got["background"] is got["evaluator"]
    assert got["evaluator"].num_images == 300
