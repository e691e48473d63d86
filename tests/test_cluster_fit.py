"""The batched per-cluster fit (mfa.cluster_fit) behind mfa.init.fit_complete: clusters
fitted together in zero-padded groups give what each cluster's rows give alone, and what
scikit-learn's PCA gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import gen
from sklearn.decomposition import PCA

from mfa import cluster_fit
from mfa.init import EXACT_SVD_LIMIT, fit_complete

F64 = torch.float64
SIZES = [400, 250, 180, 130]  # every cluster above EXACT_SVD_LIMIT: the randomised SVD
D, LAT = 100, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(scales=(1.0, 1.0, 1.0, 1.0)):
    """Clusters of SIZES rows (each a rank-3 signal with a clear spectral gap over noise,
    times its scale), stored shuffled; returns ``(x [N, D], labels [N])``."""
    g = gen(3)
    xs, labels = [], []
    for k, (n, scale) in enumerate(zip(SIZES, scales, strict=True)):
        spread = torch.tensor([6.0, 4.0, 3.0], dtype=F64)
        basis = torch.randn(D, LAT, generator=g, dtype=F64) * spread
        noise = 0.3 + 0.4 * torch.rand(D, generator=g, dtype=F64)
        rows = (torch.randn(n, LAT, generator=g, dtype=F64) @ basis.T
                + noise * torch.randn(n, D, generator=g, dtype=F64)
                + 5 * torch.randn(D, generator=g, dtype=F64))
        xs.append(rows * scale)
        labels += [k] * n
    perm = torch.randperm(sum(SIZES), generator=g)
    return torch.cat(xs)[perm], torch.tensor(labels)[perm]


def _budgets():
    """Budgets giving one cluster a group, pairs (padded), and all four in one group."""
    return {"alone": 1, "pairs": 2 * SIZES[0] * D, "one group": len(SIZES) * SIZES[0] * D}


def test_group_clusters_packs_similar_sizes_within_the_budget():
    sizes = [50, 400, 10, 390, 200, 700]
    groups = cluster_fit.group_clusters(sizes, 10, budget=8000)
    assert sorted(c for group in groups for c in group) == list(range(len(sizes)))
    assert groups == [[5], [1, 3], [4, 0, 2]]  # largest first; 700·10·2 > 8000
    for group in groups:
        assert len(group) == 1 or len(group) * max(sizes[c] for c in group) * 10 <= 8000
    assert cluster_fit.group_clusters(sizes, 10, budget=1) == [[5], [1], [3], [4], [0], [2]]


def test_padded_rows_are_each_clusters_rows_then_zeros():
    x = torch.arange(12.0).view(6, 2)
    order = torch.tensor([4, 0, 5, 1, 2, 3])  # clusters: rows {4, 0}, {5, 1, 2}, {3}
    rows, real = cluster_fit.padded_rows(x, order, [0, 2, 5], [2, 3, 1], [1, 0, 2])
    torch.testing.assert_close(rows, torch.stack([
        x[[5, 1, 2]], torch.cat([x[[4, 0]], torch.zeros(1, 2)]),
        torch.cat([x[[3]], torch.zeros(2, 2)])]))
    assert real.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    rows, real = cluster_fit.padded_rows(x, order, [0, 2, 5], [2, 3, 1], [0])
    assert real is None and torch.equal(rows, x[[4, 0]].unsqueeze(0))


@pytest.mark.parametrize("budget", ["pairs", "one group"])
def test_grouped_isotropic_fit_is_ppca_per_cluster(monkeypatch, budget):
    """Clusters fitted in padded groups: σ² and A Aᵀ of each equal scikit-learn's exact PCA
    of its rows alone (rescaled to the ML n), to the randomised SVD's 1e-6."""
    x, labels = _clusters()
    assert min(min(SIZES), D) > max(EXACT_SVD_LIMIT, 2 * (LAT + 10))
    monkeypatch.setitem(cluster_fit.GROUP_ELEMENTS, "cpu", _budgets()[budget])
    model = fit_complete(x, labels, len(SIZES), LAT, "isotropic")
    for k, n in enumerate(SIZES):
        rows = x[labels == k].numpy()
        pca = PCA(LAT).fit(rows)
        sigma2 = pca.noise_variance_ * (n - 1) / n
        aat = pca.components_.T @ np.diag(pca.explained_variance_ * (n - 1) / n - sigma2) @ (
            pca.components_)
        a = model.factor_loadings[k].detach().numpy()
        np.testing.assert_allclose(model.noise_variance[k, 0].item(), sigma2, rtol=1e-6)
        np.testing.assert_allclose(a @ a.T, aat, rtol=0, atol=1e-6 * np.abs(aat).max())


@pytest.mark.parametrize("budget", ["alone", "pairs", "one group"])
def test_grouped_factor_analysis_equals_each_cluster_alone(monkeypatch, budget):
    """Diagonal noise, five factor-analysis iterations: every cluster of a padded group gets
    the loadings' A Aᵀ and the noise its own rows give fitted alone (no padding row leaks into
    a cluster's sums), at scales 1e-30 to 1e30 within one group (each cluster's range finder
    scaled on its own)."""
    scales = (1e-30, 1.0, 1e30, 3.0)
    x, labels = _clusters(scales)
    monkeypatch.setitem(cluster_fit.GROUP_ELEMENTS, "cpu", _budgets()[budget])
    model = fit_complete(x, labels, len(SIZES), LAT, "diagonal", n_iter=5, variance_floor=0.0)
    for k, scale in enumerate(scales):
        rows = x[labels == k]
        alone = fit_complete(rows, torch.zeros(rows.shape[0], dtype=torch.int64), 1, LAT,
                             "diagonal", n_iter=5, variance_floor=0.0)
        a, b = model.factor_loadings[k].detach(), alone.factor_loadings[0].detach()
        torch.testing.assert_close(model.means[k], alone.means[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(a @ a.T / scale**2, b @ b.T / scale**2, rtol=0,
                                   atol=1e-6 * float((b @ b.T).abs().max()) / scale**2)
        torch.testing.assert_close(model.noise_variance[k] / scale**2,
                                   alone.noise_variance[0] / scale**2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_a_flat_cluster_in_a_group_gets_the_pooled_variance(monkeypatch, noise):
    """A cluster of 300 identical rows (large enough for the randomised SVD) grouped with
    the four fitted ones: it gets the pooled per-feature variance and no loadings, and the
    others in its group what their rows give alone (the group is filtered before the fit)."""
    x, labels = _clusters()
    flat = torch.full((300, D), 0.5, dtype=F64)
    x, labels = torch.cat([x, flat]), torch.cat([labels, torch.full((300,), len(SIZES))])
    monkeypatch.setitem(cluster_fit.GROUP_ELEMENTS, "cpu", 10**9)  # one group of five
    assert len(cluster_fit.group_clusters([*SIZES, 300], D, 10**9)) == 1
    k = len(SIZES) + 1
    model = fit_complete(x, labels, k, LAT, noise, n_iter=5, variance_floor=1e-6)
    pooled = x.var(0, unbiased=False)
    if noise == "isotropic":
        pooled = pooled.mean().expand(D)
    torch.testing.assert_close(model.noise_variance[-1].detach(), pooled)
    assert not bool(model.factor_loadings[-1].any())
    for c in range(len(SIZES)):
        rows = x[labels == c]
        alone = fit_complete(rows, torch.zeros(rows.shape[0], dtype=torch.int64), 1, LAT,
                             noise, n_iter=5, variance_floor=1e-6)
        a, b = model.factor_loadings[c].detach(), alone.factor_loadings[0].detach()
        scale = float((b @ b.T).abs().max())
        torch.testing.assert_close(a @ a.T, b @ b.T, rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(model.noise_variance[c].detach(),
                                   alone.noise_variance[0].detach(), rtol=1e-6, atol=0)
