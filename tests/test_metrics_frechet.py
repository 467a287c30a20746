"""Frechet distance, statistics, Inception Score and precision/recall against closed forms and
naive implementations."""

import numpy as np
import pytest
import torch

from reglue.trainer.metrics import (
    FeatureStats,
    Reference,
    frechet_distance,
    inception_score,
    load_reference,
    manifold_radii,
    precision_recall,
    save_reference,
    statistics,
)


def test_frechet_diagonal_and_commuting_closed_forms():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors: the formula still holds
    assert frechet_distance(mu1, q * a @ q.T, mu2, q * b @ q.T) == pytest.approx(exact, rel=1e-10)
    # Non-commuting full covariances: against tr sqrtm(S1 S2) computed from the eigenvalues of S1 S2.
    s1, s2 = (lambda m: m @ m.T / d)(rng.normal(size=(d, d))), (lambda m: m @ m.T / d)(rng.normal(size=(d, d)))
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_perturbation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 128)) @ rng.normal(size=(128, 128)) * 0.1
    stats = statistics(x)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8
    fds = [frechet_distance(*stats, *statistics(x + s * rng.normal(size=x.shape))) for s in (0.01, 0.05, 0.1, 0.3)]
    assert 0 < fds[0] and all(a < b for a, b in zip(fds, fds[1:]))
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(stats[0][:5], stats[1][:5, :5], *stats)


def test_statistics_are_float64_exact_and_mergeable():
    rng = np.random.default_rng(2)
    x = rng.normal(3, 2, size=(1000, 32)).astype(np.float32)
    mu, sigma = statistics(x, chunk=128)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64
    halves = FeatureStats(32).update(x[:300]), FeatureStats(32).update(x[300:])
    merged = FeatureStats(32)
    merged.n, merged.sum, merged.outer = 1000, halves[0].sum + halves[1].sum, halves[0].outer + halves[1].outer
    np.testing.assert_allclose(merged.mu_sigma()[1], sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).update(np.ones((1, 4))).mu_sigma()


def test_inception_score_extremes():
    eye = torch.softmax(40 * torch.eye(10, dtype=torch.float64), 1)  # no exact zeros: ADM takes log(p)
    assert inception_score(eye) == pytest.approx(10)  # confident and diverse: IS = number of classes
    assert inception_score(torch.full((20, 10), 0.1)) == pytest.approx(1)  # uninformative: IS = 1
    # Splits of split_size are scored separately and averaged (ADM): two splits of 5 classes each.
    assert inception_score(torch.cat([eye[:5], eye[:5]]), split_size=5) == pytest.approx(5)


def naive_precision_recall(ref, smp, k=3):
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    precision = (d(smp, ref) <= r_ref[None]).any(1).mean()
    recall = (d(ref, smp) <= r_smp[None]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_the_definition():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    smp = (rng.normal(size=(200, 16)) * 1.3 + 0.4).astype(np.float32)
    # Batches smaller than the sets exercise the blockwise k-NN and the OR-accumulation.
    p, r = precision_recall(ref, smp, batch=64)
    want_p, want_r = naive_precision_recall(ref.astype(np.float64), smp.astype(np.float64))
    assert abs(p - want_p) <= 0.02 and abs(r - want_r) <= 0.02  # float16 distances, as ADM
    assert 0.2 < p < 0.95 and 0.2 < r < 0.95
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, ref + 100) == (0.0, 0.0)
    radii = manifold_radii(torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]]), k=2, batch=2)
    assert radii.tolist() == [9.0, 4.0, 9.0, 16.0, 49.0]  # squared distance to the 2nd neighbour


def test_reference_file_round_trip(tmp_path):
    ref = Reference(mu=np.arange(3.0), sigma=np.eye(3), acts=np.ones((4, 3), np.float32))
    path = save_reference(tmp_path / "ref.npz", ref)
    back = load_reference(path)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    assert back.mu_s is None and back.images is None and back.acts.shape == (4, 3)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(3, np.float32), sigma=np.eye(3), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert load_reference(tmp_path / "adm.npz").images == str(tmp_path / "adm.npz")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(1))
    with pytest.raises(ValueError, match="no `mu`"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="fid-ref"):
        load_reference(tmp_path / "missing.npz")
