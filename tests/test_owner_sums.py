"""mfa.owner_sums: the scattered (GPU) form of the float64 pair sums equals the per-component
loop, and both equal the sums written out pair by pair in float64. Every test runs with the
CPU's compiled kernel (:mod:`mfa.pair_kernel`) and with its torch fallback."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, random_data, random_model

import mfa.owner_sums as owner_sums_module
from mfa import pair_kernel
from mfa.owner_sums import owner_sums, scattered_owner_sums


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def cpu_pair_sums(request, monkeypatch):
    """The CPU's pair sums from the compiled kernel (numba is a dependency: its absence
    fails here) or from torch ops (``MFA_NUMBA=0``)."""
    monkeypatch.setenv("MFA_NUMBA", "1" if request.param == "kernel" else "0")
    assert pair_kernel.available() == (request.param == "kernel")
    return request.param


def _case(n=300, seed=0):
    """Pairs of 300 rows: each row's owner, then a second component for a third of the rows
    (a row in two pairs, the pairs not in row order)."""
    model = random_model(4, 7, 2, "diagonal", seed=seed, offset=50.0).float()
    x = random_data(n, model, seed=seed + 1).float()
    terms = model.component_terms()
    g = torch.Generator().manual_seed(seed + 2)
    owner = torch.randint(0, 3, (n,), generator=g)  # component 3 owns no row
    rows = torch.arange(n)
    extra = torch.randperm(n, generator=g)[: n // 3]
    comp = torch.cat([owner, (owner[extra] + 1) % 3])
    rows = torch.cat([rows, extra])
    r = torch.rand(comp.shape[0], generator=g)
    p = torch.randn(2, comp.shape[0], generator=g)
    return x, terms, comp, rows, r, p


def _pair_by_pair(x, terms, comp, rows, r, p):
    """The seven sums straight from their definition, about the reference c, in float64."""
    k, n_lat, d = terms.whitened.shape
    xc = x.double()[rows] - terms.reference.double()  # [P, D]
    onehot = torch.nn.functional.one_hot(comp, k).double() * r.double().unsqueeze(-1)  # [P, K]
    p = p.double().T  # [P, L]
    return [onehot.sum(0), onehot.T @ xc, onehot.T @ (xc * xc),
            torch.einsum("nk,nd,nl->kdl", onehot, xc, p), onehot.T @ p,
            torch.einsum("nk,nl,nm->klm", onehot, p, p)]


@pytest.mark.parametrize("scatter_elements", [2**25, 50])
def test_scattered_owner_sums_equal_the_loop_and_the_definition(scatter_elements, monkeypatch):
    """Components 50 away from the reference (the cancellation the owner sums exist for),
    one component without rows, and chunks of 3 rows (scatter_elements=50) or one chunk."""
    monkeypatch.setattr(owner_sums_module, "SCATTER_ELEMENTS", scatter_elements)
    x, terms, comp, rows, r, p = _case()
    scattered = scattered_owner_sums(x, terms, comp, r, p, F64, rows)
    half = comp.shape[0] // 2  # two chunks' pairs
    looped = owner_sums(x, terms, [(comp[:half], rows[:half], r[:half], p[:, :half]),
                                   (comp[half:], rows[half:], r[half:], p[:, half:])], F64)
    reference = _pair_by_pair(x, terms, comp, rows, r, p)
    names = ["mass", "sum_x", "sum_x2", "sum_xp", "sum_p", "sum_pp"]
    for name, got, loop, ref in zip(names, scattered, looped, reference, strict=False):
        assert got.dtype == F64, name
        torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-9, msg=name)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8, msg=name)
    assert float(scattered[-1]) == 0.0
    assert float(scattered[0][3]) == 0.0 and float(scattered[1][3].abs().sum()) == 0.0


def test_sums_are_taken_about_each_components_own_mean():
    """Components 1e8 from the origin, a few units from each other and from the reference
    c, with a spread of 0.1: sums taken about each component's own mean keep each
    component's variance and covariance with ``p`` (what the M-step keeps after cancelling
    the mean) to float64's precision against a two-pass reference; products about a point
    1e8 from the rows (such as ``μ − c``) would carry squares of 1e16 and lose them."""
    model = random_model(4, 7, 2, "diagonal", seed=3, offset=1e8)
    terms = model.component_terms()
    g = torch.Generator().manual_seed(5)
    comp = torch.randint(0, 4, (600,), generator=g)  # each row in its own component's pair
    x = model.means.detach()[comp] + 0.1 * torch.randn(600, 7, generator=g, dtype=F64)
    rows = torch.arange(600)
    r = torch.rand(600, generator=g, dtype=F64) * 0.5 + 0.5
    p = torch.randn(2, 600, generator=g, dtype=F64)
    mass, sum_x, sum_x2, sum_xp, sum_p = owner_sums(x, terms, [(comp, rows, r, p)], F64)[:5]
    mean = sum_x / mass[:, None]  # about c
    var = sum_x2 / mass[:, None] - mean**2
    cov = sum_xp / mass[:, None, None] - mean[:, :, None] * (sum_p / mass[:, None])[:, None, :]
    for k in range(4):  # two passes: the weighted mean, then the spread about it
        w, rows_k, p_k = r[comp == k], x[comp == k], p[:, comp == k].T
        centre = (w[:, None] * rows_k).sum(0) / w.sum()
        y = rows_k - centre
        torch.testing.assert_close(var[k], (w[:, None] * y * y).sum(0) / w.sum(), rtol=1e-6,
                                   atol=0)
        p_mean = (w[:, None] * p_k).sum(0) / w.sum()
        torch.testing.assert_close(cov[k], (w[:, None, None] * y[:, :, None]
                                            * (p_k - p_mean)[:, None, :]).sum(0) / w.sum(),
                                   rtol=0, atol=1e-6 * 0.1)
        assert 0.005 < float(var[k].min()) and float(var[k].max()) < 0.02


def test_float32_products_are_summed_about_each_mean_and_moved_in_float64():
    """``work_dtype=float32`` (the "centred32" mode): the loop and the scattered form give
    float64 sums whose spread about each component's mean (what the M-step keeps once the
    mean cancels) matches the definition to float32's precision relative to that spread:
    the components lie 60 apart (±60 from the reference c) with a spread of 0.1, where
    float32 sums about c lose a fifth of a variance to cancellation."""
    g = torch.Generator().manual_seed(6)
    k, d, n = 4, 7, 600
    means = torch.zeros(k, d, dtype=F64)
    means[1], means[2] = 60.0, -60.0  # component 3 owns no row
    model = random_model(k, d, 2, "diagonal", seed=6).float()
    model.set_parameters(means=means.float())
    terms = model.component_terms()
    comp = torch.randint(0, 3, (n,), generator=g)
    x = (means[comp] + 0.1 * torch.randn(n, d, generator=g, dtype=F64)).float()
    rows = torch.arange(n)
    r = torch.rand(n, generator=g) * 0.5 + 0.5
    p = torch.randn(2, n, generator=g)
    reference = _pair_by_pair(x, terms, comp, rows, r, p)
    m = reference[0].clamp_min(1e-30)[:, None]
    owned = reference[0] > 0

    def spread(sums):
        return (sums[2] / m - (sums[1] / m) ** 2)[owned]

    xc = x[rows] - terms.reference  # float32 about c, for contrast
    onehot = torch.nn.functional.one_hot(comp, k).float() * r.unsqueeze(-1)
    about_c = [None, (onehot.T @ xc).double(), (onehot.T @ (xc * xc)).double()]
    lost = ((spread(about_c) - spread(reference)).abs() / spread(reference)).max().item()
    assert lost > 1e-3  # the case this test is about
    looped = owner_sums(x, terms, [(comp, rows, r, p)], F64, torch.float32)
    scattered = scattered_owner_sums(x, terms, comp, r, p, F64, rows, torch.float32)
    for got in (looped, scattered):
        assert all(t.dtype == F64 for t in got)
        torch.testing.assert_close(got[0], reference[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[4], reference[4], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(spread(got), spread(reference), rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["loop", "scattered"])
def test_float32_pairs_of_a_too_sharp_component_are_summed_in_float64(path, monkeypatch):
    """``"centred32"`` with one component too sharp for float32 pair sums (loadings of 0.3
    over noise variances of 1e-6: ε·|a|²/d ≈ 1e-2) and one that is not (noise 1e-2): the
    sharp one's sums are those of float64 pairs, the other's those of float32 pairs, on the
    CPU's loop and on the GPUs' scattered form alike."""
    if path == "scattered":  # the CPU takes the GPUs' form
        monkeypatch.setattr(owner_sums_module, "_looped_owner_sums", scattered_owner_sums)
    g = torch.Generator().manual_seed(3)
    k, d, lat, n = 2, 12, 2, 400
    noise = torch.stack([torch.full((d,), 1e-6), torch.full((d,), 1e-2)])
    from mfa import MixtureOfFactorAnalyzers

    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), 0.4 + 0.2 * torch.rand(k, d, generator=g),
        0.3 * torch.randn(k, d, lat, generator=g), noise, min_noise=0.0)
    terms = model.component_terms()
    assert owner_sums_module._too_sharp_for(torch.float32, terms).tolist() == [True, False]
    x = model.sample(n, generator=g)[0].detach()
    comp = torch.randint(0, k, (n,), generator=g)
    pairs = [(comp, torch.arange(n), torch.rand(n, generator=g), torch.randn(lat, n,
                                                                          generator=g))]
    mixed = owner_sums(x, terms, pairs, F64, torch.float32)
    exact = owner_sums(x, terms, pairs, F64)
    monkeypatch.setattr(owner_sums_module, "_too_sharp_for", lambda work, terms: None)
    plain32 = owner_sums(x, terms, pairs, F64, torch.float32)
    for got, want64, want32 in zip(mixed, exact, plain32, strict=True):
        if got.dim():
            torch.testing.assert_close(got[0], want64[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[1], want32[1], rtol=1e-12, atol=1e-12)
