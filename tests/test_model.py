"""MixtureOfFactorAnalyzers: densities, sampling and input validation.

Every numerical check compares against the dense float64 reference of ``tests/helpers.py``
(full covariances, ``torch.distributions.MultivariateNormal``), never the library's formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    F64,
    DenseMixture,
    assert_finite,
    gen,
    random_data,
    random_model,
    random_parameters,
)

from mfa import EMTrainer, MixtureOfFactorAnalyzers
from mfa._data_stream import DataSource

MFA = MixtureOfFactorAnalyzers

# (K, D, L, noise): K = 1 and K > 1, L = 0, L = 1, L = D, both noise models.
DENSITY_CASES = [
    (1, 4, 0, "diagonal"),
    (3, 5, 0, "isotropic"),
    (1, 5, 1, "diagonal"),
    (3, 6, 1, "isotropic"),
    (3, 5, 5, "diagonal"),
    (4, 6, 6, "isotropic"),
    (2, 8, 3, "diagonal"),
    (3, 7, 2, "isotropic"),
]


def _case_id(case):
    k, d, lat, noise = case
    return f"K{k}-D{d}-L{lat}-{noise[:3]}"


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_from_parameters_round_trips_the_constrained_parameters(noise):
    params = random_parameters(3, 5, 2, noise, seed=0)
    model = MFA.from_parameters(**params, noise=noise)
    assert (model.n_components, model.n_features, model.n_factors) == (3, 5, 2)
    assert model.noise == noise and model.min_noise == 0.0
    assert model.dtype == F64 and model.device == torch.device("cpu")
    torch.testing.assert_close(model.weights, params["weights"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.log_weights, params["weights"].log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.means, params["means"], rtol=0, atol=0)
    torch.testing.assert_close(model.factor_loadings, params["factor_loadings"], rtol=0, atol=0)
    expected_noise = params["noise_variance"].reshape(3, -1).expand(3, 5)
    torch.testing.assert_close(model.noise_variance, expected_noise, rtol=1e-12, atol=1e-14)
    dense = DenseMixture.from_parameters(**params)
    torch.testing.assert_close(model.covariance(), dense.covs, rtol=1e-12, atol=1e-12)
    raw_width = 5 if noise == "diagonal" else 1
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes == {
        "logits": (3,),
        "loc": (3, 5),
        "loadings": (3, 5, 2),
        "raw_noise": (3, raw_width),
    }


def test_isotropic_noise_accepts_k_k1_and_constant_kd_shapes():
    params = random_parameters(3, 4, 1, "isotropic", seed=1)
    nv = params.pop("noise_variance")
    ref = MFA.from_parameters(**params, noise_variance=nv, noise="isotropic")
    for shaped in (nv[:, None], nv[:, None].expand(3, 4).contiguous()):
        other = MFA.from_parameters(**params, noise_variance=shaped, noise="isotropic")
        torch.testing.assert_close(other.noise_variance, ref.noise_variance, rtol=0, atol=0)


def test_min_noise_is_a_floor_of_the_noise_variance():
    params = random_parameters(2, 3, 1, seed=2)
    model = MFA.from_parameters(**params, min_noise=0.1)
    torch.testing.assert_close(model.noise_variance, params["noise_variance"], rtol=1e-12, atol=0)
    with torch.no_grad():
        model.raw_noise.fill_(-50.0)
    assert bool((model.noise_variance >= 0.1).all())
    torch.testing.assert_close(
        model.noise_variance, torch.full((2, 3), 0.1, dtype=F64), rtol=1e-12, atol=0
    )


def test_default_constructor_and_config_round_trip():
    model = MFA(3, 5, 2, generator=gen(0))
    assert model.dtype == torch.get_default_dtype()
    torch.testing.assert_close(model.weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(model.means, torch.zeros(3, 5))
    torch.testing.assert_close(model.noise_variance, torch.full((3, 5), 1.0 + 1e-6))
    # Same generator seed, same loadings; a different seed, different loadings.
    assert torch.equal(model.loadings, MFA(3, 5, 2, generator=gen(0)).loadings)
    assert not torch.equal(model.loadings, MFA(3, 5, 2, generator=gen(1)).loadings)
    assert model.config() == {
        "n_components": 3,
        "n_features": 5,
        "n_factors": 2,
        "noise": "diagonal",
        "min_noise": 1e-6,
    }

    trained = random_model(3, 5, 2, "isotropic", seed=3)
    rebuilt = MFA(**trained.config(), dtype=F64)
    rebuilt.load_state_dict(trained.state_dict())
    x = random_data(20, trained)
    torch.testing.assert_close(rebuilt.log_prob(x), trained.log_prob(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- densities


@pytest.mark.parametrize("case", DENSITY_CASES, ids=_case_id)
def test_log_prob_matches_dense_reference(case):
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=10)
    ref = DenseMixture.from_model(model)
    x = random_data(64, model, seed=11)
    lp = model.log_prob(x)
    assert_finite(lp, (64,))
    torch.testing.assert_close(lp, ref.log_prob(x), rtol=1e-6, atol=1e-9)
    # The reference built straight from the parameters agrees too (no library transform).
    params = random_parameters(k, d, lat, noise, seed=10)
    torch.testing.assert_close(
        lp, DenseMixture.from_parameters(**params).log_prob(x), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("case", DENSITY_CASES, ids=_case_id)
def test_component_quantities_match_dense_reference(case):
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=12)
    ref = DenseMixture.from_model(model)
    x = random_data(50, model, seed=13)
    clp = model.component_log_prob(x)
    assert_finite(clp, (50, k))
    ref_clp = ref.component_log_prob(x)
    torch.testing.assert_close(clp, ref_clp, rtol=1e-6, atol=1e-9)

    resp = model.responsibilities(x)
    assert_finite(resp, (50, k))
    torch.testing.assert_close(resp.sum(-1), torch.ones(50, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(resp, torch.softmax(ref_clp, -1), rtol=1e-6, atol=1e-10)

    pred = model.predict(x)
    assert pred.dtype == torch.int64 and pred.shape == (50,)
    assert torch.equal(pred, ref_clp.argmax(-1))

    torch.testing.assert_close(model.score_outliers(x), -ref.log_prob(x), rtol=1e-6, atol=1e-9)

    dist = model.to_distribution()
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model.covariance(), ref.covs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_log_prob_far_from_the_origin_float64(noise):
    model = random_model(3, 6, 2, noise, seed=14, offset=1e3)
    x = random_data(100, model, seed=15)
    assert float(x.mean()) > 900
    ref = DenseMixture.from_model(model)
    torch.testing.assert_close(model.log_prob(x), ref.log_prob(x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("lat", [0, 2])
@pytest.mark.parametrize("far", [1e4, 1e5])
def test_float64_sharp_components_far_apart(far, lat):
    """Two sharp components (noise 1e-6) 2 standard deviations apart, a third ``far`` away:
    the diagonal form expanded around one reference point lost ``ε·κ`` in float64 too
    (0.25 nats at 1e4, 35 at 1e5, where the responsibilities went to the wrong component);
    the rows are exact, so float64 must match a direct float64 sum."""
    d = 50
    gen = torch.Generator().manual_seed(0)
    means = torch.zeros(3, d, dtype=F64)
    means[1] += 2e-3
    means[2] += far
    loadings = 1e-3 * torch.randn(3, d, lat, generator=gen, dtype=F64)
    noise = torch.full((3, d), 1e-6, dtype=F64)
    model = MFA.from_parameters(torch.full((3,), 1 / 3, dtype=F64), means, loadings, noise)
    x = 1e-3 + 1e-3 * torch.randn(100, d, generator=gen, dtype=F64)  # between the near two
    ref = DenseMixture.from_model(model)
    expected = ref.component_log_prob(x)  # [n, K]
    torch.testing.assert_close(model.log_prob(x), torch.logsumexp(expected, -1), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(model.responsibilities(x), torch.softmax(expected, -1),
                               rtol=0, atol=1e-7)
    observed = torch.ones_like(x, dtype=torch.bool)
    observed[:, :5] = False  # the masked path expands the same form
    hidden_too = DenseMixture.from_parameters(model.weights, means[:, 5:], loadings[:, 5:],
                                          noise[:, 5:])
    torch.testing.assert_close(model.observed_log_prob(x, observed),
                               hidden_too.log_prob(x[:, 5:]), rtol=0, atol=1e-6)
    # the E-step's log-likelihood and masses (the same expansion)
    stats = EMTrainer.e_step(model, DataSource(x, model, 100), "float64")
    torch.testing.assert_close(stats.log_likelihood, torch.logsumexp(expected, -1).sum(),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(stats.mass, torch.softmax(expected, -1).sum(0), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("far", [1e4, 1e5])
def test_float64_far_apart_with_loadings_large_beside_the_noise(far):
    """Means ``far`` apart (10⁹–10¹⁰ noise standard deviations) under loadings of 0.1: the
    Woodbury term's ``x @ Bᵀ − B μ`` cancels as the diagonal form does, and with only the
    diagonal form recomputed float64 ``log_prob`` was 0.03 / 0.29 nats off and
    ``observed_log_prob`` 0.03 / 0.39 (the README promises 0.01)."""
    k, d, lat = 3, 30, 2
    gen = torch.Generator().manual_seed(0)
    means = far * torch.randn(k, d, generator=gen, dtype=F64)
    loadings = 0.1 * torch.randn(k, d, lat, generator=gen, dtype=F64)
    noise = torch.full((k, d), 1e-10, dtype=F64)
    weights = torch.full((k,), 1 / k, dtype=F64)
    model = MFA.from_parameters(weights, means, loadings, noise)
    x = model.sample(30, generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(model.log_prob(x), DenseMixture.from_model(model).log_prob(x),
                               rtol=0, atol=1e-3)
    observed = torch.rand(30, d, generator=gen) > 0.4
    for row, seen in zip(x, observed, strict=True):  # each row's observed block, dense
        dense = DenseMixture.from_parameters(weights, means[:, seen], loadings[:, seen],
                                             noise[:, seen])
        torch.testing.assert_close(model.observed_log_prob(row[None], seen[None]),
                                   dense.log_prob(row[seen][None]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("lat", [0, 2])
def test_float32_log_prob_beside_a_component_far_beyond_float32s_reach(lat):
    """A light component 1e10 away (outlier rows, a sentinel value) pulls the reference point
    there; x − c and μ − c then rounded to the same value for every row near the others, and
    every such row scored −3.6858 (the float64 path started from the rounded differences)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.stack([torch.zeros(4), torch.full((4,), 1e10)])
    loadings = 0.5 * torch.randn(2, 4, lat, generator=gen)
    model = MFA.from_parameters(torch.tensor([0.99, 0.01]), means, loadings, torch.ones(2, 4))
    x = torch.randn(50, 4, generator=gen)
    expected = DenseMixture.from_model(model).log_prob(x.double())  # the float32 parameters
    assert float(expected.std()) > 0.5  # (the rows differ)
    torch.testing.assert_close(model.log_prob(x).double(), expected, rtol=1e-6, atol=1e-5)


def test_float32_just_past_its_limit_keeps_the_cheaper_float64_form(monkeypatch):
    """Between REFINE_LIMIT and FLOAT64_LIMIT (a default Fashion-MNIST fit at K = 200 reached
    20) the centred terms' float64 form stays: every term in float64 cost Adam's steps 1.8x
    there, for 0.005 nats at most."""
    from mfa import linalg
    from mfa._terms import ComponentTerms

    gen = torch.Generator().manual_seed(0)
    means = torch.zeros(3, 50, dtype=F64)
    means[1] += 2e-3
    means[2] += 4.0
    model = MFA.from_parameters(torch.full((3,), 1 / 3, dtype=F64), means,
                                torch.zeros(3, 50, 0, dtype=F64),
                                torch.full((3, 50), 1e-6, dtype=F64)).float()
    terms = model.component_terms()
    assert terms.precise and linalg.REFINE_LIMIT < terms.rounding < linalg.FLOAT64_LIMIT
    monkeypatch.setattr(ComponentTerms, "in_float64", property(lambda self: 1 / 0))
    x = (1e-3 + 1e-3 * torch.randn(100, 50, generator=gen)).float()
    expected = DenseMixture.from_model(model).log_prob(x.double())
    torch.testing.assert_close(model.log_prob(x).double(), expected, rtol=0, atol=0.005)


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("case", [(3, 5, 2, "diagonal"), (4, 20, 5, "isotropic"),
                                  (2, 30, 0, "diagonal"), (3, 12, 12, "diagonal")],
                         ids=_case_id)
def test_log_prob_float32_model_vs_float64_reference(case, offset):
    """Measured: max relative error about 1e-6 (also at offset 1e3, thanks to the centring).

    The tolerance, 2e-5 relative, is 20x that, while adding ``w`` instead of ``log w`` to the
    component terms would be off by more than 2e-3 relative on every one of these rows.
    """
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=16, dtype=torch.float32, offset=offset)
    ref = DenseMixture.from_model(model)  # the float32 parameters, exactly, in float64
    x = random_data(200, model, seed=17)
    assert x.dtype == torch.float32
    lp = model.log_prob(x)
    assert_finite(lp, (200,), torch.float32)
    expected = ref.log_prob(x)
    torch.testing.assert_close(lp.double(), expected, rtol=2e-5, atol=1e-4)
    # The tolerance is tight enough to catch "w instead of log w" on every row.
    wrong = torch.logsumexp(ref.component_log_prob(x) - ref.weights.log() + ref.weights, -1)
    assert bool(((wrong - expected).abs() > 1e-4 + 2e-5 * expected.abs()).all())


def test_log_prob_zero_weight_component_is_ignored():
    params = random_parameters(3, 4, 2, seed=18)
    params["weights"] = torch.tensor([0.25, 0.0, 0.75], dtype=F64)
    model = MFA.from_parameters(**params)
    x = random_data(30, model, seed=19)
    ref = DenseMixture.from_parameters(**params)
    torch.testing.assert_close(model.log_prob(x), ref.log_prob(x), rtol=1e-6, atol=1e-9)
    assert bool((model.responsibilities(x)[:, 1] == 0).all())


def test_batched_equals_unbatched_and_leading_dims():
    model = random_model(3, 5, 2, seed=20)
    x = random_data(6, model, seed=21)
    full = model.log_prob(x)
    for i in range(6):
        single = model.log_prob(x[i])
        assert single.shape == ()
        torch.testing.assert_close(single, full[i], rtol=1e-13, atol=1e-13)
    x23 = x.reshape(2, 3, 5)
    torch.testing.assert_close(model.log_prob(x23), full.reshape(2, 3), rtol=1e-13, atol=1e-13)
    clp = model.component_log_prob(x23)
    assert clp.shape == (2, 3, 3)
    torch.testing.assert_close(clp.reshape(6, 3), model.component_log_prob(x), rtol=0, atol=1e-13)
    assert model.responsibilities(x23).shape == (2, 3, 3)
    assert model.predict(x23).shape == (2, 3)
    assert model.score_outliers(x23).shape == (2, 3)
    assert model.log_prob(torch.zeros(0, 5, dtype=F64)).shape == (0,)


@pytest.mark.parametrize("case", [(3, 5, 2, "diagonal"), (4, 6, 0, "isotropic"),
                                  (2, 4, 4, "diagonal")], ids=_case_id)
def test_chunked_equals_unchunked(case):
    k, d, lat, noise = case
    big = random_model(k, d, lat, noise, seed=22)
    tiny = random_model(k, d, lat, noise, seed=22, chunk_elements=50)
    assert tiny.chunk_size() < 10  # really many chunks for 101 rows
    x = random_data(101, big, seed=23)
    torch.testing.assert_close(tiny.log_prob(x), big.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        tiny.component_log_prob(x), big.component_log_prob(x), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        tiny.responsibilities(x), big.responsibilities(x), rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------------- gradients


class _LogProb(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.log_prob(x)


@pytest.mark.parametrize("case", [(3, 5, 2, "diagonal"), (2, 4, 0, "isotropic"),
                                  (2, 3, 3, "isotropic")], ids=_case_id)
def test_gradients_are_finite(case):
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=24)
    x = random_data(40, model, seed=25).requires_grad_(True)
    model.log_prob(x).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_finite(p.grad, p.shape)
    assert_finite(x.grad, x.shape)


@pytest.mark.parametrize("case", [(2, 3, 2, "diagonal"), (2, 3, 0, "diagonal"),
                                  (3, 3, 1, "isotropic")], ids=_case_id)
def test_gradcheck_log_prob_parameters_and_x(case):
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=26)
    wrapper = _LogProb(model)
    x = random_data(4, model, seed=27, scale=1.0)
    names = ["logits", "loc", "loadings", "raw_noise"]
    inputs = tuple(
        getattr(model, n).detach().clone().requires_grad_(True) for n in names
    )

    def f(*params):
        state = {f"model.{n}": p for n, p in zip(names, params, strict=True)}
        return torch.func.functional_call(wrapper, state, (x,))

    assert torch.autograd.gradcheck(f, inputs)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(model.log_prob, (xg,))


# ---------------------------------------------------------------------- sampling


def _check_moments(samples, mean, cov, n_sigma=5.0):
    """Sample mean and covariance within ``n_sigma`` standard errors of the truth.

    The standard error of each covariance entry is estimated from the samples themselves
    (the spread of the centred products).
    """
    n = samples.shape[0]
    sd = cov.diagonal().sqrt()
    err_mean = (samples.mean(0) - mean).abs()
    assert bool((err_mean <= n_sigma * sd / math.sqrt(n)).all()), (err_mean, sd / math.sqrt(n))
    centred = samples - mean
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)  # [n, D, D]
    se_cov = products.std(0) / math.sqrt(n)
    err_cov = (products.mean(0) - cov).abs()
    assert bool((err_cov <= n_sigma * se_cov).all()), (err_cov / se_cov).max()


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_sample_moments_and_component_frequencies(noise):
    model = random_model(3, 4, 2, noise, seed=30)
    ref = DenseMixture.from_model(model)
    n = 200_000
    x, comp = model.sample(n, generator=gen(31))
    assert_finite(x, (n, 4))
    assert comp.dtype == torch.int64 and comp.shape == (n,)
    _check_moments(x, ref.mean(), ref.covariance())
    freq = torch.bincount(comp, minlength=3).double() / n
    se = (ref.weights * (1 - ref.weights) / n).sqrt()
    assert bool(((freq - ref.weights).abs() <= 5 * se).all()), (freq, ref.weights)
    # Given the component, the sample is from that component.
    for k in range(3):
        xk = x[comp == k]
        sd = ref.covs[k].diagonal().sqrt()
        assert bool(((xk.mean(0) - ref.means[k]).abs() <= 5 * sd / math.sqrt(len(xk))).all())


def test_sample_l0_and_float32():
    model = random_model(2, 3, 0, seed=32, dtype=torch.float32)
    ref = DenseMixture.from_model(model)
    x, _ = model.sample(100_000, generator=gen(33))
    assert_finite(x, (100_000, 3), torch.float32)
    _check_moments(x.double(), ref.mean(), ref.covariance())


def test_sample_is_reproducible_with_a_seed():
    model = random_model(3, 4, 2, seed=34)
    a, ca = model.sample(100, generator=gen(35))
    b, cb = model.sample(100, generator=gen(35))
    c, _ = model.sample(100, generator=gen(36))
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert not torch.equal(a, c)


def test_sample_zero_rows():
    """Regression: sample(0) raised from torch.multinomial although n=0 passes validation."""
    model = random_model(2, 3, 1, seed=37)
    x, comp = model.sample(0, generator=gen(0))
    assert x.shape == (0, 3) and comp.shape == (0,)


# ---------------------------------------------------------------------- validation


DATA_METHODS = ["log_prob", "component_log_prob", "responsibilities", "predict", "score_outliers"]


@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_validation_errors(method):
    model = random_model(2, 4, 1, seed=50)
    fn = getattr(model, method)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4\] .*got \(3, 5\)"):
        fn(torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4\] .*got \(\)"):
        fn(torch.tensor(1.0, dtype=F64))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .*torch\.int64"):
        fn(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x has dtype torch\.float32 but the model has dtype "
                                        r"torch\.float64"):
        fn(torch.zeros(3, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        fn([[0.0] * 4])
    bad = torch.zeros(3, 4, dtype=F64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value\(s\).*index \(1, 2\)"):
        fn(bad)
    bad[1, 2] = float("inf")
    bad[0, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"x contains 2 non-finite value\(s\).*index \(0, 0\)"):
        fn(bad)


def _bad_parameter_cases():
    p = random_parameters(3, 4, 2, seed=51)
    k = {**p}

    def with_(**changes):
        return {**k, **changes}

    w = p["weights"]
    return [
        ("sum", with_(weights=w * 1.1), ValueError, r"weights must sum to one, got sum 1\.1"),
        ("negative", with_(weights=torch.tensor([1.2, -0.2, 0.0], dtype=F64)), ValueError,
         r"weights must be non-negative, got minimum -0\.2"),
        ("weights-shape", with_(weights=torch.full((4,), 0.25, dtype=F64)), ValueError,
         r"weights must have shape \[3\], got \(4,\)"),
        ("weights-dtype", with_(weights=w.float()), TypeError, r"weights has dtype torch\.float32"),
        ("weights-nan", with_(weights=torch.tensor([0.5, float("nan"), 0.5], dtype=F64)),
         ValueError, r"weights contains 1 non-finite"),
        ("noise-zero", with_(noise_variance=p["noise_variance"] * 0), ValueError,
         r"noise_variance must be > min_noise=0\.0"),
        ("noise-negative", with_(noise_variance=-p["noise_variance"]), ValueError,
         r"noise_variance must be > min_noise"),
        ("noise-shape", with_(noise_variance=p["noise_variance"][:, :3]), ValueError,
         r"noise_variance must have shape \[K, D\] = \[3, 4\], got \(3, 3\)"),
        ("noise-inf", with_(noise_variance=p["noise_variance"] / 0), ValueError,
         r"noise_variance contains 12 non-finite"),
        ("means-1d", with_(means=p["means"][0]), ValueError,
         r"means must have shape \[K, D\], got \(4,\)"),
        ("means-type", with_(means=p["means"].tolist()), TypeError,
         r"means must be a torch\.Tensor, got list"),
        ("loadings-2d", with_(factor_loadings=p["factor_loadings"][:, :, 0]), ValueError,
         r"factor_loadings must have shape \[K, D, L\] = \[3, 4, L\], got \(3, 4\)"),
        ("loadings-D", with_(factor_loadings=p["factor_loadings"][:, :3]), ValueError,
         r"factor_loadings must have shape \[K, D, L\] = \[3, 4, L\], got \(3, 3, 2\)"),
        ("too-many-factors", with_(factor_loadings=torch.zeros(3, 4, 5, dtype=F64)), ValueError,
         r"n_factors must be <= n_features \(4\), got 5"),
    ]


@pytest.mark.parametrize("name,params,exc,match", _bad_parameter_cases(),
                         ids=[c[0] for c in _bad_parameter_cases()])
def test_from_parameters_validation(name, params, exc, match):
    with pytest.raises(exc, match=match):
        MFA.from_parameters(**params)


def test_from_parameters_accepts_float64_weights_from_float32_ones():
    """Weights normalised in float32 sum to one only within ~1e-7 once in float64; a float64
    model takes them (softmax renormalises), and still refuses a sum off by 1e-5."""
    p = random_parameters(3, 4, 2, seed=53)
    w32 = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float32)
    assert w32.double().sum().item() != 1.0
    model = MFA.from_parameters(**{**p, "weights": w32.double()})
    torch.testing.assert_close(model.weights, w32.double() / w32.double().sum())
    with pytest.raises(ValueError, match="weights must sum to one"):
        MFA.from_parameters(**{**p, "weights": w32.double() * (1 + 1e-5)})


@pytest.mark.parametrize("k", [10, 10_000, 100_000])
def test_weights_off_by_half_a_percent_are_refused_at_any_k(k):
    """The sum's tolerance grew like √K (3 % at K = 100,000): weights summing to 1.005 were
    taken and silently renormalised from K = 10,000 on. Honest float32 weights (a float32
    softmax) are still taken at every K."""
    logits = torch.randn(k, generator=torch.Generator().manual_seed(k))
    honest = torch.softmax(logits, 0)
    params = {"weights": honest, "means": torch.zeros(k, 2), "factor_loadings":
              torch.zeros(k, 2, 0), "noise_variance": torch.ones(k, 2)}
    model = MFA.from_parameters(**params)
    torch.testing.assert_close(model.weights, honest)
    with pytest.raises(ValueError, match=r"weights must sum to one, got sum 1\.00"):
        MFA.from_parameters(**{**params, "weights": honest * 1.005})
    # float32 weights given to a float64 model: a float32 softmax's CPU sum is not
    # pairwise (2.6e-5 off at K = 500,000, one thread): float32-valued weights that far off
    # take float32's tolerance (float64's refused them)
    as64 = {k: v.double() for k, v in params.items()}
    MFA.from_parameters(**as64)
    off = (honest.double() * (1 + 3e-5)).float().double()
    assert abs(off.sum().item() - 1) > 1e-6 * math.log2(k)  # (beyond float64's tolerance)
    MFA.from_parameters(**{**as64, "weights": off})
    with pytest.raises(ValueError, match=r"weights must sum to one"):
        MFA.from_parameters(**{**as64, "weights": honest.double() * 1.005})


def test_from_parameters_noise_validation():
    p = random_parameters(3, 4, 2, seed=52)
    with pytest.raises(ValueError, match=r"noise must be one of \('diagonal', 'isotropic'\), "
                                         r"got 'spherical'"):
        MFA.from_parameters(**p, noise="spherical")
    # noise_variance <= min_noise (equality included)
    nv = torch.full((3, 4), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"noise_variance must be > min_noise=0\.5"):
        MFA.from_parameters(**{**p, "noise_variance": nv}, min_noise=0.5)
    with pytest.raises(ValueError, match=r"noise_variance must be > min_noise=0\.6"):
        MFA.from_parameters(**{**p, "noise_variance": nv}, min_noise=0.6)
    MFA.from_parameters(**{**p, "noise_variance": nv}, min_noise=0.4)
    # isotropic shapes
    iso = {**p, "noise_variance": p["noise_variance"]}
    with pytest.raises(ValueError, match=r"must be constant along D for isotropic noise"):
        MFA.from_parameters(**iso, noise="isotropic")
    with pytest.raises(ValueError, match=r"noise_variance for isotropic noise must have shape "
                                         r"\[3\], \[3, 1\] or \[3, 4\], got \(2,\)"):
        MFA.from_parameters(**{**p, "noise_variance": torch.ones(2, dtype=F64)},
                            noise="isotropic")


def test_constructor_validation():
    with pytest.raises(ValueError, match=r"n_components must be >= 1, got 0"):
        MFA(0, 3, 1)
    with pytest.raises(ValueError, match=r"n_features must be >= 1, got 0"):
        MFA(2, 0, 0)
    with pytest.raises(ValueError, match=r"n_factors must be >= 0, got -1"):
        MFA(2, 3, -1)
    with pytest.raises(TypeError, match=r"n_components must be an int, got float"):
        MFA(2.0, 3, 1)
    with pytest.raises(ValueError, match=r"n_factors must be <= n_features \(3\), got 4"):
        MFA(2, 3, 4)
    with pytest.raises(ValueError, match=r"noise must be one of .* got 'full'"):
        MFA(2, 3, 1, noise="full")
    with pytest.raises(ValueError, match=r"min_noise must be a finite float >= 0, got -1"):
        MFA(2, 3, 1, min_noise=-1.0)
    with pytest.raises(ValueError, match=r"min_noise must be a finite float >= 0, got True"):
        MFA(2, 3, 1, min_noise=True)  # was read as 1.0
    import numpy as np  # (numpy numbers pass, as everywhere else: np.float32 was refused)

    assert MFA(2, 3, 1, min_noise=np.float32(0.5)).min_noise == 0.5
    with pytest.raises(ValueError, match=r"min_noise must be a finite float >= 0"):
        MFA(2, 3, 1, min_noise=np.float32("nan"))
    p = random_parameters(2, 3, 1)  # integer means: the error blamed the weights' dtype
    with pytest.raises(TypeError, match=r"means must be floating point .* got torch.int64"):
        MFA.from_parameters(p["weights"], p["means"].long(), p["factor_loadings"],
                            p["noise_variance"])
    with pytest.raises(ValueError, match=r"chunk_elements must be >= 1, got 0"):
        MFA(2, 3, 1, chunk_elements=0)


def test_constructor_refuses_a_generator_that_is_not_one():
    """generator=0 failed with AttributeError "'int' object has no attribute 'device'"."""
    for bad in (0, "0"):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got"):
            MFA(2, 3, 1, generator=bad)


def test_min_noise_beyond_the_dtype_range_is_refused_at_construction():
    """min_noise=1e39 became inf in float32 (every noise variance inf), which the first
    evaluation blamed on "a training run that diverged"; 10**400 raised an OverflowError."""
    with pytest.raises(ValueError, match=r"min_noise=1e\+39 is beyond the range of torch.float32"):
        MFA(2, 3, 1, min_noise=1e39)
    p = random_parameters(2, 3, 1)
    with pytest.raises(ValueError, match=r"min_noise=1e\+39 is beyond the range of torch.float32"):
        MFA.from_parameters(p["weights"].float(), p["means"].float(),
                            p["factor_loadings"].float(), p["noise_variance"].float() + 2e39,
                            min_noise=1e39)
    with pytest.raises(ValueError, match="min_noise must be a finite float >= 0, got 1000"):
        MFA(2, 3, 1, min_noise=10**400)
    wide = MFA(2, 3, 1, min_noise=1e39, dtype=torch.float64)  # within float64's range
    assert wide.noise_variance.min().item() == pytest.approx(1e39)
    with pytest.raises(ValueError, match="min_noise=1e\\+39 is beyond the range of torch.float32"):
        wide.float()
    assert wide.dtype == torch.float64  # (refused before any parameter changed)


def test_a_meta_model_is_refused_at_evaluation_naming_its_device():
    """A meta model is legitimate before load_state_dict(assign=True), but evaluating it
    failed inside torch with "Tensor.item() cannot be called on meta tensors"."""
    source = random_model(2, 3, 1, seed=5)
    model = MFA(**source.config(), device="meta")
    rows = torch.zeros(4, 3, device="meta")
    observed = torch.ones(4, 3, dtype=torch.bool, device="meta")
    calls = [lambda: model.log_prob(rows), lambda: model.log_prob(torch.zeros(4, 3)),
             lambda: model.responsibilities(rows), lambda: model.sample(2),
             lambda: model.conditional_mean(rows, observed),
             lambda: model.observed_log_prob(rows, observed), lambda: model.marginal([0]),
             lambda: model.condition([0], torch.zeros(1, device="meta")),
             lambda: model.to_distribution(), lambda: model.component_terms()]
    for call in calls:
        with pytest.raises(ValueError, match="device 'meta'.*not one this library runs on"):
            call()
    model.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(4, 3, dtype=source.dtype)
    torch.testing.assert_close(model.log_prob(x), source.log_prob(x))


def test_sample_validation():
    model = random_model(2, 3, 1, seed=53)
    with pytest.raises(ValueError, match=r"n must be >= 0, got -1"):
        model.sample(-1)
    with pytest.raises(TypeError, match=r"n must be an int, got float"):
        model.sample(2.0)


@pytest.mark.parametrize("with_noise", ["no", None, 0])
def test_sample_refuses_a_with_noise_that_is_not_a_bool(with_noise):
    """with_noise was never checked: 'no' kept the noise (as True), None dropped it."""
    model = random_model(2, 3, 1, seed=53)
    with pytest.raises(TypeError, match=rf"with_noise must be True or False, got "
                                        rf"{with_noise!r}"):
        model.sample(3, gen(0), with_noise=with_noise)
    with pytest.raises(TypeError, match=r"with_noise must be True or False"):
        model.sample(0, with_noise=with_noise)  # (before the early return for n = 0)


@pytest.mark.parametrize("flag", [np.False_, np.True_, torch.tensor(False), torch.tensor([True])])
def test_sample_takes_numpy_and_tensor_bools(flag):
    """The bool check refused numpy's and one-element tensors' bools, which worked before."""
    model = MFA.from_parameters(**random_parameters(2, 3, 1, seed=7))
    torch.testing.assert_close(model.sample(5, gen(0), with_noise=flag),
                               model.sample(5, gen(0), with_noise=bool(flag)))


def test_failed_set_parameters_changes_nothing():
    model = random_model(3, 4, 2, seed=55)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_parameters(3, 4, 2, seed=56)
    failures = [
        ({**good, "noise_variance": -good["noise_variance"]}, ValueError),
        ({**good, "factor_loadings": good["factor_loadings"][:, :, :1]}, ValueError),
        ({**good, "weights": good["weights"] * 2}, ValueError),
        ({**good, "means": good["means"].float()}, TypeError),
        ({**good, "noise_variance": good["noise_variance"].float()}, TypeError),
    ]
    for params, exc in failures:
        with pytest.raises(exc):
            model.set_parameters(**params)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    # A successful partial update writes only what it was given.
    model.set_parameters(means=good["means"])
    assert torch.equal(model.means, good["means"])
    assert torch.equal(model.loadings, before["loadings"])
    assert torch.equal(model.raw_noise, before["raw_noise"])
    model.set_parameters(**good)
    x = random_data(10, model, seed=57)
    torch.testing.assert_close(
        model.log_prob(x), DenseMixture.from_parameters(**good).log_prob(x), rtol=1e-6, atol=1e-9
    )


# ---------------------------------------------------------------------- structure and defects


def _imports_of(path):
    """Every ``mfa.*`` module a source file imports, at any depth (lazy imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfa"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mfa"))
    return found


def test_model_layer_does_not_import_inference_or_kde():
    # The model and the modules it is built from sit below mfa.inference and mfa.kde (no
    # import cycle, not even a lazy one inside a method).
    from pathlib import Path

    import mfa

    root = Path(mfa.__file__).parent
    for name in ("model", "conditioning", "_terms", "parameters", "sampling", "linalg"):
        imported = _imports_of(root / f"{name}.py")
        assert not {m for m in imported if m.startswith(("mfa.inference", "mfa.kde"))}, name
    assert "mfa.model" not in _imports_of(root / "conditioning.py")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused(dtype):
    # They used to be accepted and then fail in Cholesky ("not implemented for 'Half'").
    match = rf"cannot use dtype {dtype}.*'torch\.float32', 'torch\.float64'"
    with pytest.raises(TypeError, match=match):
        MFA(2, 3, 1, dtype=dtype)
    params = random_parameters(2, 3, 1, seed=60)
    with pytest.raises(TypeError, match=match):
        MFA.from_parameters(**{k: v.to(dtype) for k, v in params.items()})
    model = MFA.from_parameters(**params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=match):
        model.to(dtype)
    with pytest.raises(TypeError, match=match):
        model.half() if dtype == torch.float16 else model.bfloat16()
    for k, v in model.state_dict().items():  # nothing was converted
        assert v.dtype == F64 and torch.equal(v, before[k]), k
    assert model.float().dtype == torch.float32 and model.double().dtype == F64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_is_told_to_convert_the_data(dtype):
    # The message said "convert one of them", and converting the model is refused.
    model = MFA(2, 3, 1)
    x = torch.zeros(4, 3, dtype=dtype)
    for call in (model.log_prob, model.responsibilities):
        with pytest.raises(TypeError, match=r"convert the data: x\.to\(torch\.float32\)"):
            call(x)
    with pytest.raises(TypeError, match="convert one of them"):  # float64 into float32
        model.log_prob(x.double())


def test_noise_that_underflows_is_a_clear_error_not_nan():
    x = torch.zeros(4, 3)
    # min_noise + softplus(raw_noise) underflows to exactly 0 in float32.
    model = MFA(2, 3, 1, min_noise=0.0, dtype=torch.float32)
    with torch.no_grad():
        model.raw_noise.fill_(-200.0)
    match = r"noise variance underflowed to 0 in torch\.float32 .*component 0, feature 0"
    for call in (model.log_prob, lambda v: model.conditional_mean(v, v == 0),
                 lambda v: model.observed_log_prob(v, v == 0)):
        with pytest.raises(ValueError, match=match):
            call(x)
    # A subnormal variance: 1/d overflows to inf and log_prob used to be NaN.
    params = random_parameters(2, 3, 1, seed=61, dtype=torch.float32)
    params["noise_variance"] = torch.full((2, 3), 1e-40)
    with pytest.raises(ValueError, match=r"noise variance is so small that 1/d overflows in "
                                         r"torch\.float32"):
        MFA.from_parameters(**params)
    # The same variances are fine in float64.
    params64 = {k: v.double() for k, v in params.items()}
    params64["weights"] = params64["weights"] / params64["weights"].sum()
    assert bool(torch.isfinite(MFA.from_parameters(**params64).log_prob(x.double())).all())


@pytest.mark.parametrize("d", [3, 8])
def test_float32_inputs_too_large_are_a_clear_error(d):
    model = random_model(2, d, 1, seed=62, dtype=torch.float32)
    ok = torch.full((3, d), 1e17)
    assert bool(torch.isfinite(model.log_prob(ok)).all())  # large but representable
    huge = torch.full((3, d), 1e19 if d == 8 else 1e20)
    observed = torch.ones(3, d, dtype=torch.bool)
    observed[:, 0] = False
    match = r"input values too large for torch\.float32: .*overflow .*largest \|x\| is 1e\+(19|20)"
    calls = {
        "log_prob": lambda: model.log_prob(huge),
        "responsibilities": lambda: model.responsibilities(huge),
        "predict": lambda: model.predict(huge),
        "condition": lambda: model.condition([1, 2], huge[0, 1:3]),
        "observed_log_prob": lambda: model.observed_log_prob(huge, observed),
        "conditional_mean": lambda: model.conditional_mean(huge, observed),
        # used to fail inside torch.multinomial ("invalid multinomial distribution")
        "conditional_sample": lambda: model.conditional_sample(huge, observed, gen(0)),
    }
    for call in calls.values():  # a failure shows the lambda, which names the method
        with pytest.raises(ValueError, match=match):
            call()
    # A float64 model handles the same values.
    model64 = random_model(2, d, 1, seed=62)
    assert bool(torch.isfinite(model64.log_prob(huge.double())).all())


def test_float32_means_too_large_are_blamed_not_the_input():
    """Means of 3e38 overflow the squared distances of zero rows: the message said "input
    values too large" with "largest |x| is 0"; it now names the model's means."""
    model = MFA.from_parameters(torch.tensor([0.5, 0.5]), torch.full((2, 4), 3e38),
                                torch.ones(2, 4, 2), torch.ones(2, 4))
    observed = torch.ones(2, 4, dtype=torch.bool)
    observed[:, 0] = False
    match = (r"the model's means are too large for torch\.float32: .*largest \|x\| is 0, "
             r"largest \|μ\| 3e\+38.*Rescale the model")
    for call in (lambda: model.log_prob(torch.zeros(2, 4)),
                 lambda: model.observed_log_prob(torch.zeros(2, 4), observed)):
        with pytest.raises(ValueError, match=match):
            call()


def test_sample_with_non_finite_weights_says_why():
    model = random_model(2, 3, 1, seed=63)
    with torch.no_grad():
        model.logits[0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot sample: the mixture weights are not finite"):
        model.sample(5, generator=gen(0))


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_from_raw_parameters_rebuilds_the_same_model(noise):
    model = random_model(3, 4, 2, noise=noise, seed=64)
    with torch.no_grad():
        model.raw_noise[0] = -60.0  # a variance at the floor min_noise: kept exactly
    raw = {name: p.detach() for name, p in model.named_parameters()}
    rebuilt = MFA.from_raw_parameters(**raw, noise=noise, min_noise=model.min_noise)
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, raw[name]), name
    x = random_data(6, model, seed=65)
    torch.testing.assert_close(rebuilt.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    # A component of weight 0 (logits −inf) is allowed; NaN, +inf and wrong shapes are not.
    logits = raw["logits"].clone()
    logits[1] = -math.inf
    zero = MFA.from_raw_parameters(logits, raw["loc"], raw["loadings"], raw["raw_noise"], noise)
    assert zero.weights[1] == 0
    bad_logits = raw["logits"].clone()
    bad_logits[0] = math.nan
    with pytest.raises(ValueError, match=r"logits must not contain NaN or \+inf"):
        MFA.from_raw_parameters(bad_logits, raw["loc"], raw["loadings"], raw["raw_noise"], noise)
    with pytest.raises(ValueError, match=r"logits must have at least one finite entry"):
        MFA.from_raw_parameters(torch.full((3,), -math.inf, dtype=F64), raw["loc"],
                                raw["loadings"], raw["raw_noise"], noise)
    with pytest.raises(ValueError, match=r"raw_noise must have shape"):
        MFA.from_raw_parameters(raw["logits"], raw["loc"], raw["loadings"],
                                torch.zeros(3, 7, dtype=F64), noise)
    with pytest.raises(ValueError, match=r"loadings must have shape \[K, D, L\] = \[3, 4, L\]"):
        MFA.from_raw_parameters(raw["logits"], raw["loc"], raw["loadings"][:2], raw["raw_noise"])
    with pytest.raises(ValueError, match=r"loc contains 1 non-finite"):
        loc = raw["loc"].clone()
        loc[0, 0] = math.inf
        MFA.from_raw_parameters(raw["logits"], loc, raw["loadings"], raw["raw_noise"], noise)


def test_isotropic_kd_noise_is_checked_row_by_row():
    # a small row varying 9× passed beside a large row, and only its first column was kept
    nv = torch.tensor([[1000.0, 1000.0, 1000.0], [1e-4, 5e-4, 9e-4]])
    with pytest.raises(ValueError, match="must be constant along D"):
        MixtureOfFactorAnalyzers.from_parameters(
            torch.tensor([0.5, 0.5]), torch.zeros(2, 3), torch.zeros(2, 3, 1), nv, "isotropic")


def test_models_built_from_parameters_leave_the_global_generator_alone():
    model = MixtureOfFactorAnalyzers(3, 5, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    MixtureOfFactorAnalyzers.from_parameters(model.weights.detach(), model.means.detach(),
                                             model.factor_loadings.detach(),
                                             model.noise_variance.detach())
    model.marginal([0, 1])
    model.condition([0], torch.zeros(1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name,what", [("logits", "mixture weights"), ("loc", "means"),
                                       ("loadings", "factor loadings"),
                                       ("raw_noise", "noise variances")])
def test_non_finite_parameters_are_named_by_every_path(name, what, value):
    """A NaN or infinite parameter (a diverged run, an assignment): log p and the
    responsibilities were NaN, sampling returned NaN, and other paths failed with a message
    about overflowing data, tiny noise or a Cholesky factor. Each now names the parameter."""
    from mfa import inference
    from mfa.em import EMConfig, EMTrainer

    model = random_model(2, 4, 1, seed=66)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[1] = value
    x = random_data(20, random_model(2, 4, 1, seed=66), seed=67)
    observed = torch.tensor([True, True, False, False]).expand(20, 4)
    calls = {
        "log_prob": lambda: model.log_prob(x),
        "responsibilities": lambda: model.responsibilities(x),
        "sample": lambda: model.sample(3, generator=gen(0)),
        "conditional_mean": lambda: model.conditional_mean(x, observed),
        "inpaint": lambda: inference.inpaint(model, x, observed),
        "EM": lambda: EMTrainer(EMConfig(max_iter=1, init="none", progress=False)).fit(model, x),
        "to_distribution": lambda: model.to_distribution(),  # (its log_prob was NaN)
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=f"{what} are not finite"):
            call()


def test_an_assigned_state_of_another_dtype_is_refused():
    """load_state_dict(assign=True) made a bfloat16 model whose log_prob failed inside
    torch's Cholesky, and a float64 loc beside float32 parameters failed in a product."""
    model = MixtureOfFactorAnalyzers(2, 4, 1)
    half = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="cannot use dtype torch.bfloat16"):
        model.load_state_dict(half, assign=True)
    mixed = {**model.state_dict(), "loc": model.loc.detach().double()}
    with pytest.raises(ValueError, match=r"one dtype on one device, got .*loc torch.float64"):
        model.load_state_dict(mixed, assign=True)
    with pytest.raises(ValueError, match="one dtype on one device"):  # (the others kept)
        model.load_state_dict({"loc": model.loc.detach().double()}, strict=False, assign=True)
    assert model.dtype == torch.float32
    model.load_state_dict(half)  # a plain load converts into the parameters
    wide = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64)
    model.load_state_dict(wide.state_dict(), assign=True)  # one supported dtype: taken
    assert model.dtype == torch.float64
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(x), wide.log_prob(x))
