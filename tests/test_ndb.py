"""Tests of mfa.ndb (also importable from mfa.metrics): NDB bins and tests, the two-proportion
z-test and the JS divergence, against scipy and brute-force references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm

from mfa.metrics import NDB, NDBResult, js_divergence, ndb, two_proportion_z_test


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_mixture_data(
    n: int, n_clusters: int = 8, dim: int = 10, seed: int = 0, spread: float = 6.0,
    means_seed: int = 123, exclude: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of an equal-weight mixture of unit-variance Gaussians with fixed means; optionally
    drop one cluster (the other clusters keep their relative weights)."""
    means = spread * torch.randn(n_clusters, dim, generator=gen(means_seed))
    g = gen(seed)
    allowed = torch.tensor([c for c in range(n_clusters) if c != exclude])
    labels = allowed[torch.randint(len(allowed), (n,), generator=g)]
    x = means[labels] + torch.randn(n, dim, generator=g)
    return x, labels


# ====================================================================== NDB


@pytest.fixture(scope="module")
def mixture_bins():
    train, _ = gaussian_mixture_data(20_000, seed=1)
    return NDB.fit(train, n_bins=50, seed=0, kmeans_iter=25)


def test_ndb_held_out_samples_are_close_to_alpha(mixture_bins):
    query, _ = gaussian_mixture_data(20_000, seed=2)
    result = mixture_bins.evaluate(query)
    assert isinstance(result, NDBResult)
    assert result.n_train == 20_000 and result.n_samples == 20_000
    assert result.ndb_over_k <= 0.15
    assert result.js_divergence < 2e-3
    k = 50
    for t in (result.bin_proportions_train, result.bin_proportions_samples, result.z_scores,
              result.p_values):
        assert t.shape == (k,) and t.dtype == torch.float64
    assert result.different.dtype == torch.bool and result.different.shape == (k,)
    assert result.ndb == int(result.different.sum())
    assert result.ndb_over_k == pytest.approx(result.ndb / k)
    assert result.centers.shape == (k, 10)
    assert float(result.bin_proportions_train.sum()) == pytest.approx(1.0)
    assert float(result.bin_proportions_samples.sum()) == pytest.approx(1.0)
    assert int(result.bin_counts_samples.sum()) == 20_000


def test_ndb_detects_a_dropped_cluster(mixture_bins):
    same, _ = gaussian_mixture_data(20_000, seed=2)
    dropped, _ = gaussian_mixture_data(20_000, seed=2, exclude=0)
    base = mixture_bins.evaluate(same)
    bad = mixture_bins.evaluate(dropped)
    assert bad.ndb_over_k > 0.3
    assert bad.ndb >= base.ndb + 10
    assert bad.js_divergence > 10 * base.js_divergence
    # The bins that held the dropped cluster are empty in the samples, and flagged with z > 0.
    empty = (bad.bin_counts_samples == 0) & (bad.bin_counts_train > 0)
    assert int(empty.sum()) >= 1
    assert bool(bad.different[empty].all())
    assert bool((bad.z_scores[empty] > 0).all())


def test_ndb_function_is_seeded_and_reproducible():
    train, _ = gaussian_mixture_data(3_000, seed=3)
    query, _ = gaussian_mixture_data(2_000, seed=4, exclude=5)
    a = ndb(train, query, 20, seed=7, kmeans_iter=20)
    b = ndb(train, query, 20, seed=7, kmeans_iter=20)
    assert a.ndb == b.ndb and a.js_divergence == b.js_divergence
    for name in ("centers", "z_scores", "p_values", "bin_proportions_train",
                 "bin_proportions_samples", "different"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The one-shot function equals the class API with the same settings.
    c = NDB.fit(train, 20, seed=7, kmeans_iter=20).evaluate(query)
    assert torch.equal(a.centers, c.centers) and torch.equal(a.z_scores, c.z_scores)
    # Another seed gives other bins.
    d = ndb(train, query, 20, seed=8, kmeans_iter=20)
    assert not torch.equal(a.centers, d.centers)


def test_ndb_seed_is_a_whole_number_below_2_63():
    """seed=1.5 ran as seed 1, "1" was taken, 2**70 failed with a bare overflow."""
    train, _ = gaussian_mixture_data(200, seed=3)
    for bad, error, message in ((1.5, TypeError, "seed must be an int, got float"),
                                ("1", TypeError, "seed must be an int, got str"),
                                (-1, ValueError, "seed must be >= 0"),
                                (2**70, ValueError, r"seed must be below 2\*\*63")):
        with pytest.raises(error, match=message):
            ndb(train, train, 5, seed=bad)
    a = ndb(train, train, 5, seed=np.int64(3), kmeans_iter=5)  # numpy integers are ints
    assert torch.equal(a.centers, ndb(train, train, 5, seed=3, kmeans_iter=5).centers)


def test_ndb_hand_computed_z_test():
    # 1-D bins at 0, 10 and 100 (nothing near 100): train 30/70/0, samples 50/50/0.
    train = torch.cat([torch.zeros(30, 1), torch.full((70, 1), 10.0)]) + 0.1
    samples = torch.cat([torch.zeros(50, 1), torch.full((50, 1), 10.0)]) - 0.1
    centers = torch.tensor([[0.0], [10.0], [100.0]])
    bins = NDB.from_centers(train, centers, alpha=0.05)
    result = bins.evaluate(samples)
    assert result.bin_counts_train.tolist() == [30, 70, 0]
    assert result.bin_counts_samples.tolist() == [50, 50, 0]
    n1 = n2 = 100
    p1, p2 = np.array([0.3, 0.7]), np.array([0.5, 0.5])
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p1 - p2) / se
    p_value = 2 * norm.sf(np.abs(z))
    np.testing.assert_allclose(result.z_scores[:2].numpy(), z, rtol=1e-12)
    np.testing.assert_allclose(result.p_values[:2].numpy(), p_value, rtol=1e-10)
    assert z[0] == pytest.approx(-2.886751, abs=1e-6)  # −0.2 / sqrt(0.24 · 0.02)
    # The empty bin has se = 0: no evidence, z = 0, p = 1, not different.
    assert result.z_scores[2].item() == 0.0 and result.p_values[2].item() == 1.0
    assert result.different.tolist() == [True, True, False]
    assert result.ndb == 2 and result.ndb_over_k == pytest.approx(2 / 3)
    # A stricter level at evaluation time: p ≈ 0.0039 is not < 0.001.
    assert bins.evaluate(samples, alpha=0.001).ndb == 0


def test_two_proportion_z_test_matches_scipy():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 0.2, 40)
    p2 = rng.uniform(0, 0.2, 40)
    n1, n2 = 1234, 567
    z, p = two_proportion_z_test(torch.tensor(p1), n1, torch.tensor(p2), n2)
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    ref_z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    np.testing.assert_allclose(z.numpy(), ref_z, rtol=1e-12)
    np.testing.assert_allclose(p.numpy(), 2 * norm.sf(np.abs(ref_z)), rtol=1e-9, atol=1e-300)
    z, p = two_proportion_z_test(torch.tensor([0.0, 1.0]), 10, torch.tensor([0.0, 1.0]), 20)
    assert z.tolist() == [0.0, 0.0] and p.tolist() == [1.0, 1.0]
    for bad, match in ((float("nan"), "p1 contains 1 non-finite"), (1.5, r"p1 must hold"),
                       (-0.2, r"p1 must hold")):  # (these read as "no difference" before)
        with pytest.raises(ValueError, match=match):
            two_proportion_z_test(torch.tensor([0.5, bad]), 10, torch.tensor([0.5, 0.3]), 10)
    with pytest.raises(ValueError, match="p2 must hold"):
        two_proportion_z_test(torch.tensor([0.5]), 10, torch.tensor([1.01]), 10)


def test_js_divergence_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(5):
        p = rng.dirichlet(np.ones(12))
        q = rng.dirichlet(np.ones(12))
        p[rng.integers(12)] = 0.0  # exercise 0 · log 0
        q[:2] = 0.0
        assert js_divergence(torch.tensor(p), torch.tensor(q)) == pytest.approx(
            jensenshannon(p, q) ** 2, rel=1e-10, abs=1e-14
        )
        assert js_divergence(p.tolist(), q.tolist(), base=2) == pytest.approx(
            jensenshannon(p, q, base=2) ** 2, rel=1e-10, abs=1e-14
        )
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2))
    assert js_divergence([0.2, 0.8], [0.2, 0.8]) == 0.0
    # Unnormalised weights are normalised, like scipy.
    assert js_divergence([2.0, 6.0], [1.0, 1.0]) == pytest.approx(
        jensenshannon([2.0, 6.0], [1.0, 1.0]) ** 2
    )


def test_ndb_assignment_matches_brute_force_and_ignores_batch_size():
    train, _ = gaussian_mixture_data(1_500, dim=6, seed=5)
    bins = NDB.fit(train, 15, seed=1, batch_size=64)
    other = NDB.from_centers(train, bins.centers, batch_size=7)
    x, _ = gaussian_mixture_data(700, dim=6, seed=6)
    brute = torch.cdist(x.double(), bins.centers.double()).argmin(dim=1)
    assert torch.equal(bins.assign(x), brute)
    assert torch.equal(other.assign(x), brute)
    assert torch.equal(bins.bin_counts_train, other.bin_counts_train)
    # Training proportions come from the nearest-centre rule applied to the training rows.
    ref = torch.bincount(torch.cdist(train.double(), bins.centers.double()).argmin(1),
                         minlength=15)
    assert torch.equal(bins.bin_counts_train, ref)


def test_ndb_whitening_is_invariant_to_feature_scales():
    train, _ = gaussian_mixture_data(2_000, dim=5, seed=7)
    query, _ = gaussian_mixture_data(1_000, dim=5, seed=8, exclude=2)
    # Powers of two scale exactly in floating point, so the whitened data are identical.
    scales = torch.tensor([1.0, 4.0, 0.25, 64.0, 2.0])
    a = ndb(train, query, 12, whiten=True, seed=3, kmeans_iter=20)
    b = ndb(train * scales, query * scales, 12, whiten=True, seed=3, kmeans_iter=20)
    assert torch.equal(a.z_scores, b.z_scores) and a.ndb == b.ndb
    bins = NDB.fit(train * scales, 12, whiten=True, seed=3, kmeans_iter=20)
    assert bins.mean is not None and bins.std is not None
    torch.testing.assert_close(bins.transform(train * scales).std(0, correction=0),
                               torch.ones(5), atol=1e-5, rtol=0)
    # Constant features are left unscaled instead of dividing by zero.
    flat = torch.cat([train, torch.full((2_000, 1), 3.0)], dim=1)
    bins = NDB.fit(flat, 5, whiten=True)
    assert bins.std[-1].item() == 1.0
    assert torch.isfinite(bins.centers).all()


def test_ndb_max_dims_uses_a_seeded_feature_subset():
    train, _ = gaussian_mixture_data(1_000, dim=20, seed=9)
    query, _ = gaussian_mixture_data(500, dim=20, seed=10)
    bins = NDB.fit(train, 10, max_dims=6, seed=4)
    assert bins.centers.shape == (10, 6)
    f = bins.features
    assert f.shape == (6,) and torch.equal(f, f.sort().values) and f.unique().numel() == 6
    assert torch.equal(NDB.fit(train, 10, max_dims=6, seed=4).features, f)
    assert torch.equal(bins.transform(query), query[:, f])
    # Binning on the subset equals binning the sliced data.
    sliced = NDB.from_centers(train[:, f], bins.centers)
    assert torch.equal(sliced.bin_counts_train, bins.bin_counts_train)
    assert torch.equal(sliced.evaluate(query[:, f]).z_scores, bins.evaluate(query).z_scores)
    # max_dims >= D keeps every feature.
    assert NDB.fit(train, 10, max_dims=20).features is None


def test_ndb_accepts_integer_pixels_and_other_dtypes():
    g = gen(11)
    train = torch.randint(0, 256, (600, 8), generator=g, dtype=torch.uint8)
    query = torch.randint(0, 256, (300, 8), generator=g, dtype=torch.uint8)
    a = ndb(train, query, 6)
    b = ndb(train.float(), query.double(), 6)
    assert a.centers.dtype == torch.float32
    assert torch.equal(a.z_scores, b.z_scores)


def test_ndb_refuses_samples_of_another_kind_than_the_training_data():
    """Bins fitted on uint8 pixels (0..255, as fit's docstring allows) and samples in
    [0, 1] (what a model samples, what the float rows hold) gave NDB = K for the same
    distribution; now the mix is refused, naming both scales, and each kind alone works."""
    g = gen(12)
    train = torch.randint(0, 256, (400, 6), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (200, 6), generator=g, dtype=torch.uint8)
    bins = NDB.fit(train, 5)
    match = r"samples are floating point .* bins were fitted on training data of integers"
    with pytest.raises(ValueError, match=match):
        bins.evaluate(test.float() / 255)
    with pytest.raises(ValueError, match=match):
        ndb(train, test.float() / 255, 5)
    with pytest.raises(ValueError, match=r"samples are integers .* training data of floating"):
        NDB.fit(train.float() / 255, 5).evaluate(test)
    same = bins.evaluate(test)  # integers against integers, floats against floats: as before
    scaled = NDB.fit(train.float() / 255, 5).evaluate(test.float() / 255)
    assert same.ndb == scaled.ndb == 0


def test_ndb_warns_of_bins_without_training_rows():
    """Two distinct rows and six bins: K-means' centres coincide and four bins stay empty,
    which can never differ; NDB says so instead of dividing by six silently."""
    train = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(3, 1)  # [6, 2]
    with pytest.warns(UserWarning, match="4 of the 6 NDB bins hold no training sample"):
        NDB.fit(train, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NDB.fit(train, 2)


def test_ndb_validation_errors():
    train = torch.randn(50, 3, generator=gen(0))
    samples = torch.randn(40, 3, generator=gen(1))
    with pytest.raises(ValueError, match=r"samples must have shape \[M, 3\]"):
        ndb(train, torch.randn(40, 4), 5)
    with pytest.raises(ValueError, match="exceeds the number of training samples"):
        ndb(train, samples, 51)
    bad = train.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train contains 1 non-finite"):
        ndb(bad, samples, 5)
    bad = samples.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="samples contains 1 non-finite"):
        ndb(train, bad, 5)
    for alpha in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            ndb(train, samples, 5, alpha=alpha)
    with pytest.raises(ValueError, match=r"train must have shape \[N, D\]"):
        ndb(torch.randn(50), samples, 5)
    with pytest.raises(ValueError, match=r"samples must have shape \[N, D\]"):
        ndb(train, torch.randn(0, 3), 5)
    with pytest.raises(TypeError, match="train must be a torch.Tensor"):
        ndb(train.numpy(), samples, 5)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        ndb(train, samples, 0)
    with pytest.raises(ValueError, match="max_dims must be >= 1"):
        ndb(train, samples, 5, max_dims=0)
    bins = NDB.fit(train, 5)
    with pytest.raises(ValueError, match=r"samples must have shape \[M, 3\]"):
        bins.evaluate(torch.randn(40, 2))
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        bins.evaluate(samples, alpha=2.0)
    with pytest.raises(ValueError, match=r"centers must have shape \[K, 3\]"):
        NDB.from_centers(train, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"centers must have shape \[K, 2\]"):
        NDB.from_centers(train, torch.zeros(4, 3), features=[0, 2])
    with pytest.raises(ValueError, match="p and q must have the same shape"):
        js_divergence([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="q must be finite, non-negative"):
        js_divergence([0.5, 0.5], [1.5, -0.5])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ndb_on_cuda_matches_cpu_assignment():
    train, _ = gaussian_mixture_data(5_000, seed=12)
    query, _ = gaussian_mixture_data(3_000, seed=13, exclude=1)
    bins = NDB.fit(train.cuda(), 20, seed=0)
    assert bins.centers.device.type == "cuda"
    result = bins.evaluate(query)  # CPU samples are moved to the bins' device
    cpu = NDB.from_centers(train, bins.centers.cpu()).evaluate(query)
    assert torch.equal(result.bin_counts_samples, cpu.bin_counts_samples)
    assert result.z_scores.device.type == "cpu"


def test_bins_do_not_move_with_a_common_shift_of_the_data():
    """Rows far from the origin (float32): the bin of each row is its nearest centre, as a
    float64 assignment to the returned centres says, and the counts are those of the
    unshifted data (the distances' expansion about the origin cancelled: at 1e4, 282 of 400
    training rows fell in one of 4 bins of ~100)."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0, 0, 0], [3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]])
    train = means[torch.randint(0, 4, (400,), generator=g)] + 0.5 * torch.randn(
        400, 4, generator=g)
    samples = means[torch.randint(0, 4, (400,), generator=g)] + 0.5 * torch.randn(
        400, 4, generator=g)
    found = []
    for offset in (0.0, 1e4):
        result = ndb(train + offset, samples + offset, n_bins=4, seed=0)
        centers = result.centers.double()
        for rows, counts in ((train + offset, result.bin_counts_train),
                             (samples + offset, result.bin_counts_samples)):
            nearest = torch.cdist(rows.double(), centers).argmin(1)
            assert counts.tolist() == torch.bincount(nearest, minlength=4).tolist()
        found.append((result.bin_counts_train.tolist(), result.bin_counts_samples.tolist()))
    assert found[1] == found[0]


def test_alpha_and_base_take_numpy_scalars_and_0d_tensors():
    """np.float32(0.05) and tensor(0.05) were refused as 'alpha must be in (0, 1)' (np.float64
    passed), and np.float32(2) as a base; a value of another type is a TypeError now."""
    train = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    samples = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    want = ndb(train, samples, 5, alpha=0.05)
    for alpha in (np.float32(0.05), torch.tensor(0.05, dtype=torch.float64)):
        got = ndb(train, samples, 5, alpha=alpha)
        assert got.ndb == want.ndb and torch.equal(got.different, want.different)
    with pytest.raises(TypeError, match="alpha must be a real number in \\(0, 1\\), got str"):
        ndb(train, samples, 5, alpha="0.05")
    p, q = [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]
    assert js_divergence(p, q, base=np.float32(2)) == pytest.approx(
        js_divergence(p, q) / math.log(2))
    with pytest.raises(ValueError, match="base must be a positive number other than 1"):
        js_divergence(p, q, base=np.float32(1))
