"""mfa.linalg against dense float64 linear algebra (slogdet, solve, explicit inverses)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, gen
from torch.distributions import MultivariateNormal

from mfa import linalg

# (batch shape, D, L): plain, batched over two leading dims, L = 0, L = D, L = 1.
CASES = [((), 6, 2), ((2, 3), 5, 3), ((4,), 7, 0), ((3,), 4, 4), ((2,), 9, 1)]


def _random(batch, d, lat, seed=0):
    g = gen(seed)
    a = torch.randn(*batch, d, lat, generator=g, dtype=F64)
    noise = 0.1 + torch.rand(*batch, d, generator=g, dtype=F64)
    return a, noise


def _dense(a, noise):
    return a @ a.mT + torch.diag_embed(noise)


@pytest.mark.parametrize("batch,d,lat", CASES)
def test_capacitance_cholesky_factors_capacitance(batch, d, lat):
    a, noise = _random(batch, d, lat)
    chol = linalg.capacitance_cholesky(a, noise)
    assert chol.shape == (*batch, lat, lat)
    expected = torch.eye(lat, dtype=F64) + a.mT @ torch.diag_embed(1.0 / noise) @ a
    torch.testing.assert_close(chol @ chol.mT, expected, rtol=1e-12, atol=1e-12)
    # Lower triangular with a positive diagonal.
    torch.testing.assert_close(chol, chol.tril(), rtol=0, atol=0)
    assert bool((chol.diagonal(dim1=-2, dim2=-1) > 0).all())


@pytest.mark.parametrize("batch,d,lat", CASES)
def test_lowrank_logdet_matches_slogdet(batch, d, lat):
    a, noise = _random(batch, d, lat, seed=1)
    chol = linalg.capacitance_cholesky(a, noise)
    got = linalg.lowrank_logdet(chol, noise)
    sign, expected = torch.linalg.slogdet(_dense(a, noise))
    assert bool((sign > 0).all())
    assert got.shape == batch
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch,d,lat", CASES)
def test_whitened_factors_give_woodbury_inverse(batch, d, lat):
    a, noise = _random(batch, d, lat, seed=2)
    chol = linalg.capacitance_cholesky(a, noise)
    b = linalg.whitened_factors(a, noise, chol)
    assert b.shape == (*batch, lat, d)
    sigma = _dense(a, noise)
    eye = torch.eye(d, dtype=F64).expand_as(sigma)
    inverse = torch.linalg.solve(sigma, eye)
    # Σ⁻¹ = D⁻¹ − Bᵀ B
    torch.testing.assert_close(
        torch.diag_embed(1.0 / noise) - b.mT @ b, inverse, rtol=1e-9, atol=1e-10
    )
    # and the quadratic form used by the densities
    r = torch.randn(*batch, d, 1, generator=gen(3), dtype=F64)
    expected = (r.mT @ torch.linalg.solve(sigma, r)).squeeze(-1).squeeze(-1)
    got = (r.squeeze(-1) ** 2 / noise).sum(-1) - (b @ r).squeeze(-1).pow(2).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch,d,lat", CASES)
def test_capacitance_inverse_factor_squares_to_inverse(batch, d, lat):
    a, noise = _random(batch, d, lat, seed=4)
    chol = linalg.capacitance_cholesky(a, noise)
    f = linalg.capacitance_inverse_factor(chol)
    assert f.shape == (*batch, lat, lat)
    cap = chol @ chol.mT
    eye = torch.eye(lat, dtype=F64).expand_as(cap)
    torch.testing.assert_close(f @ f.mT, torch.linalg.solve(cap, eye), rtol=1e-10, atol=1e-12)
    # A C⁻ᵀ factors A M⁻¹ Aᵀ, the low-rank part of a conditional covariance.
    af = a @ f
    torch.testing.assert_close(
        af @ af.mT, a @ torch.linalg.solve(cap, a.mT), rtol=1e-10, atol=1e-12
    )


def test_gaussian_log_normaliser_is_density_at_the_mean():
    a, noise = _random((3,), 5, 2, seed=5)
    sigma = _dense(a, noise)
    logdet = torch.linalg.slogdet(sigma).logabsdet
    got = linalg.gaussian_log_normaliser(5, logdet)
    expected = MultivariateNormal(torch.zeros(3, 5, dtype=F64), sigma).log_prob(
        torch.zeros(3, 5, dtype=F64)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert linalg.LOG_2PI == pytest.approx(math.log(2 * math.pi), rel=1e-15)


def test_functions_are_differentiable():
    a, noise = _random((2,), 4, 2, seed=6)
    a.requires_grad_(True)
    noise.requires_grad_(True)

    def f(a, noise):
        chol = linalg.capacitance_cholesky(a, noise)
        return linalg.lowrank_logdet(chol, noise)

    assert torch.autograd.gradcheck(f, (a, noise))


@pytest.mark.parametrize("batch,d,lat", CASES)
def test_whitening_equals_the_two_calls_and_their_gradients(batch, d, lat):
    """One call with ``D⁻¹A`` shared gives the values of capacitance_cholesky and
    whitened_factors bit for bit, and (float64 gradcheck) correct gradients."""
    a, noise = _random(batch, d, lat, seed=7)
    chol, white = linalg.whitening(a, noise)
    expected_chol = linalg.capacitance_cholesky(a, noise)
    torch.testing.assert_close(chol, expected_chol, rtol=0, atol=0)
    torch.testing.assert_close(white, linalg.whitened_factors(a, noise, expected_chol),
                               rtol=0, atol=0)
    a.requires_grad_(True)
    noise.requires_grad_(True)

    def f(a, noise):
        chol, white = linalg.whitening(a, noise)
        return linalg.lowrank_logdet(chol, noise), white

    assert torch.autograd.gradcheck(f, (a, noise))


def test_whitening_falls_back_to_float64_like_capacitance_cholesky():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 1, generator=g, dtype=torch.float64)
    factors = torch.cat([base, base + 1e-6 * torch.randn(50, 1, generator=g,
                                                         dtype=torch.float64)], dim=1)
    f32, n32 = factors.float(), torch.full((50,), 1e-7)
    chol, white = linalg.whitening(f32, n32)
    expected = linalg.capacitance_cholesky(f32, n32)  # the float64 fallback
    torch.testing.assert_close(chol, expected, rtol=0, atol=0)
    torch.testing.assert_close(white, linalg.whitened_factors(f32, n32, expected),
                               rtol=0, atol=0)


@pytest.mark.parametrize("k,d,lat", [(3, 6, 2), (2, 5, 5), (4, 7, 1)])
def test_woodbury_mahalanobis_matches_dense_inverse(k, d, lat):
    # (x−μ)ᵀΣ⁻¹(x−μ) from diagonal_quadratic + woodbury_mahalanobis, [n, K], against a dense
    # solve with Σ = AAᵀ + diag(d) for every row and component.
    a, noise = _random((k,), d, lat, seed=11)
    g = gen(12)
    means = torch.randn(k, d, generator=g, dtype=F64)
    x = 2.0 * torch.randn(9, d, generator=g, dtype=F64)
    chol = linalg.capacitance_cholesky(a, noise)
    whitened = linalg.whitened_factors(a, noise, chol)  # [K, L, D]
    diff = x.unsqueeze(1) - means  # [n, K, D]
    proj = (whitened @ diff.unsqueeze(-1)).squeeze(-1)  # [n, K, L]
    diag_quad = linalg.diagonal_quadratic(x, means, 1.0 / noise, precise=False)  # [n, K]
    got = linalg.woodbury_mahalanobis(diag_quad, proj)
    cov = _dense(a, noise)  # [K, D, D]
    expected = (diff.unsqueeze(-2) @ torch.linalg.solve(cov, diff.unsqueeze(-1))).flatten(1)
    assert got.shape == (9, k)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The float64 path of diagonal_quadratic gives the same values for float32 inputs.
    lo = linalg.diagonal_quadratic(x.float(), means.float(), (1.0 / noise).float(), True)
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo.double(), diag_quad, rtol=1e-6, atol=1e-5)


def test_masked_diagonal_quadratic_sums_over_observed_features_only():
    g = gen(13)
    x = torch.randn(6, 5, generator=g, dtype=F64)
    means = torch.randn(3, 5, generator=g, dtype=F64)
    inv_noise = 1.0 / (0.2 + torch.rand(3, 5, generator=g, dtype=F64))
    mask = (torch.rand(6, 5, generator=g) < 0.6).to(F64)
    got = linalg.diagonal_quadratic(x * mask, means, inv_noise, precise=False, mask=mask)
    terms = (x.unsqueeze(1) - means) ** 2 * inv_noise * mask.unsqueeze(1)  # [n, K, D]
    torch.testing.assert_close(got, terms.sum(-1), rtol=1e-12, atol=1e-12)


def test_capacitance_cholesky_falls_back_to_float64_when_float32_fails():
    """Loadings far above a tiny noise make M = I + AᵀD⁻¹A nearly singular in float32 (its
    Cholesky fails there); the factor is then computed in float64, in the input's dtype."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 1, generator=g, dtype=torch.float64)
    factors = torch.cat([base, base + 1e-6 * torch.randn(50, 1, generator=g,
                                                         dtype=torch.float64)], dim=1)
    noise = torch.full((50,), 1e-7, dtype=torch.float64)
    f32, n32 = factors.float(), noise.float()
    m32 = f32.mT @ (f32 / n32.unsqueeze(-1)) + torch.eye(2)
    assert bool(torch.linalg.cholesky_ex(m32).info != 0)  # the case this test is about
    chol = linalg.capacitance_cholesky(f32, n32)
    assert chol.dtype == torch.float32
    reference = torch.linalg.cholesky(factors.mT @ (factors / noise.unsqueeze(-1))
                                      + torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(chol.double(), reference, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capacitance_beyond_float64_raises_a_clear_error(dtype):
    """Two parallel loading columns of size 1e4 over noise 1e-8: M's eigenvalues are 1 and
    ~1e17, past float64's resolution, so its Cholesky fails even in float64. The error names
    the component, float64 and the noise (it was torch's bare 'not positive-definite')."""
    a = torch.tensor([3.0, 1.0, 2.0, -1.0], dtype=torch.float64) * 1e4
    factors = torch.stack([torch.ones(4, 2, dtype=torch.float64),
                           torch.stack([a, a], -1)]).to(dtype)  # [2, 4, 2]; component 1 fails
    noise = torch.full((2, 4), 1e-8, dtype=torch.float64).to(dtype)
    with pytest.raises(torch.linalg.LinAlgError,
                       match=r"\(component 1\).*float64.*1\.8e\+17.*noise variance"):
        linalg.capacitance_cholesky(factors, noise)


# --------------------------------------------------------------------- logsumexp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_matches_torch_on_wide_log_joints(dtype):
    """Mixture log-joints spanning thousands of nats (most terms underflow): the value and
    the gradient (the posterior) equal torch.logsumexp's, -inf rows give -inf."""
    from mfa.linalg import exp_floor, logsumexp

    g = torch.Generator().manual_seed(0)
    x = -3000.0 * torch.rand(64, 50, generator=g, dtype=dtype)
    x[:, 3] = torch.randn(64, generator=g, dtype=dtype)  # one live term per row
    x[:5, 7] = x[:5, 3] - 2.0  # and a second one in some rows
    x[10, :] = -math.inf
    x[11, :4] = -math.inf
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ours, ref = logsumexp(a), torch.logsumexp(b, -1)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)) and bool(ours[10] == -math.inf)
    fin = torch.isfinite(ref)
    tol = 10 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours[fin], ref[fin], rtol=tol, atol=tol)
    ours[fin].sum().backward()
    ref[fin].sum().backward()
    # the posterior probabilities, to a few ulps of 1 (tiny ones differ relatively by
    # ~|x|·eps, both ways of taking exp)
    torch.testing.assert_close(a.grad[fin], b.grad[fin], rtol=0, atol=tol)
    assert bool((a.grad[~fin] == 0).all())  # torch's own gradient there is NaN
    # the floor is a normal number ~5e8 times the smallest one (products with data stay
    # normal) and far below the dtype's resolution of 1
    floor = torch.exp(torch.tensor(exp_floor(dtype), dtype=dtype))
    tiny = torch.finfo(dtype).tiny
    assert 1e8 * tiny <= float(floor) < 1e9 * tiny and 50 * float(floor) < 1e-20


def test_logsumexp_other_dim_and_inf():
    from mfa.linalg import logsumexp

    x = torch.tensor([[0.0, 1.0], [math.inf, 0.0], [-5.0, -1e4]], dtype=torch.float64)
    torch.testing.assert_close(logsumexp(x.T, dim=0), torch.logsumexp(x, -1))
    assert logsumexp(x)[1] == math.inf


# --------------------------------------------------------------------- near-top refinement


def _image_like(noise: float, lat: int = 2):
    """Means in [0, 1] (as pixels) with noise variances far below them: the expanded
    diagonal quadratic form loses several nats in float32 (ε·κ between 1 and 20)."""
    from mfa import MixtureOfFactorAnalyzers

    g = gen(3)
    k, d = 4, 300
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 0.25, dtype=F64), torch.rand(k, d, generator=g, dtype=F64),
        0.01 * torch.randn(k, d, lat, generator=g, dtype=F64),
        torch.full((k, d), noise, dtype=F64))
    x, _ = truth.sample(2000, generator=g)
    params = [t.detach().float() for t in (truth.weights, truth.means, truth.factor_loadings,
                                           truth.noise_variance)]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    # exactly the float32 parameters, in float64
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))
    return x.float(), m32, m64


@pytest.mark.parametrize("lat", [0, 2])
def test_refined_log_prob_matches_float64_where_the_expansion_does_not(lat):
    import dataclasses

    from mfa._terms import component_log_prob_from_terms

    x, m32, m64 = _image_like(5e-7, lat)
    terms = m32.component_terms()
    assert terms.refine and not terms.precise  # 1 < ε·κ ≤ 20 nats
    with torch.no_grad():
        ref = m64.log_prob(x.double())
        refined = m32.log_prob(x).double()  # the residual form too, when L > 0
        diagonal_only = linalg.logsumexp(
            component_log_prob_from_terms(x, terms, exact=False)).double()
        plain = linalg.logsumexp(component_log_prob_from_terms(
            x, dataclasses.replace(terms, rounding=0.0), exact=False)).double()
    assert (plain - ref).abs().max() > 3.0  # the expansion alone loses nats here
    # Measured (L=2): 0.25 on an AMD EPYC, 0.74 on an Intel Xeon (MKL's AVX-512 float32
    # products round in another order); the Woodbury term's float32 products carry it.
    assert (diagonal_only - ref).abs().max() < 1.0
    assert (refined - ref).abs().max() < (1.0 if lat == 0 else 0.05)
    # the responsibilities too
    torch.testing.assert_close(m32.responsibilities(x).double(),
                               m64.responsibilities(x.double()), rtol=0, atol=1e-3)


def test_refined_log_prob_gradient_matches_float64():
    """Adam differentiates through the refinement (index_put): the gradients of the mean
    log-likelihood equal the float64 model's to float32's level (measured: 4e-4 relative for
    the means, 7e-3 for the noise, as the float64 form gives 5e-3; the plain expansion's
    noise gradient is off by 190 %)."""
    import dataclasses

    from mfa._terms import component_log_prob_from_terms

    x, m32, m64 = _image_like(5e-7)
    assert m32.component_terms().refine

    def gradients(model, rows, rounding=None, exact=False):
        model.zero_grad()
        terms = model.component_terms()
        if rounding is not None:
            terms = dataclasses.replace(terms, rounding=rounding)
        linalg.logsumexp(component_log_prob_from_terms(rows, terms, exact)).mean().backward()
        return {n: p.grad.double().clone() for n, p in model.named_parameters()}

    def error(got, ref, name):
        return ((got[name] - ref[name]).abs().max() / ref[name].abs().max()).item()

    ref = gradients(m64, x.double())
    plain = gradients(m32, x, rounding=0.0)
    assert error(plain, ref, "raw_noise") > 0.5
    # the trainers' path (exact=False) and the residual form's (exact=True)
    for refined in (gradients(m32, x), gradients(m32, x, exact=True)):
        for name, tol in (("loc", 2e-3), ("loadings", 2e-3), ("raw_noise", 2e-2)):
            assert error(refined, ref, name) < tol, name


def test_refine_near_top_recomputes_only_entries_near_the_top():
    """Entries within 30 + 8·rounding nats of their row's top become the direct sum; the
    others keep the expanded value."""
    g = gen(0)
    n, k, d = 6, 5, 7
    xc = torch.randn(n, d, generator=g, dtype=F64)
    means = torch.randn(k, d, generator=g, dtype=F64)
    inv_noise = torch.rand(k, d, generator=g, dtype=F64) + 0.5
    direct = ((xc[:, None] - means) ** 2 * inv_noise).sum(-1)  # [n, K]
    expanded = direct + 1000.0  # a stand-in with a large "error"
    log_joint = torch.zeros(n, k, dtype=F64)
    log_joint[:, 2:] = -100.0  # below the margin for rounding = 1 (38 nats)
    got = linalg.refine_near_top(expanded, log_joint, xc, means, inv_noise, rounding=1.0)
    torch.testing.assert_close(got[:, :2], direct[:, :2], rtol=1e-14, atol=0)
    torch.testing.assert_close(got[:, 2:], expanded[:, 2:], rtol=0, atol=0)
    # a larger rounding widens the margin: 30 + 8·10 = 110 nats > 100
    got = linalg.refine_near_top(expanded, log_joint, xc, means, inv_noise, rounding=10.0)
    torch.testing.assert_close(got, direct, rtol=1e-14, atol=0)


def test_precision_weighted_reference_keeps_the_expansion_in_float32():
    """Image-like components, each sharp (variance 1e-7) on its own background pixels (mean
    0) where the others' means are not 0: about the weighted mean of the means the expanded
    form would lose several nats (ε·κ > 1, the refinement's range); about the
    precision-weighted reference (mfa._terms.precision_weighted_reference) it loses far less
    than a nat, so log p needs no refinement and still matches float64."""
    from mfa import MixtureOfFactorAnalyzers

    g = gen(5)
    k, d = 4, 300
    means = 0.3 + 0.4 * torch.rand(k, d, generator=g, dtype=F64)
    noise = torch.full((k, d), 1e-2, dtype=F64)
    loadings = 0.02 * torch.randn(k, d, 2, generator=g, dtype=F64)
    for j in range(k):  # component j's background: pixels [75j, 75j + 50)
        means[j, 75 * j : 75 * j + 50] = 0.0
        noise[j, 75 * j : 75 * j + 50] = 1e-7
        loadings[j, 75 * j : 75 * j + 50] = 0.0
    weights = torch.full((k,), 1.0 / k, dtype=F64)
    truth = MixtureOfFactorAnalyzers.from_parameters(weights, means, loadings, noise)
    x, _ = truth.sample(1000, generator=g)
    params = [t.detach().float() for t in (truth.weights, truth.means, truth.factor_loadings,
                                           truth.noise_variance)]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))

    plain_mean = params[0] @ params[1]
    assert linalg.quadratic_rounding(params[1] - plain_mean, 1 / params[3]) > 1.0
    terms = m32.component_terms()
    assert terms.rounding < 0.1 and not terms.refine and not terms.precise
    with torch.no_grad():
        x = x.float()
        err = (m32.log_prob(x).double() - m64.log_prob(x.double())).abs().max()
    assert err < 0.05, err


def test_flush_subnormal_zeroes_only_subnormal_entries():
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor([tiny / 4, -tiny / 1000, tiny, -2 * tiny, 0.0, 1.5, float("nan"),
                           float("-inf")])
    out = linalg.flush_subnormal(values)
    assert out[:2].tolist() == [0.0, 0.0]  # the subnormal ones
    torch.testing.assert_close(out[2:], values[2:], equal_nan=True, rtol=0, atol=0)
    assert values[0] > 0  # a new tensor: the input is kept
    # While autograd records, the values pass unchanged (the same tensor).
    leaf = values[:2].clone().requires_grad_()
    assert linalg.flush_subnormal(leaf) is leaf
    with torch.no_grad():
        assert linalg.flush_subnormal(leaf).tolist() == [0.0, 0.0]


def test_component_terms_have_no_subnormal_whitened_factors():
    """Loadings of pixels that are constant within a component shrink towards 0 and their
    whitened factors turn subnormal (products with them run ~10× slower on some CPUs): the
    terms hold 0 there, and the densities still match a dense float64 reference."""
    from helpers import DenseMixture

    from mfa import MixtureOfFactorAnalyzers

    g = gen(3)
    k, d, lat = 3, 12, 2
    loadings = 0.3 * torch.randn(k, d, lat, generator=g)
    loadings[:, :4] = 1e-39 * torch.randn(k, 4, lat, generator=g)  # subnormal in float32
    noise = torch.full((k, d), 0.05)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k), torch.rand(k, d, generator=g), loadings, noise)
    tiny = torch.finfo(torch.float32).tiny
    raw = linalg.whitened_factors(loadings, noise, linalg.capacitance_cholesky(loadings, noise))
    assert ((raw != 0) & (raw.abs() < tiny)).any()  # the case this test is about
    with torch.no_grad():
        terms = model.component_terms()
        assert not ((terms.whitened != 0) & (terms.whitened.abs() < tiny)).any()
        x = torch.rand(50, d, generator=g)
        torch.testing.assert_close(model.log_prob(x).double(),
                                   DenseMixture.from_model(model).log_prob(x),
                                   rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------ residual form of the Woodbury term


@pytest.mark.parametrize("seed,lat", [(13, 3), (5, 1)])
def test_float32_log_prob_of_components_far_from_the_origin(seed, lat):
    """Means 350 units out, rows drawn from the model: the float32 log-density equals the
    float64 one of exactly the same parameters to 0.02 nats (measured 0.002). With the
    expanded form trusted up to an estimated 1 nat (before 2026-12) it was 1.38 nats off."""
    from helpers import DenseMixture, random_parameters

    from mfa import MixtureOfFactorAnalyzers

    p = random_parameters(4, 8, lat, seed=seed)
    p["means"] = 350.0 * p["means"]
    p32 = {name: t.float() for name, t in p.items()}
    m32 = MixtureOfFactorAnalyzers.from_parameters(**p32)
    m64 = MixtureOfFactorAnalyzers.from_parameters(**{n: t.double() for n, t in p32.items()})
    x, _ = m64.sample(200, generator=gen(seed))
    with torch.no_grad():
        ref = DenseMixture.from_model(m64).log_prob(x)
        got = m32.log_prob(x.float()).double()
    assert (got - ref).abs().max() < 0.02


def test_rounding_is_the_worst_components_not_the_average():
    """One of 20 components 17 units from the others (noise 1e-2): its ε·κ (0.16 nats) alone
    passes QUADRATIC_TOLERANCE, the average over the components (0.008) does not. Rows of
    that component: the float32 log-density equals the dense float64 one of the same
    parameters to 0.01 nats on every row (measured 1.6e-4; with the mean of κ over the
    components instead of its max the refinement was skipped and a row was 0.64 nats off),
    and so does the E-step's log-likelihood (measured 3e-5 nats a row; 2.3e-3 with the
    mean)."""
    from helpers import DenseMixture

    from mfa import MixtureOfFactorAnalyzers
    from mfa._data_stream import DataSource
    from mfa.em import EMTrainer

    g = gen(0)
    k, d, lat, n = 20, 50, 2, 2000
    means = torch.rand(k, d, generator=g, dtype=F64)
    means[0] += 17.0
    params = dict(weights=torch.full((k,), 1 / k), means=means.float(),
                  factor_loadings=0.05 * torch.randn(k, d, lat, generator=g),
                  noise_variance=torch.full((k, d), 1e-2))
    m32 = MixtureOfFactorAnalyzers.from_parameters(**params)
    x = (means[0] + 0.1 * torch.randn(n, d, generator=g, dtype=F64)).float()
    dense = DenseMixture.from_parameters(**params)  # exactly the float32 parameters
    with torch.no_grad():
        ref = dense.log_prob(x)
        got = m32.log_prob(x).double()
    assert (got - ref).abs().max().item() < 0.01
    for mode in ("centred", "float32"):
        stats = EMTrainer.e_step(m32, DataSource(x, m32, n), mode)
        assert abs(stats.log_likelihood.item() - ref.sum().item()) / n < 5e-4, mode
