"""K-means (mfa.kmeans) against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import gen
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from mfa.kmeans import kmeans, kmeans_plus_plus

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=1200, centers=5, n_features=4, cluster_std=0.6, random_state=0)
    return torch.from_numpy(x), y


def _brute_force_labels(x: torch.Tensor, centers: torch.Tensor):
    d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # [N, K], small problems only
    best, idx = d2.min(-1)
    return idx, best


# --------------------------------------------------------------------- K-means


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_lloyd_matches_sklearn_from_the_same_centres(blobs, seed):
    """With n_iter=0 the result holds the initial centres; Lloyd from there must agree with
    scikit-learn's Lloyd started from the same centres."""
    x, _ = blobs
    start = kmeans(x, 5, n_iter=0, init="random", seed=seed)
    assert start.n_iter == 0
    ours = kmeans(x, 5, n_iter=300, tol=0.0, init="random", seed=seed)
    sk = KMeans(
        5, init=start.centers.numpy(), n_init=1, max_iter=300, tol=0.0, algorithm="lloyd"
    ).fit(x.numpy())
    np.testing.assert_allclose(ours.centers.numpy(), sk.cluster_centers_, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ours.labels.numpy(), sk.labels_)
    assert ours.inertia == pytest.approx(sk.inertia_, rel=1e-10)


def test_kmeans_tol_stops_where_sklearn_does():
    """``tol`` is relative to the mean feature variance, as scikit-learn's: from the same
    starting centres, on overlapping blobs in D = 10 (slow to converge), Lloyd with
    ``tol=1e-3`` stops at scikit-learn's iteration, before full convergence, with its
    centres (a threshold D times larger stopped 1 to 10 iterations early)."""
    x, _ = make_blobs(n_samples=1200, centers=5, n_features=10, cluster_std=4.0,
                      random_state=0)
    x = torch.from_numpy(x)
    for seed in range(4):
        start = kmeans(x, 5, n_iter=0, init="random", seed=seed).centers
        ours = kmeans(x, 5, n_iter=300, tol=1e-3, init="random", seed=seed)
        sk = KMeans(5, init=start.numpy(), n_init=1, max_iter=300, tol=1e-3,
                    algorithm="lloyd").fit(x.numpy())
        assert ours.n_iter == sk.n_iter_, seed
        assert ours.n_iter < kmeans(x, 5, n_iter=300, tol=0.0, init="random", seed=seed).n_iter
        np.testing.assert_allclose(ours.centers.numpy(), sk.cluster_centers_, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_plus_plus_inertia_close_to_sklearn_best(blobs, seed):
    x, y = blobs
    ours = kmeans(x, 5, seed=seed)
    sk = KMeans(5, n_init=10, random_state=0).fit(x.numpy())
    assert ours.inertia <= 1.01 * sk.inertia_
    assert adjusted_rand_score(y, ours.labels.numpy()) > 0.99


def test_kmeans_result_is_consistent(blobs):
    """Labels are the nearest centres, inertia is their summed squared distance, centres are
    the means of their clusters, and the output types are as documented."""
    x, _ = blobs
    res = kmeans(x, 5, seed=7, n_iter=300, tol=0.0)
    assert res.centers.shape == (5, 4) and res.centers.dtype == F64
    assert res.labels.shape == (1200,) and res.labels.dtype == torch.int64
    assert isinstance(res.inertia, float) and isinstance(res.n_iter, int)
    assert 1 <= res.n_iter < 300  # converged
    idx, best = _brute_force_labels(x, res.centers)
    torch.testing.assert_close(res.labels, idx, rtol=0, atol=0)
    assert res.inertia == pytest.approx(float(best.sum()), rel=1e-10)
    for k in range(5):
        torch.testing.assert_close(res.centers[k], x[res.labels == k].mean(0))


def test_kmeans_labels_nearest_with_chunking():
    """Many rows (several distance chunks would be needed at a small chunk size) still give
    the exact nearest-centre labels."""
    from mfa.kmeans import nearest_center

    x = torch.randn(500, 3, generator=gen(0), dtype=F64)
    centers = torch.randn(7, 3, generator=gen(1), dtype=F64)
    labels, d2 = nearest_center(x, centers, chunk_elements=50)
    idx, best = _brute_force_labels(x, centers)
    torch.testing.assert_close(labels, idx, rtol=0, atol=0)
    torch.testing.assert_close(d2, best, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
def test_nearest_center_by_rows_matches_brute_force(batch_size):
    """The row-batched form (the one NDB uses) gives the same labels and distances whatever
    the batch size, including empty input."""
    from mfa.kmeans import nearest_center, squared_distances

    x = torch.randn(300, 5, generator=gen(2), dtype=F64)
    centers = torch.randn(9, 5, generator=gen(3), dtype=F64)
    labels, d2 = nearest_center(x, centers, batch_size=batch_size)
    idx, best = _brute_force_labels(x, centers)
    torch.testing.assert_close(labels, idx, rtol=0, atol=0)
    torch.testing.assert_close(d2, best, rtol=1e-10, atol=1e-12)
    dense = ((x.unsqueeze(1) - centers) ** 2).sum(-1)  # [N, K], the slow reference
    torch.testing.assert_close(squared_distances(x, centers), dense, rtol=1e-10, atol=1e-12)
    labels, d2 = nearest_center(x[:0], centers, batch_size=batch_size)
    assert labels.shape == (0,) and labels.dtype == torch.int64 and d2.shape == (0,)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_seeded_determinism(blobs, init):
    x, _ = blobs
    a = kmeans(x, 4, seed=11, init=init)
    b = kmeans(x, 4, seed=11, init=init)
    c = kmeans(x, 4, generator=gen(11), init=init)
    torch.testing.assert_close(a.centers, b.centers, rtol=0, atol=0)
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    torch.testing.assert_close(a.centers, c.centers, rtol=0, atol=0)  # seed s == generator(s)
    starts = {tuple(kmeans(x, 4, seed=s, init=init, n_iter=0).centers.flatten().tolist())
              for s in range(6)}
    assert len(starts) > 1  # different seeds draw different starting centres


def test_kmeans_generator_wins_over_seed(blobs):
    x, _ = blobs
    a = kmeans(x, 4, seed=0, generator=gen(5), n_iter=0)
    b = kmeans(x, 4, seed=5, n_iter=0)
    torch.testing.assert_close(a.centers, b.centers, rtol=0, atol=0)


def test_kmeans_duplicated_points_fewer_distinct_than_clusters():
    """K larger than the number of distinct rows: no NaN, labels in range, every centre is
    one of the distinct rows."""
    distinct = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=F64)
    x = distinct.repeat(20, 1)
    res = kmeans(x, 5, seed=0)
    assert bool(torch.isfinite(res.centers).all())
    assert int(res.labels.min()) >= 0 and int(res.labels.max()) < 5
    d = torch.cdist(res.centers, distinct).min(-1).values
    assert float(d.max()) < 1e-12
    assert res.inertia == pytest.approx(0.0, abs=1e-12)
    # Every distinct point has a centre on it.
    assert float(torch.cdist(distinct, res.centers).min(-1).values.max()) < 1e-12


def test_kmeans_reseeds_an_empty_cluster():
    """Clumps of identical rows at 5, 6 and 15 with K = 3. A random start holding two copies
    of one clump leaves a cluster empty after the first assignment; re-seeding it at the
    farthest row must still reach the perfect clustering (inertia 0, no empty cluster).
    Without the re-seeding these starts end at inertia 5."""
    x = torch.tensor([[5.0], [6.0], [15.0]], dtype=F64).repeat_interleave(10, 0)
    duplicated_starts = 0
    for seed in range(30):
        start = kmeans(x, 3, n_iter=0, init="random", seed=seed).centers
        if torch.unique(start).numel() == 3:
            continue
        duplicated_starts += 1
        res = kmeans(x, 3, n_iter=20, init="random", seed=seed)
        assert bool(torch.isfinite(res.centers).all())
        assert res.inertia == pytest.approx(0.0, abs=1e-12), seed
        assert sorted(torch.bincount(res.labels, minlength=3).tolist()) == [10, 10, 10]
    assert duplicated_starts >= 3  # the scenario was exercised


def test_kmeans_reseeds_an_empty_cluster_at_the_farthest_row():
    """Four clumps of identical rows at the corners of an 8 x 3 rectangle, K = 4: a random
    start holding two copies of one clump leaves a cluster empty; re-seeded at the farthest
    row (one of the clump no starting centre sits on) every such start reaches the perfect
    clustering. Re-seeded at the nearest row (one on a centre already) the cluster
    stayed empty in 23 of these 26 starts (inertia 45: two clumps 3 apart share a centre)."""
    corners = torch.tensor([[0.0, 0.0], [0.0, 3.0], [8.0, 0.0], [8.0, 3.0]], dtype=F64)
    x = corners.repeat_interleave(10, 0)
    duplicated_starts = 0
    for seed in range(30):
        start = kmeans(x, 4, n_iter=0, init="random", seed=seed).centers
        if torch.unique(start, dim=0).shape[0] == 4:
            continue
        duplicated_starts += 1
        res = kmeans(x, 4, n_iter=50, init="random", seed=seed)
        assert res.inertia == pytest.approx(0.0, abs=1e-12), seed
        assert torch.bincount(res.labels, minlength=4).tolist() == [10] * 4, seed
    assert duplicated_starts >= 10  # the scenario was exercised


def test_kmeans_single_row():
    res = kmeans(torch.tensor([[1.0, 2.0]], dtype=F64), 1)
    torch.testing.assert_close(res.centers, torch.tensor([[1.0, 2.0]], dtype=F64))
    assert res.labels.tolist() == [0] and res.inertia == 0.0


def test_kmeans_errors():
    x = torch.randn(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="at least n_clusters"):
        kmeans(x, 6)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(bad, 2)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init="kmeans||")
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        kmeans(torch.randn(5, dtype=F64), 2)
    with pytest.raises(TypeError, match="floating point"):
        kmeans(torch.ones(5, 2, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kmeans(np.zeros((5, 2)), 2)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match=r"D >= 1, got \(5, 0\)"):  # was a ZeroDivisionError
        kmeans(torch.zeros(5, 0, dtype=F64), 2)


def test_kmeans_float32_offset_data_keeps_clusters():
    """The scikit-learn#30382 cancellation case for K-means: three clusters 1 apart with
    spread 0.05, offset by 1e4, in float32. Centring (e.g. on the data mean) fixes it."""
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    lab = torch.arange(600) % 3
    x = centres[lab] + 0.05 * torch.randn(600, 2, generator=gen(0), dtype=F64)
    res = kmeans((x + 1e4).float(), 3, seed=0)
    assert adjusted_rand_score(lab.numpy(), res.labels.numpy()) == pytest.approx(1.0)



def test_kmeans_plus_plus_seeds_float32_rows_far_from_the_origin():
    """Four blobs of spread 1, 10 apart, 3·10⁴ from the origin: the distances expanded
    about the origin lost the spread in float32 and the seeds covered all four blobs in 5 of
    20 draws; taken about the rows' mean, in every draw."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=F64)
    lab = torch.arange(400) % 4
    x = centres[lab] + torch.randn(400, 2, generator=gen(0), dtype=F64)
    far = (x + 3e4).float()
    for seed in range(20):
        picked = kmeans_plus_plus(far, 4, gen(seed)).double() - 3e4
        assert len(set(torch.cdist(picked, centres).argmin(-1).tolist())) == 4, seed

def test_kmeans_plus_plus_picks_distinct_rows():
    x = torch.randn(200, 3, generator=gen(0), dtype=F64)
    for seed in range(5):
        centers = kmeans_plus_plus(x, 10, gen(seed))
        assert centers.shape == (10, 3)
        # Every centre is a row of x ...
        assert bool((centers[:, None, :] == x[None, :, :]).all(-1).any(-1).all())
        # ... and no row is chosen twice.
        assert torch.unique(centers, dim=0).shape[0] == 10
    # With duplicates, distinct locations are preferred while they last.
    dup = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64).repeat(10, 1)
    picked = kmeans_plus_plus(dup, 3, gen(1))
    assert sorted(picked.flatten().tolist()) == [0.0, 1.0, 2.0]


def test_kmeans_plus_plus_spreads_over_separated_blobs(blobs):
    x, y = blobs
    for seed in range(5):
        centers = kmeans_plus_plus(x, 5, gen(seed))
        idx = torch.cdist(centers, x).argmin(-1)
        assert len(set(y[idx.numpy()].tolist())) == 5  # one seed per blob


def test_kmeans_plus_plus_seeds_float32_rows_whose_distances_sum_past_its_range():
    """Four blobs (spread 1, 10 apart) scaled by 2·10¹⁷ in float32: every squared norm fits
    (the check passes) but their sum overflowed to inf, and torch.multinomial refused the
    NaN odds ("invalid multinomial distribution"). Now the seeds cover all four blobs."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=F64)
    lab = torch.arange(400) % 4
    x = centres[lab] + torch.randn(400, 2, generator=gen(0), dtype=F64)
    big = (x * 2e17).float()
    assert torch.isinf(((big - big.mean(0)) ** 2).sum())
    for seed in range(5):
        picked = kmeans_plus_plus(big, 4, gen(seed)).double() / 2e17
        assert len(set(torch.cdist(picked, centres).argmin(-1).tolist())) == 4, seed
    result = kmeans(big, 4, seed=0)
    assert len(set(torch.cdist(result.centers.double() / 2e17, centres).argmin(-1).tolist())) == 4


def test_kmeans_plus_plus_refuses_rows_whose_squares_overflow():
    # (torch.multinomial failed on the NaN probabilities: "invalid multinomial distribution")
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 1e19
    with pytest.raises(ValueError, match="input values too large for torch.float32"):
        kmeans_plus_plus(x, 3, torch.Generator().manual_seed(0))
    # init="random" skipped the check and returned NaN inertia and meaningless labels
    with pytest.raises(ValueError, match="input values too large for torch.float32"):
        kmeans(x, 3, init="random", seed=0)


def test_kmeans_plus_plus_checks_its_arguments():
    """It failed with errors naming nothing (OverflowError for K=0, a multinomial error for
    n_trials=0) and returned repeated rows for K above the rows; kmeans already checked."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="n_clusters must be >= 1, got 0"):
        kmeans_plus_plus(x, 0, gen)
    with pytest.raises(TypeError, match="n_clusters must be an int, got float"):
        kmeans_plus_plus(x, 2.5, gen)
    with pytest.raises(ValueError, match="n_trials must be >= 1, got 0"):
        kmeans_plus_plus(x, 2, gen, n_trials=0)
    with pytest.raises(ValueError, match="needs at least n_clusters=8 rows, got 5"):
        kmeans_plus_plus(x, 8, gen)
    assert kmeans_plus_plus(x, 5, gen).unique(dim=0).shape == (5, 3)


def test_random_choices_need_a_generator_and_bad_settings_are_named():
    """None as the generator drew from torch's global generator (another seeding each call);
    a NaN or negative tol ran every iteration; seed=1.9 ran as seed 1."""
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got NoneType"):
        kmeans_plus_plus(x, 3, None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        kmeans(x, 3, generator=7)
    for tol in (float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="tol must be a number >= 0"):
            kmeans(x, 3, tol=tol)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        kmeans(x, 3, seed=1.9)


def test_kmeans_takes_a_negative_seed_and_a_tensor_tol():
    """The checks added for seed=1.9 and tol=NaN refused what torch takes (a negative seed)
    and a 0-d tensor tol, which ran before."""
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 3, seed=-1)
    assert torch.equal(a.labels, kmeans(x, 3, seed=-1).labels)
    b = kmeans(x, 3, tol=torch.tensor(1e-4))
    assert torch.equal(b.labels, kmeans(x, 3, tol=1e-4).labels)


def test_seed_rows_and_seeds_out_of_range_are_named():
    """seed_rows of 0, -5 or 1.5 silently acted as None ('100' failed comparing an int with a
    str), and seed=2**64 failed inside torch with "Overflow when unpacking long long"."""
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    for bad in (0, -5, 2):
        with pytest.raises(ValueError, match=rf"seed_rows must be None or >= n_clusters=3 .*{bad}"):
            kmeans(x, 3, seed_rows=bad)
    for bad in (1.5, "100", True):
        with pytest.raises(TypeError, match="seed_rows must be an int or None"):
            kmeans(x, 3, seed_rows=bad)
    for bad in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\)"):
            kmeans(x, 3, seed=bad)
    # seed_rows from K to N - 1 subsamples the seeding's rows; from N on it seeds on all rows
    assert torch.equal(kmeans(x, 3, seed_rows=np.int64(60)).labels, kmeans(x, 3).labels)
    assert kmeans(x, 3, seed_rows=3).labels.shape == (60,)
