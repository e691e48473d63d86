"""Sufficient statistics (mfa.statistics) and the M-step (mfa.m_step).

References are written out densely and independently of the library: responsibilities and
log-likelihoods from full covariances (``helpers.DenseMixture``), latent posterior means from
``M⁻¹AᵀΨ⁻¹(x−μ)`` with ``torch.linalg.solve`` per component, and the M-step from the textbook
Ghahramani & Hinton (1996) update on uncentred data.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import DenseMixture, gen, random_data, random_model

from mfa import MixtureOfFactorAnalyzers, linalg
from mfa._data_stream import DataSource
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.m_step import m_step
from mfa.statistics import SufficientStatistics, accumulate_statistics

F64 = torch.float64
STAT_FIELDS = ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz", "log_likelihood", "n_rows")


pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(model, x, resp=None, batch_size=None, stats_dtype=F64) -> SufficientStatistics:
    """Statistics of ``x`` streamed in batches of ``batch_size`` rows."""
    with torch.no_grad():
        terms = model.component_terms()
        size = batch_size or x.shape[0]
        total = None
        for i in range(0, x.shape[0], size):
            part = accumulate_statistics(
                model,
                x[i : i + size],
                terms,
                resp=None if resp is None else resp[i : i + size],
                stats_dtype=stats_dtype,
            )
            total = part if total is None else total + part
    return total


def _random_resp(n: int, k: int, seed: int) -> torch.Tensor:
    r = torch.rand(n, k, generator=gen(seed), dtype=F64) + 0.05
    return r / r.sum(-1, keepdim=True)


def _dense_posterior_means(model, x) -> torch.Tensor:
    """``E[z | x, k] = (I + AᵀΨ⁻¹A)⁻¹ AᵀΨ⁻¹ (x − μ)`` for every row and component, ``[N, K, L]``,
    one dense solve per component."""
    a = model.factor_loadings.detach()
    psi = model.noise_variance.detach()
    mu = model.means.detach()
    k, _, lat = a.shape
    out = torch.zeros(x.shape[0], k, lat, dtype=F64)
    for j in range(k):
        at_psi_inv = a[j].T / psi[j]  # [L, D]
        m = torch.eye(lat, dtype=F64) + at_psi_inv @ a[j]
        rhs = at_psi_inv @ (x - mu[j]).T  # [L, N]
        out[:, j] = torch.linalg.solve(m, rhs).T
    return out


def _assert_stats_close(a: SufficientStatistics, b: SufficientStatistics, rtol: float) -> None:
    for name in STAT_FIELDS:
        va, vb = getattr(a, name), getattr(b, name)
        assert va.shape == vb.shape, name
        scale = max(1.0, float(vb.abs().max())) if vb.numel() else 1.0
        torch.testing.assert_close(va, vb, rtol=rtol, atol=rtol * scale, msg=name)
    torch.testing.assert_close(a.reference, b.reference, rtol=0, atol=0)


# --------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "k, d, lat, noise",
    [(3, 5, 2, "diagonal"), (2, 4, 0, "diagonal"), (3, 5, 2, "isotropic"), (1, 3, 3, "diagonal")],
)
@pytest.mark.parametrize("given_resp", [False, True])
def test_batched_sums_equal_one_full_batch(k, d, lat, noise, given_resp):
    model = random_model(k, d, lat, noise, seed=3)
    n = 253  # not divisible by any batch size below
    x = random_data(n, model, seed=4)
    resp = _random_resp(n, k, seed=5) if given_resp else None
    full = _stats(model, x, resp)
    assert int(full.n_rows) == n
    for size in (1, 7, 100, n):
        _assert_stats_close(_stats(model, x, resp, batch_size=size), full, rtol=1e-10)


def test_add_keeps_reference_and_sums_fields():
    model = random_model(2, 3, 1, seed=0)
    x = random_data(20, model, seed=1)
    a, b = _stats(model, x[:8]), _stats(model, x[8:])
    total = a + b
    torch.testing.assert_close(total.reference, a.reference)
    torch.testing.assert_close(total.mass, a.mass + b.mass)
    assert int(total.n_rows) == 20


# --------------------------------------------------------------------- against dense sums


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("lat", [0, 2])
def test_given_resp_sums_equal_hand_computed(noise, lat):
    k, d, n = 3, 5, 97
    model = random_model(k, d, lat, noise, seed=11)
    x = random_data(n, model, seed=12)
    r = _random_resp(n, k, seed=13)
    stats = _stats(model, x, r)

    # The documented reference point: per feature, the means weighted by w_k / d_kj.
    precision = model.weights.detach().unsqueeze(-1) / model.noise_variance.detach()
    c = (precision * model.means.detach()).sum(0) / precision.sum(0)
    torch.testing.assert_close(stats.reference, c, rtol=1e-12, atol=1e-12)
    xc = x - c
    torch.testing.assert_close(stats.mass, r.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sum_x, r.T @ xc, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.sum_x2, r.T @ xc**2, rtol=1e-12, atol=1e-10)
    assert int(stats.n_rows) == n
    dense = DenseMixture.from_model(model)
    torch.testing.assert_close(
        stats.log_likelihood, dense.log_prob(x).sum(), rtol=1e-11, atol=1e-9
    )

    if lat == 0:
        assert stats.sum_xz.shape == (k, d, 0)
        assert stats.sum_z.shape == (k, 0)
        assert stats.sum_zz.shape == (k, 0, 0)
        return
    ez = _dense_posterior_means(model, x)  # [N, K, L]
    for j in range(k):
        rj = r[:, j : j + 1]
        torch.testing.assert_close(stats.sum_z[j], (rj * ez[:, j]).sum(0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            stats.sum_xz[j], (rj * xc).T @ ez[:, j], rtol=1e-10, atol=1e-9
        )
        torch.testing.assert_close(
            stats.sum_zz[j], (rj * ez[:, j]).T @ ez[:, j], rtol=1e-10, atol=1e-9
        )


@pytest.mark.parametrize("lat", [0, 2])
def test_posterior_resp_matches_dense_posterior(lat):
    k, d, n = 3, 4, 120
    model = random_model(k, d, lat, seed=21)
    x = random_data(n, model, seed=22, scale=1.0)
    stats = _stats(model, x)
    dense_lp = DenseMixture.from_model(model).component_log_prob(x)  # [N, K]
    post = torch.softmax(dense_lp, dim=-1)
    torch.testing.assert_close(stats.mass, post.sum(0), rtol=1e-10, atol=1e-10)
    c = stats.reference
    torch.testing.assert_close(stats.sum_x, post.T @ (x - c), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(
        stats.log_likelihood, torch.logsumexp(dense_lp, -1).sum(), rtol=1e-11, atol=1e-9
    )
    # Explicitly passing the posterior as resp gives the same statistics.
    _assert_stats_close(_stats(model, x, post), stats, rtol=1e-10)


def test_stats_dtype_float32_and_float64():
    model = random_model(2, 3, 1, seed=0)
    x = random_data(50, model, seed=1)
    s32 = _stats(model, x, stats_dtype=torch.float32)
    s64 = _stats(model, x)
    for name in STAT_FIELDS:
        assert getattr(s32, name).dtype == torch.float32
        assert getattr(s64, name).dtype == F64
    torch.testing.assert_close(s32.sum_x2, s64.sum_x2.float(), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------- M-step


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and weighted biased covariance (numpy's aweights, bias=True)."""
    mean = np.average(x, axis=0, weights=w)
    cov = np.cov(x.T, aweights=w, bias=True)
    return mean, np.atleast_2d(cov)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_m_step_single_gaussian_is_weighted_mle(noise):
    """n_factors=0: the M-step is the weighted mean and the diagonal of the weighted covariance
    (averaged over features when isotropic); weights are the responsibility masses over N."""
    rng = np.random.default_rng(0)
    n, d = 400, 4
    x_np = rng.normal(size=(n, d)) * np.array([0.5, 1.0, 2.0, 3.0]) + np.array([1.0, -2, 5, 0])
    r1 = rng.uniform(0.05, 0.95, size=n)
    resp = torch.from_numpy(np.stack([r1, 1 - r1], axis=1))
    x = torch.from_numpy(x_np)
    model = random_model(2, d, 0, noise, seed=1)
    params = m_step(_stats(model, x, resp), model, variance_floor=1e-12)
    for j, w in enumerate((r1, 1 - r1)):
        mean, cov = _weighted_moments(x_np, w)
        np.testing.assert_allclose(params["means"][j].numpy(), mean, rtol=1e-12, atol=1e-12)
        var = np.diag(cov)
        expected = var if noise == "diagonal" else np.full(d, var.mean())
        np.testing.assert_allclose(
            params["noise_variance"][j].numpy(), expected, rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(float(params["weights"][j]), w.sum() / n, rtol=1e-12)
    assert params["factor_loadings"].shape == (2, d, 0)


def test_m_step_single_component_all_ones():
    rng = np.random.default_rng(1)
    x_np = rng.normal(size=(300, 3)) @ np.array([[1.0, 0.3, 0], [0, 1, 0.5], [0, 0, 2]])
    x = torch.from_numpy(x_np)
    model = random_model(1, 3, 0, seed=2)
    params = m_step(_stats(model, x, torch.ones(300, 1, dtype=F64)), model, variance_floor=1e-12)
    np.testing.assert_allclose(params["means"][0].numpy(), x_np.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        params["noise_variance"][0].numpy(), x_np.var(0), rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(params["weights"], torch.ones(1, dtype=F64))


def _dense_gh_m_step(model, x, r):
    """Ghahramani & Hinton's MFA M-step on *uncentred* data, component by component:
    Ã = [A, μ] = (Σ r x E[z̃]ᵀ)(Σ r E[z̃z̃ᵀ])⁻¹, Ψ = diag(Σ r x xᵀ − Ã Σ r E[z̃] xᵀ) / Σ r."""
    a = model.factor_loadings.detach()
    psi = model.noise_variance.detach()
    k, d, lat = a.shape
    ez = _dense_posterior_means(model, x)
    out = {"means": [], "factor_loadings": [], "noise_variance": [], "weights": []}
    for j in range(k):
        rj = r[:, j]
        cov_z = torch.linalg.inv(torch.eye(lat, dtype=F64) + (a[j].T / psi[j]) @ a[j])
        ez_aug = torch.cat([ez[:, j], torch.ones(x.shape[0], 1, dtype=F64)], dim=1)  # [N, L+1]
        ezz = torch.zeros(lat + 1, lat + 1, dtype=F64)
        for i in range(x.shape[0]):
            outer = torch.outer(ez_aug[i], ez_aug[i])
            outer[:lat, :lat] += cov_z
            ezz += rj[i] * outer
        sxz = (rj[:, None] * x).T @ ez_aug  # [D, L+1]
        a_aug = torch.linalg.solve(ezz, sxz.T).T  # sxz @ ezz⁻¹ (ezz symmetric)
        sxx = ((rj[:, None] * x) * x).sum(0)  # diag of Σ r x xᵀ
        diag = (sxx - (a_aug * sxz).sum(1)) / rj.sum()
        out["factor_loadings"].append(a_aug[:, :lat])
        out["means"].append(a_aug[:, lat])
        out["noise_variance"].append(
            diag if model.noise == "diagonal" else diag.mean().expand(d)
        )
        out["weights"].append(rj.sum() / x.shape[0])
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("use_posterior", [False, True])
def test_m_step_with_factors_matches_dense_textbook_update(noise, use_posterior):
    k, d, lat, n = 2, 4, 2, 60
    model = random_model(k, d, lat, noise, seed=7, offset=3.0)
    x = random_data(n, model, seed=8)
    if use_posterior:
        r = torch.softmax(DenseMixture.from_model(model).component_log_prob(x), -1)
        stats = _stats(model, x)
    else:
        r = _random_resp(n, k, seed=9)
        stats = _stats(model, x, r)
    params = m_step(stats, model, variance_floor=1e-12)
    expected = _dense_gh_m_step(model, x, r)
    for name in ("means", "factor_loadings", "noise_variance", "weights"):
        torch.testing.assert_close(params[name], expected[name], rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("noise_level", [1e-4, 1e-6, 1e-8])
def test_float64_m_step_is_exact_at_image_signal_to_noise(noise_level):
    """Loadings of 0.3 over noise variances down to 1e-8, all float64: the M-step equals the
    textbook one to rounding. A fixed ridge of 1e-10·max(diag) in every component's solve
    biased each noise variance by ~1e-10·|Ã|², 2e-4 relative at 1e-6 and 2e-2 at 1e-8."""
    g = gen(3)
    k, d, lat, n = 2, 12, 2, 400
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.4, 0.6], dtype=F64), 0.3 + 0.4 * torch.rand(k, d, generator=g, dtype=F64),
        0.3 * torch.randn(k, d, lat, generator=g, dtype=F64),
        noise_level * (1 + torch.rand(k, d, generator=g, dtype=F64)), min_noise=0.0)
    with torch.no_grad():
        x = model.sample(n, generator=gen(4))[0]
    r = torch.softmax(DenseMixture.from_model(model).component_log_prob(x), -1)
    params = m_step(_stats(model, x), model, variance_floor=0.0)
    expected = _dense_gh_m_step(model, x, r)
    torch.testing.assert_close(params["noise_variance"], expected["noise_variance"],
                               rtol=1e-6, atol=0.0)
    for name in ("means", "factor_loadings"):
        torch.testing.assert_close(params[name], expected[name], rtol=1e-8, atol=1e-10)


def _dense_map_m_step(model, x, r, nu, s0, alpha, ridge):
    """The MAP update of mfa.priors written per component on uncentred data:
    Ã = (Σ r x E[z̃]ᵀ)(Σ r E[z̃z̃ᵀ] + λP)⁻¹, Ψ_j = (Σ r x_j² − 2 ã_j·b_j + ã_j G ã_jᵀ + λ‖a_j‖²
    + ν s₀) / (N_k + ν + L), π_k ∝ N_k + α − 1 (the long form of the residual, not the
    library's shortcut)."""
    a = model.factor_loadings.detach()
    psi = model.noise_variance.detach()
    k, d, lat = a.shape
    ez = _dense_posterior_means(model, x)
    out = {"means": [], "factor_loadings": [], "noise_variance": [], "weights": []}
    for j in range(k):
        rj = r[:, j]
        cov_z = torch.linalg.inv(torch.eye(lat, dtype=F64) + (a[j].T / psi[j]) @ a[j])
        ez_aug = torch.cat([ez[:, j], torch.ones(x.shape[0], 1, dtype=F64)], dim=1)
        gram = (rj[:, None] * ez_aug).T @ ez_aug
        gram[:lat, :lat] += rj.sum() * cov_z  # Σ r E[z̃z̃ᵀ]
        ridge_block = torch.zeros(lat + 1, lat + 1, dtype=F64)
        ridge_block[:lat, :lat] = ridge * torch.eye(lat, dtype=F64)
        b = (rj[:, None] * x).T @ ez_aug  # [D, L+1]
        a_aug = torch.linalg.solve(gram + ridge_block, b.T).T
        resid = ((rj[:, None] * x) * x).sum(0) - 2 * (a_aug * b).sum(1) + (
            (a_aug @ gram) * a_aug).sum(1)
        num = resid + ridge * a_aug[:, :lat].square().sum(1) + nu * s0
        den = rj.sum() + nu + (lat if ridge > 0 else 0)
        diag = num / den
        out["factor_loadings"].append(a_aug[:, :lat])
        out["means"].append(a_aug[:, lat])
        out["noise_variance"].append(diag if model.noise == "diagonal" else diag.mean().expand(d))
        out["weights"].append(rj.sum() + alpha - 1)
    out = {name: torch.stack(v) for name, v in out.items()}
    out["weights"] = out["weights"] / out["weights"].sum()
    return out


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("ridge", [0.0, 1.5])
def test_m_step_with_priors_matches_dense_map_update(noise, ridge):
    from mfa.priors import Prior

    k, d, lat, n = 3, 4, 2, 60
    model = random_model(k, d, lat, noise, seed=7, offset=3.0)
    x = random_data(n, model, seed=8)
    r = _random_resp(n, k, seed=9)
    nu, s0, alpha = 5.0, 0.6, 4.0
    params = m_step(_stats(model, x, r), model, variance_floor=1e-12,
                    prior=Prior(nu, s0, alpha, ridge))
    expected = _dense_map_m_step(model, x, r, nu, s0, alpha, ridge)
    for name in ("means", "factor_loadings", "noise_variance", "weights"):
        torch.testing.assert_close(params[name], expected[name], rtol=1e-8, atol=1e-9, msg=name)


def test_m_step_floors_variance_and_keeps_massless_component():
    """A constant feature gets exactly the floor; a component without responsibility keeps its
    parameters (to be re-seeded by the trainer) and gets weight 0."""
    rng = np.random.default_rng(3)
    x_np = rng.normal(size=(50, 3))
    x_np[:, 1] = 4.0
    x = torch.from_numpy(x_np)
    model = random_model(2, 3, 1, seed=4)
    resp = torch.zeros(50, 2, dtype=F64)
    resp[:, 0] = 1.0
    params = m_step(_stats(model, x, resp), model, variance_floor=1e-3)
    assert float(params["noise_variance"][0, 1]) == pytest.approx(1e-3, rel=1e-12)
    assert bool((params["noise_variance"] >= 1e-3).all())
    torch.testing.assert_close(params["weights"], torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(params["means"][1], model.means[1].detach())
    torch.testing.assert_close(params["factor_loadings"][1], model.factor_loadings[1].detach())
    torch.testing.assert_close(params["noise_variance"][1], model.noise_variance[1].detach())
    for value in params.values():
        assert bool(torch.isfinite(value).all())


# --------------------------------------------------------------------- float32 cancellation


def _offset_data(n: int = 4000, offset: float = 1e4, scale: float = 0.01):
    """float32 rows far from the origin with a small spread (scikit-learn#30382's case)."""
    rng = np.random.default_rng(30382)
    lab = rng.integers(0, 2, n)
    centres = np.array([[0.0, 0.0, 0.0], [0.05, -0.03, 0.02]])
    spread = np.array([1.0, 2.0, 0.5]) * scale
    x = offset + centres[lab] + rng.normal(size=(n, 3)) * spread
    return torch.from_numpy(x).float()


def _offset_model(dtype, x64):
    """Two components near the data, built from its moments (float64) and cast to ``dtype``."""
    mean = x64.mean(0)
    means = torch.stack([mean - 0.01, mean + 0.01])
    var = x64.var(0).expand(2, 3).contiguous()
    loadings = 0.003 * torch.ones(2, 3, 1, dtype=F64)
    return MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64).to(dtype),
        means.to(dtype),
        loadings.to(dtype),
        var.to(dtype),
    )


def test_float32_offset_data_keeps_variances():
    x32 = _offset_data()
    x64 = x32.double()  # the same float32 values, exactly, in float64
    m32 = _offset_model(torch.float32, x64)
    # The float64 model holds exactly the float32 model's parameters (means rounded to float32
    # at 1e4 move by ~5e-4, comparable to the spread), so only the arithmetic differs.
    m64 = MixtureOfFactorAnalyzers.from_parameters(
        m32.weights.detach().double(),
        m32.means.detach().double(),
        m32.factor_loadings.detach().double(),
        m32.noise_variance.detach().double(),
    )
    p32 = m_step(_stats(m32, x32, batch_size=333), m32, variance_floor=1e-12)
    p64 = m_step(_stats(m64, x64), m64, variance_floor=1e-12)
    nv32, nv64 = p32["noise_variance"].double(), p64["noise_variance"]
    assert bool(torch.isfinite(nv32).all()) and bool((nv32 > 0).all())
    # The floor was never hit: the variances are ~1e-5..1e-4.
    assert float(nv64.min()) > 1e-7
    torch.testing.assert_close(nv32, nv64, rtol=1e-4, atol=0)
    torch.testing.assert_close(p32["means"].double(), p64["means"], rtol=0, atol=1e-3)
    # The naive one-pass float32 variance E[x²] − E[x]² loses these variances completely,
    # so the comparison above is sensitive to the cancellation.
    naive = (x32 * x32).mean(0) - x32.mean(0) ** 2
    assert float(((naive.double() - x64.var(0, unbiased=False)).abs()).max()) > 1e-3


def test_float32_far_apart_components_keep_variances():
    """Two tight components (spread 0.01) 100 apart in float32: each is far from the
    reference c (the weighted mean of the means), so Σ r (x−c)² / Σ r − (μ−c)² cancels."""
    n = 2000
    lab = torch.arange(n) % 2
    x64 = lab[:, None] * 100.0 + 0.01 * torch.randn(n, 3, generator=gen(0), dtype=F64)
    x32 = x64.float()
    x64 = x32.double()
    out = []
    for dtype, x in ((torch.float32, x32), (F64, x64)):
        model = MixtureOfFactorAnalyzers.from_parameters(
            torch.tensor([0.5, 0.5], dtype=dtype),
            torch.tensor([[0.0] * 3, [100.0] * 3], dtype=dtype),
            torch.zeros(2, 3, 1, dtype=dtype),
            torch.full((2, 3), 1e-4, dtype=dtype),
        )
        out.append(m_step(_stats(model, x), model, variance_floor=1e-12)["noise_variance"])
    torch.testing.assert_close(out[0].double(), out[1], rtol=0.05, atol=0)


# --------------------------------------------------------------------- E-step precision modes


def _high_snr_problem():
    """float32-representable data and parameters: 2 components, one far from the other,
    loadings that explain most of the variance (the M-step's noise is a small difference)."""
    g = gen(123)
    k, d, lat = 2, 60, 4
    means = torch.rand(k, d, generator=g, dtype=F64)
    means[1] += 30.0
    loadings = 0.5 * torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = torch.full((k, d), 1e-3, dtype=F64)
    weights = torch.tensor([0.9, 0.1], dtype=F64)
    true = MixtureOfFactorAnalyzers.from_parameters(weights, means, loadings, noise)
    x, _ = true.sample(6000, generator=g)
    x = x.float().double()  # exactly representable in float32
    start = MixtureOfFactorAnalyzers.from_parameters(
        weights, means.float().double(), (0.8 * loadings).float().double(),
        torch.full((k, d), 2e-3, dtype=F64),
    )
    return x, start


@pytest.mark.parametrize(
    "mode, tol",
    [("float64", 1e-5), ("precise", 1e-5), ("centred", 1e-5), ("auto", 1e-5), ("mixed", 1e-2),
     ("centred32", 5e-3), ("float32", 0.5)],
)
def test_float32_model_e_step_modes_against_float64(mode, tol):
    """stats_dtype='float64' runs the float32 model's E-step in float64: its M-step equals
    the float64 model's (measured 1.3e-7 relative). 'precise' keeps the log-densities in
    float32 but takes every sum in float64 (measured 4.8e-6); 'centred' (and 'auto', which is
    'centred' on a CPU) takes each row's owner share in float64 about its mean (6.3e-6);
    'mixed' keeps the latent products in float32 (measured 6.6e-4 on
    this high signal-to-noise case; 2.7e-4 since the far component's are float64,
    mfa.precision.LOSSY_LIMIT); 'centred32' takes the owner shares' products in float32
    (measured 6.0e-4: float32's error on a variance the loadings dwarf); 'float32' lost the
    far component's variances to cancellation (measured 0.12; 5e-3 now). All stay finite and
    positive."""
    x, start64 = _high_snr_problem()
    start32 = MixtureOfFactorAnalyzers.from_parameters(
        start64.weights.detach().float(), start64.means.detach().float(),
        start64.factor_loadings.detach().float(), start64.noise_variance.detach().float(),
    )
    ref = m_step(EMTrainer.e_step(start64, DataSource(x, start64, 1000), "float64"), start64,
                 variance_floor=1e-9)
    src32 = DataSource(x.float(), start32, 1000)
    got = m_step(EMTrainer.e_step(start32, src32, mode), start32, variance_floor=1e-9)
    rel = ((got["noise_variance"].double() - ref["noise_variance"]).abs()
           / ref["noise_variance"]).max().item()
    assert rel < tol
    assert bool((got["noise_variance"] > 0).all())


def _pixel_like_problem(noise_level: float):
    """Rows like dequantised pixels under a sharp fit: means 0.4-0.6, loadings of size 0.3,
    noise variances ``noise_level``; a float32 model at the truth and its float64 copy."""
    g = gen(21)
    k, d, lat, n = 2, 20, 2, 500
    means = 0.4 + 0.2 * torch.rand(k, d, generator=g, dtype=F64)
    loadings = 0.3 * torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = torch.full((k, d), noise_level, dtype=F64)
    comp = torch.randint(0, k, (n,), generator=g)
    x = (means[comp] + (loadings[comp] @ torch.randn(n, lat, 1, generator=g,
                                                     dtype=F64)).squeeze(-1)
         + noise_level ** 0.5 * torch.randn(n, d, generator=g, dtype=F64)).float()
    model32 = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means.float(), loadings.float(), noise.float(), min_noise=0.0)
    return x, model32, MixtureOfFactorAnalyzers.from_parameters(
        *(t.detach().double() for t in (model32.weights, model32.means,
                                        model32.factor_loadings, model32.noise_variance)),
        min_noise=0.0)


@pytest.mark.parametrize("mode, tol", [("centred32", 1e-3), ("centred", 1e-3),
                                       ("precise", 1e-3)])
@pytest.mark.parametrize("noise_level", [1e-5, 1e-6])
def test_float32_modes_keep_noise_of_pixel_like_rows(mode, tol, noise_level):
    """One M-step of a float32 model in each mode against the float64 one, on pixel-like
    rows (loadings of 0.3 over noise at 1e-5 and 1e-6). 'centred32' took its owner shares'
    products in float32 for every component: 0.12 and 1.19 relative off here (20 EM
    iterations ran the noise down to the floor); the components too sharp for float32
    (owner_sums.SHARP_LIMIT) now sum in float64."""
    x, model32, model64 = _pixel_like_problem(noise_level)
    ref = m_step(EMTrainer.e_step(model64, DataSource(x.double(), model64, 1000), "float64"),
                 model64, variance_floor=1e-12)
    got = m_step(EMTrainer.e_step(model32, DataSource(x, model32, 1000), mode), model32,
                 variance_floor=1e-12)
    rel = ((got["noise_variance"].double() - ref["noise_variance"]).abs()
           / ref["noise_variance"]).max().item()
    assert rel < tol, rel


def test_float32_log_prob_of_far_apart_components():
    """Components 50 units apart with noise 1e-3: the expanded quadratic form would lose
    hundreds of nats in float32, so it is evaluated in float64 (error now at the level of
    torch.distributions' own float32 evaluation)."""
    g = gen(7)
    k, d, lat = 3, 200, 4
    means = torch.rand(k, d, generator=g, dtype=F64)
    means[1] += 50.0
    means[2] -= 50.0
    loadings = 0.3 * torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = torch.full((k, d), 1e-3, dtype=F64)
    weights = torch.tensor([0.98, 0.01, 0.01], dtype=F64)
    m64 = MixtureOfFactorAnalyzers.from_parameters(weights, means, loadings, noise)
    m32 = MixtureOfFactorAnalyzers.from_parameters(
        weights.float(), means.float(), loadings.float(), noise.float()
    )
    x, _ = m64.sample(600, generator=g)
    with torch.no_grad():
        err = (m32.log_prob(x.float()).double() - m64.log_prob(x)).abs().max().item()
        peer = (m32.to_distribution().log_prob(x.float()).double()
                - m64.log_prob(x)).abs().max().item()
    assert err < max(1.0, 3 * peer)


@pytest.mark.parametrize("lat", [0, 1])
@pytest.mark.parametrize(
    "mode, tols",
    [("float64", (1e-6, 1e-6)), ("precise", (1e-6, 1e-5)), ("centred", (1e-6, 1e-5)),
     ("auto", (1e-6, 1e-5)), ("mixed", (1e-6, 1e-4)), ("centred32", (1e-6, 1e-5))],
)
def test_e_step_modes_keep_far_apart_variances(mode, tols, lat):
    """The far-apart case through EMTrainer.e_step in every precision mode of a float32
    model, against a float64 model's M-step; tolerance ``tols[lat]`` (measured, L=0 / L=1:
    float64 4e-8 / 8e-8, precise 4e-8 / 3.2e-6, centred 6e-8 / 3.2e-6, mixed 4e-8 / 2.2e-5,
    centred32 1.6e-7 / 3.1e-6; precise and mixed were at 1.5e-5 with L=0 while x − c was
    taken in float32; float32 was off by 6×: the test below checks it against the dense
    update)."""
    tol = tols[lat]
    n = 2000
    lab = torch.arange(n) % 2
    x32 = (lab[:, None] * 100.0 + 0.01 * torch.randn(n, 3, generator=gen(0), dtype=F64)).float()

    def model(dtype):
        return MixtureOfFactorAnalyzers.from_parameters(
            torch.tensor([0.5, 0.5], dtype=dtype),
            torch.tensor([[0.0] * 3, [100.0] * 3], dtype=dtype),
            0.003 * torch.ones(2, 3, lat, dtype=dtype), torch.full((2, 3), 1e-4, dtype=dtype),
        )

    m64, m32 = model(F64), model(torch.float32)
    ref = m_step(EMTrainer.e_step(m64, DataSource(x32.double(), m64, 500), "float64"), m64,
                 variance_floor=1e-12)["noise_variance"]
    got = m_step(EMTrainer.e_step(m32, DataSource(x32, m32, 500), mode), m32,
                 variance_floor=1e-12)["noise_variance"].double()
    assert ((got - ref).abs() / ref).max().item() < tol


def _dense_noise_update(model, x, components=None) -> torch.Tensor:
    """The noise variances [K, D] of one plain EM step from ``model``'s parameters, all in
    float64 and densely: responsibilities from full covariances (``DenseMixture``), ``E[z]``
    by a solve per component, and each component's sums about its own weighted mean ``x̄``
    (the update ``[A, μ − x̄] = Σ r y E[z̃]ᵀ (Σ r E[z̃z̃ᵀ])⁻¹``, ``y = x − x̄``, is the
    textbook one translated: rows far from the origin lose nothing to cancellation).
    ``components``: only these (indices; ``[K', D]``), e.g. the ones with rows."""
    x = x.detach().to(F64)
    r = torch.softmax(DenseMixture.from_model(model).component_log_prob(x), -1)  # [N, K]
    a, psi, mu = (t.detach().to(F64) for t in (model.factor_loadings, model.noise_variance,
                                               model.means))
    lat = a.shape[-1]
    out = []
    for j in range(a.shape[0]) if components is None else components:
        rj = r[:, j]
        y = x - (rj @ x) / rj.sum()  # [N, D]
        prec = torch.eye(lat, dtype=F64) + (a[j].T / psi[j]) @ a[j]  # M
        ez = torch.linalg.solve(prec, (a[j].T / psi[j]) @ (x - mu[j]).T).T  # [N, L]
        ez1 = torch.cat([ez, torch.ones(len(x), 1, dtype=F64)], 1)  # E[z̃]  [N, L+1]
        sxz = (rj[:, None] * y).T @ ez1  # [D, L+1]
        szz = (rj[:, None] * ez1).T @ ez1
        szz[:lat, :lat] += rj.sum() * torch.linalg.inv(prec)
        sol = torch.linalg.solve(szz, sxz.T).T  # [D, L+1]
        out.append((rj @ (y * y) - (sol * sxz).sum(-1)) / rj.sum())
    return torch.stack(out)


def test_float32_mode_keeps_far_apart_variances():
    """'float32' took Σ r (x−c)² about c = 50 in float32: the noise variances came out 6×
    off (this test only checked them ≥ 1e-12, which the floor guarantees). Components too far
    (or sharp) for float32 sums about c (mfa.precision.LOSSY_LIMIT) now take them in float64:
    against the dense float64 update of the same float32 parameters, measured 3e-8."""
    n = 2000
    lab = torch.arange(n) % 2
    x32 = (lab[:, None] * 100.0 + 0.01 * torch.randn(n, 3, generator=gen(0), dtype=F64)).float()
    m32 = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), torch.tensor([[0.0] * 3, [100.0] * 3]),
        torch.zeros(2, 3, 1), torch.full((2, 3), 1e-4),
    )
    got = m_step(EMTrainer.e_step(m32, DataSource(x32, m32, 500), "float32"), m32,
                 variance_floor=1e-12)["noise_variance"].double()
    ref = _dense_noise_update(m32, x32)
    assert ((got - ref) / ref).abs().max().item() < 1e-4


def _concentrated_problem(case: str):
    """Two components (D = 50, noise 1e-2) whose cancellation lives in feature 0 alone:
    ``"far"``: the second 82 out there (L = 1, loadings 0.05; ε·(μ − c)²/d = 2e-2 there, 0
    elsewhere); ``"sharp"``: pixel-like means, loadings 0.3 over noise 1e-6 there (L = 2;
    ε·|a|²/d = 2e-2, ~2e-6 elsewhere). A float32 model and 1,000 rows drawn from it."""
    g = gen(21)
    k, d = 2, 50
    lat = 1 if case == "far" else 2
    noise = torch.full((k, d), 1e-2)
    if case == "far":
        mu = torch.zeros(k, d)
        mu[1, 0] = 82.0
        a = 0.05 * torch.randn(k, d, lat, generator=g)
    else:
        mu = 0.4 + 0.2 * torch.rand(k, d, generator=g)
        a = 0.3 * torch.randn(k, d, lat, generator=g)
        a[:, 0] = 0.3
        noise[:, 0] = 1e-6
    model = MixtureOfFactorAnalyzers.from_parameters(torch.tensor([0.5, 0.5]), mu, a, noise,
                                                     min_noise=0.0)
    with torch.no_grad():
        return model.sample(1000, generator=g)[0], model


@pytest.mark.parametrize("case, mode, tol", [("far", "float32", 1e-4),
                                             ("sharp", "float32", 1e-3),
                                             ("sharp", "mixed", 1e-3)])
def test_float32_and_mixed_promote_a_component_lossy_in_one_feature(case, mode, tol):
    """A component far from c (or sharp) in one of 50 features loses as much there as one
    that is so in every feature: mfa.precision.float64_components must take the worst
    feature, not the average (which stays below LOSSY_LIMIT here, and left the sums in
    float32: one M-step's noise variances 1.8e-2 off in "far", 3e-2 to 7e-2 in "sharp").
    Against the dense float64 update of the same float32 parameters; measured 6e-7 and
    1.9e-5."""
    x, model = _concentrated_problem(case)
    got = m_step(EMTrainer.e_step(model, DataSource(x, model, 1000), mode), model,
                 variance_floor=0.0)["noise_variance"].double()
    ref = _dense_noise_update(model, x)
    assert ((got - ref) / ref).abs().max().item() < tol


def _two_far_clusters():
    """Two clusters 2,000 apart (loadings 0.3, noise 0.01, D = 10, L = 2), float32."""
    g = gen(0)
    d, lat, n = 10, 2, 1500
    a = 0.3 * torch.randn(2, d, lat, generator=g)
    mu = torch.stack([torch.full((d,), -1000.0), torch.full((d,), 1000.0)])
    k = torch.randint(0, 2, (n,), generator=g)
    return (mu[k] + (a[k] @ torch.randn(n, lat, 1, generator=g)).squeeze(-1)
            + 0.1 * torch.randn(n, d, generator=g))


def _fit_far_clusters(mode: str) -> tuple[list[dict], float]:
    """A default fit (K-means start, the "auto" noise prior) but ``stats_dtype``: the history
    and the fitted model's mean log-likelihood of the rows."""
    x = _two_far_clusters()
    model = MixtureOfFactorAnalyzers(2, 10, 2, generator=gen(0))
    trainer = EMTrainer(EMConfig(stats_dtype=mode, max_iter=30, progress=False,
                                 tempered_step=False, reseed_rounds=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x)
    with torch.no_grad():
        return trainer.history, model.log_prob(x).double().mean().item()


@pytest.mark.parametrize("mode", ["float32", "mixed"])
def test_float32_and_mixed_fits_of_far_apart_clusters(mode):
    """'float32' summed these components' moments about c in float32: the recorded MAP
    objective went from 3.92 to −44 nats a row (one fall of 6e5) and the fit scored −7.5
    instead of 3.9, silently. Their sums are now in float64 (mfa.precision.LOSSY_LIMIT): the
    objective falls by no more than the E-step's rounding under a fixed prior (measured 8e-6;
    the search's change of s₀ moves it by more, either way), and the fit scores as
    "centred"'s does, up to the s₀ each search picks (measured 2.1e-3 apart; 'mixed' was
    5.7e-3 apart before, and fell by 0.12 a row at its change of s₀)."""
    history, score = _fit_far_clusters(mode)
    falls = [a["train_objective"] - b["train_objective"] for a, b in zip(history, history[1:],
                                                                         strict=False)
             if a["noise_prior_variance"] == b["noise_prior_variance"]]
    assert max(falls) < 2e-3
    assert abs(score - _fit_far_clusters("centred")[1]) < 1e-2


@pytest.mark.parametrize("mode", ["float32", "mixed"])
def test_float32_and_mixed_em_on_sharp_pixel_like_rows(mode):
    """Noise 1e-6 under loadings of 0.3 (a fixed prior, floor 1e-9): 'mixed' took Σ r x pᵀ in
    float32 and its recorded objective fell by 5.8e-3 nats a row, 'float32' by 0.089 (running
    a noise variance to 4.7e-7); both now keep such sharp components' sums in float64
    (measured falls 1.7e-4, as "centred")."""
    x, model, _ = _pixel_like_problem(1e-6)
    trainer = EMTrainer(EMConfig(stats_dtype=mode, max_iter=20, tol=0.0, patience=0,
                                 init="none", noise_prior_variance=1.3e-6, variance_floor=1e-9,
                                 progress=False, tempered_step=False, reseed_rounds=0))
    with pytest.warns(ConvergenceWarning):
        trainer.fit(model, x)
    objective = [r["train_objective"] for r in trainer.history]
    assert max(a - b for a, b in zip(objective, objective[1:], strict=False)) < 2e-3


def _far_float64_problem(dtype):
    """Three components, two ±1e4 apart and one 1 from the second (noise 1e-2, loadings 0.3,
    L = 2, D = 10), 1,500 rows drawn from them, and a model near them in ``dtype``."""
    g = gen(1)
    k, d, lat = 3, 10, 2
    means = torch.stack([torch.full((d,), -1e4), torch.full((d,), 1e4), torch.zeros(d)]).to(F64)
    means = means + torch.randn(k, d, generator=g, dtype=F64)
    means[2] = means[1] + torch.randn(d, generator=g, dtype=F64)
    loadings = 0.3 * torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = torch.full((k, d), 1e-2, dtype=F64)
    weights = torch.tensor([0.4, 0.35, 0.25], dtype=F64)
    true = MixtureOfFactorAnalyzers.from_parameters(weights, means, loadings, noise)
    with torch.no_grad():
        x = true.sample(1500, generator=g)[0].to(dtype)
    start = MixtureOfFactorAnalyzers.from_parameters(
        weights, means + 0.01 * torch.randn(k, d, generator=g, dtype=F64),
        loadings * (1 + 0.1 * torch.randn(k, d, lat, generator=g, dtype=F64)),
        noise * (1 + 0.1 * torch.rand(k, d, generator=g, dtype=F64)))
    return x, start.to(dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_float64_mode_is_exact_for_components_far_apart(dtype):
    """'float64' ("exact; the reference") took float64 rows' sums about c: with components
    ±1e4 apart at noise 1e-2 one M-step's noise variances were 3.5e-5 off the dense float64
    update (a float32 model's float64 E-step 2.1e-4), and the M-step from exact sums about c
    is ~7e-6 off. Such rows are now summed about each share's own mean
    (mfa.precision.FLOAT64_FAR_LIMIT): measured 9.0e-6 and 3.5e-6."""
    x, model = _far_float64_problem(dtype)
    got = m_step(EMTrainer.e_step(model, DataSource(x, model, 1000), "float64"), model,
                 variance_floor=0.0)["noise_variance"].double()
    ref = _dense_noise_update(model, x)
    assert ((got - ref) / ref).abs().max().item() < 2e-5


@pytest.mark.parametrize("mode", ["float64", "precise", "centred", "mixed", "centred32",
                                  "float32"])
def test_e_step_streamed_equals_full_batch_in_every_mode(mode, monkeypatch):
    """Batches of 37 rows and chunks of 16 rows inside each batch give the statistics of one
    batch of every row (float32 modes within float32 rounding)."""
    import mfa.owner_sums as owner_sums
    import mfa.statistics as statistics

    model = random_model(3, 6, 2, "diagonal", seed=4).float()
    x = random_data(300, model, seed=5).float()
    full = EMTrainer.e_step(model, DataSource(x, model, 300), mode)
    monkeypatch.setattr(statistics, "CHUNK_ROWS", 16)
    monkeypatch.setattr(owner_sums, "SLICE_ROWS", 16)
    streamed = EMTrainer.e_step(model, DataSource(x, model, 37), mode)
    _assert_stats_close(streamed, full, rtol=1e-10 if mode == "float64" else 1e-4)


def test_whitened_to_latent_matches_per_row_posterior_means():
    """Sums taken in the whitened basis and moved once equal the sums of E[z] = C⁻ᵀ p taken
    row by row (the earlier per-row triangular solve)."""
    from mfa.statistics import latent_posterior_means, whitened_to_latent

    g = gen(11)
    k, d, lat, n = 3, 5, 2, 40
    a = torch.randn(k, lat, lat, generator=g, dtype=F64)
    chol = torch.linalg.cholesky(a @ a.mT + torch.eye(lat, dtype=F64))
    proj = torch.randn(n, k, lat, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    r = torch.rand(n, k, generator=g, dtype=F64)
    rp = r.unsqueeze(-1) * proj
    sum_xz, sum_z, sum_zz = whitened_to_latent(
        torch.einsum("nd,nkl->kdl", x, rp), rp.sum(0), torch.einsum("nkl,nkm->klm", rp, proj),
        chol,
    )
    ez = latent_posterior_means(proj, chol)
    rez = r.unsqueeze(-1) * ez
    torch.testing.assert_close(sum_xz, torch.einsum("nd,nkl->kdl", x, rez), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_z, rez.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum_zz, torch.einsum("nkl,nkm->klm", rez, ez), rtol=1e-12,
                               atol=1e-12)


# --------------------------------------------------------------------- the "centred" mode


def _overlapping_problem(lat: int):
    """float32 data from 4 overlapping components near the origin (many rows share their
    mass between two components, so the owner and non-owner sums both matter)."""
    g = gen(31)
    k, d = 4, 12
    means = 0.1 * torch.randn(k, d, generator=g, dtype=F64)
    loadings = 0.4 * torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = 0.05 + 0.1 * torch.rand(k, d, generator=g, dtype=F64)
    true = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k, dtype=F64), means, loadings, noise)
    x, _ = true.sample(3000, generator=g)
    start = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k), (means + 0.1).float(), (0.9 * loadings).float(),
        (1.3 * noise).float())
    return x.float(), start


@pytest.mark.parametrize("lat", [0, 2])
@pytest.mark.parametrize("given_resp", [False, True])
def test_centred_statistics_match_float64_e_step(lat, given_resp):
    """Every sum of the centred mode (owner shares + the rest) against the float64 E-step of
    the same float32 model and rows, with posterior and with given (soft) responsibilities;
    the non-owner shares carry real mass here, so a lost or double-counted share shows."""
    x, model = _overlapping_problem(lat)
    resp = None
    if given_resp:
        resp = torch.softmax(torch.randn(x.shape[0], 4, generator=gen(2)), -1)
        # The responsibilities are data here: the same float32 values in both runs.
    terms = model.component_terms()
    got = accumulate_statistics(model, x, terms, resp=resp, centred=True)
    terms64 = terms.to(F64)
    chol64 = linalg.capacitance_cholesky(model.factor_loadings.double(),
                                         model.noise_variance.double())
    ref = accumulate_statistics(model, x.double(), terms64, chol64,
                                resp=None if resp is None else resp.double())
    # Not bit-equal: the log-densities, p and the non-owner products are float32.
    _assert_stats_close(got, ref, rtol=2e-5)
    # The non-owner products carry a real share of the mass in this problem.
    owner_mass = torch.zeros(4, dtype=F64)
    r = (model.responsibilities(x) if resp is None else resp).detach().double()
    owner_mass.index_add_(0, r.argmax(1), r.max(1).values)
    assert float((r.sum(0) - owner_mass).min()) > 0.05 * x.shape[0] / 4  # > 5 % of its mass


def test_centred_m_step_matches_precise_on_overlapping_components():
    """The M-step after a centred E-step equals the float64 M-step as closely as 'precise'
    does (both keep float32 log-densities)."""
    x, model = _overlapping_problem(2)
    m64 = MixtureOfFactorAnalyzers.from_parameters(
        *(t.detach().double() for t in (model.weights, model.means, model.factor_loadings,
                                        model.noise_variance)))
    ref = m_step(EMTrainer.e_step(m64, DataSource(x.double(), m64, 1000), "float64"), m64,
                 variance_floor=1e-9)
    errors = {}
    for mode in ("precise", "centred"):
        got = m_step(EMTrainer.e_step(model, DataSource(x, model, 1000), mode), model,
                     variance_floor=1e-9)
        errors[mode] = max(
            ((got[name].double() - ref[name]).abs().max() / ref[name].abs().max()).item()
            for name in ("means", "factor_loadings", "noise_variance"))
    assert errors["centred"] < 1e-4
    assert errors["centred"] < 10 * errors["precise"] + 1e-6


def test_e_step_refines_the_quadratic_form_near_each_rows_top():
    """Image-like float32 parameters whose expanded quadratic form loses nats (1 < ε·κ ≤ 20):
    the E-step recomputes the entries near each row's top, so its log-likelihood and sums
    match the float64 E-step as closely as the float64 form did."""
    import dataclasses

    g = gen(3)
    k, d = 4, 300
    means = torch.rand(k, d, generator=g, dtype=F64)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 0.25, dtype=F64), means, 0.01 * torch.randn(k, d, 2, generator=g,
                                                                     dtype=F64),
        torch.full((k, d), 5e-7, dtype=F64))
    x, _ = truth.sample(2000, generator=g)
    params = [t.detach().float() for t in (truth.weights, truth.means, truth.factor_loadings,
                                           truth.noise_variance)]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))
    x = x.float()
    terms = m32.component_terms()
    assert terms.refine
    ref = accumulate_statistics(m64, x.double(), m64.component_terms())
    got = accumulate_statistics(m32, x, terms, centred=True)
    plain = accumulate_statistics(m32, x, dataclasses.replace(terms, rounding=0.0),
                                  centred=True)
    def per_row(stats):
        return float((stats.log_likelihood - ref.log_likelihood).abs()) / x.shape[0]

    assert per_row(got) < 0.05 and per_row(plain) > 3 * per_row(got)
    # the sums about each run's own reference (float32 vs float64 weighted mean of the means)
    shift = (got.reference - ref.reference).unsqueeze(0)  # [1, D], ~1e-8
    torch.testing.assert_close(got.mass, ref.mass, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.sum_x + shift * got.mass.unsqueeze(-1), ref.sum_x,
                               rtol=1e-4, atol=1e-3)


# ------------------------------------------- the "centred" mode's sparse chunks (float64 pairs)


def _record_chunks(monkeypatch) -> list:
    """Spy on the centred mode's choice per chunk: the pairs of a sparse chunk, None dense."""
    import mfa.statistics as statistics

    seen = []
    original = statistics.significant_pairs

    def spy(resp, proj, row_offset):
        out = original(resp, proj, row_offset)
        seen.append(out)
        return out

    monkeypatch.setattr(statistics, "significant_pairs", spy)
    return seen


def _two_close_one_far(n=900, d=20, lat=2, far=30.0, gap=2.5):
    """float32 rows of two components ``gap`` apart (a band of rows between them carries
    both) and a third ``far`` away from both, tight (noise 1e-4) so its moments cancel
    about c."""
    g = gen(41)
    means = torch.zeros(3, d, dtype=F64)
    means[1, 0] = gap
    means[2] += far
    loadings = 0.2 * torch.randn(3, d, lat, generator=g, dtype=F64)
    noise = torch.tensor([0.05, 0.05, 1e-4], dtype=F64).unsqueeze(-1).expand(3, d).clone()
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((3,), 1 / 3, dtype=F64), means, loadings, noise)
    x, _ = truth.sample(n, generator=g)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((3,), 1 / 3), (means + 0.02).float(), (0.9 * loadings).float(),
        (1.2 * noise).float())
    return x.float(), model


def _float64_statistics(model, x, resp=None):
    terms64 = model.component_terms().to(F64)
    chol64 = linalg.capacitance_cholesky(model.factor_loadings.double(),
                                         model.noise_variance.double())
    return accumulate_statistics(model, x.double(), terms64, chol64,
                                 resp=None if resp is None else resp.double())


def _assert_sums_close(a: SufficientStatistics, b: SufficientStatistics, rtol: float) -> None:
    """The sums as :func:`_assert_stats_close`; the log-likelihood (float32 log-densities in
    both forms, unchanged by how the sums are taken) within 0.01 nat a row."""
    for name in STAT_FIELDS:
        if name != "log_likelihood":
            va, vb = getattr(a, name), getattr(b, name)
            scale = max(1.0, float(vb.abs().max())) if vb.numel() else 1.0
            torch.testing.assert_close(va, vb, rtol=rtol, atol=rtol * scale, msg=name)
    assert abs(float(a.log_likelihood - b.log_likelihood)) < 0.01 * float(b.n_rows)


def test_centred_sparse_chunks_match_float64_e_step(monkeypatch):
    """Chunks whose shares below 1e-12 carry no mass are summed as float64 pairs only (the
    owner and every other share that counts): every sum equals the float64 E-step's, the
    far, tight component's too (its variance cancels 1e6-fold about c in float32)."""
    x, model = _two_close_one_far()
    seen = _record_chunks(monkeypatch)
    got = accumulate_statistics(model, x, model.component_terms(), centred=True)
    assert seen and all(pairs is not None for pairs in seen)
    n_pairs = sum(pairs[0].numel() for pairs in seen)
    assert x.shape[0] + 20 < n_pairs < 2 * x.shape[0]  # the band's rows carry two pairs
    ref = _float64_statistics(model, x)
    _assert_sums_close(got, ref, rtol=2e-5)
    # Per component, relative to its own scale (the far one's variance is ~1e-4 of its moment).
    variance = (got.sum_x2 / got.mass.unsqueeze(-1) - (got.sum_x / got.mass.unsqueeze(-1)) ** 2)
    variance_ref = (ref.sum_x2 / ref.mass.unsqueeze(-1)
                    - (ref.sum_x / ref.mass.unsqueeze(-1)) ** 2)
    torch.testing.assert_close(variance, variance_ref, rtol=1e-4, atol=0)


def test_centred_sparse_and_dense_chunks_in_one_batch(monkeypatch):
    """Rows of well-separated components first, rows shared by overlapping ones after them:
    with chunks of 64 rows both forms occur in one batch, and the batch's sums equal the
    all-float64 sums and the one-chunk statistics."""
    import mfa.statistics as statistics

    x_hard, model = _two_close_one_far(n=300)
    second = model.responsibilities(x_hard).topk(2, dim=-1).values[:, 1]
    hard = x_hard[second < 1e-13][:128]
    assert hard.shape[0] == 128
    between = 0.5 * (model.means[0] + model.means[1]).detach()
    soft = between + 0.1 * torch.randn(128, x_hard.shape[1], generator=gen(3))
    x = torch.cat([hard, soft.float()])
    seen = _record_chunks(monkeypatch)
    monkeypatch.setattr(statistics, "CHUNK_ROWS", 64)
    got = accumulate_statistics(model, x, model.component_terms(), centred=True)
    kinds = ["sparse" if pairs is not None else "dense" for pairs in seen]
    assert kinds[:2] == ["sparse", "sparse"] and "dense" in kinds[2:], kinds
    # Against "precise" (the same float32 responsibilities, every sum a float64 product):
    # the float64 E-step's own log-densities move these soft rows' responsibilities.
    precise = accumulate_statistics(model, x, model.component_terms(), precise_latent=True)
    _assert_sums_close(got, precise, rtol=1e-5)
    monkeypatch.setattr(statistics, "CHUNK_ROWS", 1024)
    _assert_stats_close(got, accumulate_statistics(model, x, model.component_terms(),
                                                   centred=True), rtol=1e-5)


def test_significant_pairs_rules(monkeypatch):
    """The sparse form keeps exactly the entries ≥ PAIR_THRESHOLD (component-major, rows
    offset into the batch), and refuses when a component's left-out mass is not negligible
    against its kept mass, or when the pairs are too many to pay."""
    import mfa.owner_sums as owner_sums
    from mfa.owner_sums import PAIR_THRESHOLD, significant_pairs

    monkeypatch.setattr(owner_sums, "PAIR_COST", 4.0)  # up to n·(1 + 3/4) = 14 pairs
    k, lat, n = 3, 2, 8
    proj = torch.randn(k, lat, n, generator=gen(5))
    resp = torch.zeros(k, n)
    resp[0, :5] = 1.0
    resp[1, 5:] = 0.75
    resp[2, 5:] = 0.25
    resp[1, 0] = 1e-20  # left out: 1e-20 against component 1's kept mass 2.25
    pairs = significant_pairs(resp, proj, row_offset=100)
    assert pairs is not None
    comp, rows, r, p = pairs
    assert comp.tolist() == [0] * 5 + [1] * 3 + [2] * 3
    assert rows.tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 105, 106, 107]
    torch.testing.assert_close(r, resp[comp, rows - 100])
    torch.testing.assert_close(p, proj[comp, :, rows - 100].T)
    # A component made only of shares below the threshold: its mass would be lost.
    dead = resp.clone()
    dead[2] = 0.5 * PAIR_THRESHOLD
    dead[2, :5] = 0.0
    assert significant_pairs(dead, proj, 0) is None
    # ... unless that mass is below what the M-step treats as no mass at all (ε₆₄ per row).
    dead[2, 5:] = 1e-17
    assert significant_pairs(dead, proj, 0) is not None
    # Too many pairs: every entry of every row counts (24 > 14).
    assert significant_pairs(torch.full((k, n), 1 / 3), proj, 0) is None


def _far_overlapping(far: float, with_data: bool = True):
    """Two overlapping components (means 0 and 0.5, variance 0.5, 300 rows between them)
    and a third ``far`` out: with its 20 % of the rows (``with_data``), or with none (its
    weight of 1/3 then pulls the reference point c ~far/3 away from every row)."""
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.4, 0.4, 0.2]) if with_data else torch.tensor([1 / 3, 1 / 3, 1 / 3])
    mu = torch.zeros(3, 4)
    mu[1] += 0.5
    mu[2] += far
    d = torch.full((3, 4), 0.5)
    drawn = torch.tensor([0.4, 0.4, 0.2 if with_data else 0.0])
    c = torch.multinomial(drawn, 300, True, generator=g)
    x = mu[c] + d[c].sqrt() * torch.randn(300, 4, generator=g)
    return x, MixtureOfFactorAnalyzers.from_parameters(w, mu, torch.zeros(3, 4, 0), d)


@pytest.mark.parametrize("far, with_data", [(1e4, True), (1e3, True), (1e4, False)])
@pytest.mark.parametrize("mode", ["precise", "mixed", "centred", "centred32", "auto"])
def test_overlapping_components_far_from_the_reference(mode, far, with_data):
    """The mass Σr was a float32 sum in "precise"/"mixed" (noise variances 0.27 off in one
    M-step at 1e4), and "centred"'s dense chunks summed the non-owner shares' moments about
    c in float32 (0.99 off; 0.46-2.0 where a data-less component pulled c away). Against the
    float64 mode's M-step; measured now: ≤ 4e-6 in every case."""
    x, m = _far_overlapping(far, with_data)
    ref = m_step(EMTrainer.e_step(m, DataSource(x, m, 4096), "float64"), m,
                 variance_floor=1e-6)["noise_variance"]
    got = m_step(EMTrainer.e_step(m, DataSource(x, m, 4096), mode), m,
                 variance_floor=1e-6)["noise_variance"]
    assert ((got - ref) / ref)[:2].abs().max().item() < 1e-4


def _one_far_pair_of_twenty():
    """20 components (weights 1/20, variance 0.5, L = 0, D = 20): two overlapping ones
    (means 0.5 apart) 2,000 out in feature 0 alone with every row (300), the other 18
    around 0 with none. ε·(μ − c)²/d is 0.77 at most (c_0 ≈ 200; FAR_LIMIT 1e-2) but 4e-3
    on average over the components and features. Returns the rows and the model."""
    g, k, d = gen(0), 20, 20
    mu = 3.0 * torch.randn(k, d, generator=g)
    mu[1] = mu[0] + 0.5
    mu[:2, 0] += 2000.0
    noise = torch.full((k, d), 0.5)
    model = MixtureOfFactorAnalyzers.from_parameters(torch.full((k,), 1 / k), mu,
                                                     torch.zeros(k, d, 0), noise)
    owner = torch.randint(0, 2, (300,), generator=g)
    return mu[owner] + noise[owner].sqrt() * torch.randn(300, d, generator=g), model


@pytest.mark.parametrize("mode", ["centred", "centred32"])
def test_a_far_pair_of_twenty_components_counts_as_far(mode):
    """mfa.precision.far_from_reference must take the worst component and feature, not the
    average over them: with the average, the dense chunks summed the far pair's non-owner
    shares' Σ r x, Σ r x² about c in float32 and one M-step's noise variances came out 0.31
    off. Against the dense float64 update of the same parameters (the two components with
    rows); measured 1e-7 ("centred") and 3.7e-7 ("centred32")."""
    x, model = _one_far_pair_of_twenty()
    got = m_step(EMTrainer.e_step(model, DataSource(x, model, 4096), mode), model,
                 variance_floor=0.0)["noise_variance"].double()[:2]
    ref = _dense_noise_update(model, x, [0, 1])
    assert ((got - ref) / ref).abs().max().item() < 1e-4


def test_default_em_objective_does_not_fall_with_far_components():
    """With the default (auto: "centred" on the CPU) precision the recorded MAP objective
    fell 14 times in 30 iterations, by up to 0.5 nats a row; it may move only by the
    E-step's float32 rounding (~2e-3 nats a row, mfa.em)."""
    x, m = _far_overlapping(1e4)
    trainer = EMTrainer(EMConfig(max_iter=30, tol=0.0, init="none", noise_prior_strength=0.0,
                                 patience=0, progress=False))
    with pytest.warns(ConvergenceWarning):
        trainer.fit(m, x)
    objective = [r["train_objective"] for r in trainer.history]
    assert min(b - a for a, b in zip(objective, objective[1:], strict=False)) > -2e-3


def test_the_m_step_is_still_importable_from_its_old_home():
    """m_step and m_steps moved to mfa.m_step; mfa.statistics still hands them out."""
    import mfa.m_step
    from mfa.statistics import m_step as old
    from mfa.statistics import m_steps as old_steps

    assert old is mfa.m_step.m_step and old_steps is mfa.m_step.m_steps
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        from mfa import statistics

        statistics.nothing  # noqa: B018
