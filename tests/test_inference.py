"""Marginals, conditionals, masked densities and conditional sampling vs dense block formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, DenseMixture, assert_finite, gen, random_data, random_model

import mfa
from mfa import MixtureOfFactorAnalyzers
from mfa.inference import inpaint

# (K, D, L, noise, observed): L = 0, L > |hidden| (rank reduction), L = D, isotropic,
# unsorted observed indices, K = 1.
CONDITION_CASES = [
    (3, 6, 2, "diagonal", [0, 2, 5]),
    (2, 5, 0, "diagonal", [1, 3]),
    (3, 6, 4, "diagonal", [0, 1, 2, 3]),
    (2, 5, 5, "isotropic", [4, 0]),
    (1, 4, 1, "isotropic", [2]),
    (4, 7, 3, "isotropic", [6, 1, 3, 4]),
    (3, 5, 1, "diagonal", [4]),
]


def _cid(case):
    k, d, lat, noise, obs = case
    return f"K{k}-D{d}-L{lat}-{noise[:3]}-o{''.join(map(str, obs))}"


def _hidden(d, obs):
    return [j for j in range(d) if j not in obs]


def _random_masks(n, d, seed, p=0.5):
    """Random per-row masks plus one all-observed and one nothing-observed row."""
    m = torch.rand(n, d, generator=gen(seed)) < p
    m[0] = True
    m[1] = False
    return m


def _dense_conditional_mean(ref: DenseMixture, x: torch.Tensor, observed: torch.Tensor):
    """Row by row: dense block-formula conditioning, ``Σ_k w̃_k μ_k,h|o``."""
    out = x.clone()
    for i in range(x.shape[0]):
        obs = observed[i].nonzero().flatten()
        hid = (~observed[i]).nonzero().flatten()
        if len(hid) == 0:
            continue
        if len(obs) == 0:
            out[i] = ref.mean()
            continue
        out[i, hid] = ref.condition(obs, x[i, obs]).mean()
    return out


def _dense_observed_log_prob(ref: DenseMixture, x, observed):
    out = torch.zeros(x.shape[0], dtype=F64)
    for i in range(x.shape[0]):
        obs = observed[i].nonzero().flatten()
        if len(obs):
            out[i] = ref.marginal(obs).log_prob(x[i, obs])
    return out


# ---------------------------------------------------------------------- condition


@pytest.mark.parametrize("case", CONDITION_CASES, ids=_cid)
def test_condition_matches_dense_block_formulas(case):
    k, d, lat, noise, obs = case
    model = random_model(k, d, lat, noise, seed=100)
    ref = DenseMixture.from_model(model)
    values = random_data(1, model, seed=101, scale=1.0)[0, obs]
    cond = model.condition(obs, values)
    expected = ref.condition(obs, values)
    hid = _hidden(d, obs)

    assert isinstance(cond, MixtureOfFactorAnalyzers)
    assert (cond.n_components, cond.n_features) == (k, len(hid))
    assert cond.n_factors == min(lat, len(hid))
    assert cond.noise == noise and cond.dtype == F64
    torch.testing.assert_close(cond.weights, expected.weights, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(cond.means, expected.means, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cond.covariance(), expected.covs, rtol=1e-8, atol=1e-10)
    # Densities of the conditional agree too.
    xh = random_data(20, model, seed=102)[:, hid]
    torch.testing.assert_close(cond.log_prob(xh), expected.log_prob(xh), rtol=1e-6, atol=1e-9)
    # Bayes: log p(x_h | x_o) = log p(x) − log p(x_o), with the model's own joint density.
    x = torch.zeros(20, d, dtype=F64)
    x[:, hid] = xh
    x[:, obs] = values
    joint = model.log_prob(x) - model.marginal(obs).log_prob(values)
    torch.testing.assert_close(cond.log_prob(xh), joint, rtol=1e-8, atol=1e-9)
    # The functional form is the same.
    torch.testing.assert_close(mfa.condition(model, obs, values).means, cond.means)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capacitance_beyond_float64_is_a_clear_error_in_every_path(dtype):
    """Loadings of 1e4 over noise 1e-8 (M's eigenvalues 1 and ~1e17: past float64's
    resolution): log_prob, the masked paths (one observed feature, so the per-row M_o) and
    condition raise an error naming float64 and the noise, not torch's bare Cholesky one."""
    a = torch.tensor([3.0, 1.0, 2.0, -1.0], dtype=torch.float64) * 1e4
    loadings = torch.stack([a, a.flip(0)], -1).unsqueeze(0)  # [1, 4, 2]
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.ones(1, dtype=dtype), torch.zeros(1, 4, dtype=dtype), loadings.to(dtype),
        torch.full((1, 4), 1e-8, dtype=dtype))
    x = (0.3 * a).unsqueeze(0).to(dtype)
    observed = torch.tensor([[True, False, False, False]])
    calls = {
        "log_prob (parallel columns)": lambda: MixtureOfFactorAnalyzers.from_parameters(
            torch.ones(1, dtype=dtype), torch.zeros(1, 4, dtype=dtype),
            torch.stack([a, a], -1).unsqueeze(0).to(dtype),
            torch.full((1, 4), 1e-8, dtype=dtype)).log_prob(x),
        "observed_log_prob": lambda: model.observed_log_prob(x, observed),
        "conditional_mean": lambda: model.conditional_mean(x, observed),
        "condition": lambda: model.condition([0], x[0, :1]),
    }
    for name, call in calls.items():
        with pytest.raises(torch.linalg.LinAlgError, match="float64.*noise variance"):
            call()
            pytest.fail(f"{name} did not raise")


def test_condition_weights_are_informative():
    """Observing a value near one component's mean must move the weights towards it."""
    model = random_model(3, 5, 2, seed=103)
    ref = DenseMixture.from_model(model)
    for target in range(3):
        values = model.means[target, :3].detach()
        cond = model.condition([0, 1, 2], values)
        expected = ref.condition([0, 1, 2], values)
        torch.testing.assert_close(cond.weights, expected.weights, rtol=1e-8, atol=1e-12)
        assert int(cond.weights.argmax()) == target


def test_condition_with_bool_mask_equals_indices():
    model = random_model(3, 6, 2, seed=104)
    mask = torch.tensor([True, False, True, False, False, True])
    values = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    a = model.condition(mask, values)
    b = model.condition([0, 2, 5], values)
    torch.testing.assert_close(a.covariance(), b.covariance(), rtol=0, atol=0)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)


def test_condition_float32_is_close_to_float64_reference():
    model = random_model(3, 6, 2, "diagonal", seed=105, dtype=torch.float32)
    ref = DenseMixture.from_model(model)
    values = model.means[1, [0, 3]].detach() + 0.3
    cond = model.condition([0, 3], values)
    expected = ref.condition([0, 3], values.double())
    assert cond.dtype == torch.float32
    torch.testing.assert_close(cond.weights.double(), expected.weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond.means.double(), expected.means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond.covariance().double(), expected.covs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- marginal


@pytest.mark.parametrize(
    "case",
    [
        (3, 6, 2, "diagonal", [3, 0, 2]),  # order as given
        (2, 5, 4, "diagonal", [1, 4]),  # L > |features|: rank reduction
        (2, 5, 5, "isotropic", [0, 2, 3]),  # L = D > |features|
        (3, 4, 0, "isotropic", [2]),
        (1, 4, 2, "diagonal", [0, 1, 2, 3]),  # all features: the model itself
    ],
    ids=_cid,
)
def test_marginal_deletes_rows_and_columns(case):
    k, d, lat, noise, feats = case
    model = random_model(k, d, lat, noise, seed=110)
    ref = DenseMixture.from_model(model).marginal(feats)
    marg = model.marginal(feats)
    assert (marg.n_components, marg.n_features, marg.n_factors) == (k, len(feats),
                                                                    min(lat, len(feats)))
    assert marg.noise == noise
    torch.testing.assert_close(marg.weights, ref.weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(marg.means, ref.means, rtol=0, atol=0)
    torch.testing.assert_close(marg.covariance(), ref.covs, rtol=1e-10, atol=1e-12)
    x = random_data(30, model, seed=111)[:, feats]
    torch.testing.assert_close(marg.log_prob(x), ref.log_prob(x), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mfa.marginal(model, feats).means, marg.means)


def test_marginal_with_bool_mask_and_tensor_indices():
    model = random_model(3, 6, 3, seed=112)
    mask = torch.tensor([False, True, True, False, True, False])
    by_mask = model.marginal(mask)
    by_list = model.marginal([1, 2, 4])
    by_tensor = model.marginal(torch.tensor([1, 2, 4]))
    for other in (by_list, by_tensor):
        torch.testing.assert_close(by_mask.covariance(), other.covariance(), rtol=0, atol=0)
        torch.testing.assert_close(by_mask.means, other.means, rtol=0, atol=0)
        torch.testing.assert_close(by_mask.weights, other.weights, rtol=0, atol=0)


def test_marginal_of_a_model_at_the_noise_floor():
    """Regression: marginal/condition used to rebuild through from_parameters, which rejects
    noise_variance <= min_noise; a float32 model whose softplus(raw_noise) is below half an ulp
    of min_noise (raw_noise <~ -30.5) reports noise == min_noise, and marginal() raised."""
    model = MixtureOfFactorAnalyzers(2, 4, 1, generator=gen(113))  # float32, min_noise=1e-6
    with torch.no_grad():
        model.raw_noise[:, 0] = -35.0  # e.g. a constant pixel that SGD drove to the floor
    x = torch.randn(5, 4, generator=gen(114))
    assert_finite(model.log_prob(x), (5,), torch.float32)  # the model itself is usable
    marg = model.marginal([0, 1])
    cond = model.condition([2, 3], x[0, 2:])
    assert marg.n_features == 2 and cond.n_features == 2


# ---------------------------------------------------------------------- per-row masks


@pytest.mark.parametrize(
    "case",
    [(3, 6, 2, "diagonal"), (2, 5, 0, "diagonal"), (3, 5, 4, "isotropic"),
     (1, 4, 4, "diagonal"), (4, 7, 3, "isotropic")],
    ids=lambda c: f"K{c[0]}-D{c[1]}-L{c[2]}-{c[3][:3]}",
)
def test_conditional_mean_and_observed_log_prob_match_row_by_row_dense(case):
    k, d, lat, noise = case
    model = random_model(k, d, lat, noise, seed=120)
    ref = DenseMixture.from_model(model)
    n = 16
    x = random_data(n, model, seed=121)
    observed = _random_masks(n, d, seed=122)
    # Hidden entries are ignored: fill them with something wild.
    x_in = torch.where(observed, x, torch.full_like(x, 1e6))

    mean = model.conditional_mean(x_in, observed)
    assert_finite(mean, (n, d))
    expected = _dense_conditional_mean(ref, x_in, observed)
    torch.testing.assert_close(mean, expected, rtol=1e-8, atol=1e-9)
    assert torch.equal(mean[observed], x_in[observed])  # copied exactly
    assert torch.equal(mean[0], x_in[0])  # all observed: x itself
    torch.testing.assert_close(mean[1], ref.mean(), rtol=1e-10, atol=1e-12)  # nothing observed

    lp = model.observed_log_prob(x_in, observed)
    assert_finite(lp, (n,))
    torch.testing.assert_close(lp, _dense_observed_log_prob(ref, x_in, observed),
                               rtol=1e-6, atol=1e-9)
    assert lp[1] == 0  # nothing observed
    torch.testing.assert_close(lp[0], ref.log_prob(x_in[0]), rtol=1e-6, atol=1e-9)

    torch.testing.assert_close(mfa.conditional_mean(model, x_in, observed), mean)


def test_masked_methods_far_from_origin_float32():
    model = random_model(3, 6, 2, "diagonal", seed=123, dtype=torch.float32, offset=1e3)
    ref = DenseMixture.from_model(model)
    x = random_data(12, model, seed=124)
    observed = _random_masks(12, 6, seed=125)
    lp = model.observed_log_prob(x, observed).double()
    torch.testing.assert_close(lp, _dense_observed_log_prob(ref, x.double(), observed),
                               rtol=2e-5, atol=1e-4)
    mean = model.conditional_mean(x, observed).double()
    torch.testing.assert_close(mean, _dense_conditional_mean(ref, x.double(), observed),
                               rtol=1e-5, atol=1e-3)


def test_masked_methods_float32_keep_their_precision_where_the_woodbury_term_cancels():
    """Noise at the quantisation level under loadings that explain most of the variance,
    half the features observed: float32 ``observed_log_prob`` and ``conditional_mean``
    against the float64 model of the same parameters. The Woodbury form alone (the E-step's
    ``exact=False``) is off by tens of nats (measured 20); the residual form keeps 0.05
    (measured 0.001)."""
    from mfa import conditioning, linalg

    g = gen(12)
    k, d, lat = 3, 200, 4
    params = [torch.full((k,), 1 / 3, dtype=F64), torch.rand(k, d, generator=g, dtype=F64),
              0.3 * torch.randn(k, d, lat, generator=g, dtype=F64),
              torch.full((k, d), 1.3e-6, dtype=F64)]
    params = [t.float() for t in params]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))
    x, _ = m64.sample(200, generator=g)
    observed = torch.rand(200, d, generator=g) < 0.5
    x32 = x.float()
    with torch.no_grad():
        ref = m64.observed_log_prob(x, observed)
        got = m32.observed_log_prob(x32, observed).double()
        terms = conditioning.masked_terms(m32.log_weights, m32.means, m32.factor_loadings,
                                          m32.noise_variance)
        woodbury = linalg.logsumexp(conditioning.row_posterior(
            terms, x32 * observed, observed).log_joint).double()
        assert (woodbury - ref).abs().max() > 1.0
        assert (got - ref).abs().max() < 0.05
        torch.testing.assert_close(m32.conditional_mean(x32, observed).double(),
                                   m64.conditional_mean(x, observed), rtol=0, atol=1e-3)


def _few_observed_case():
    """A float32 model with noise far below the loadings' scale (``A²/d`` ≈ 1e6) and its
    float64 twin: conditioning on at most ``L`` features leaves ``M_o`` with eigenvalues 1
    beside ones near 1e6·|o|."""
    g = gen(31)
    k, d, lat = 3, 20, 6
    params = [torch.full((k,), 1 / 3, dtype=F64), torch.randn(k, d, generator=g, dtype=F64),
              3 * torch.randn(k, d, lat, generator=g, dtype=F64),
              torch.full((k, d), 1e-5, dtype=F64)]
    params = [t.float() for t in params]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))
    x, _ = m64.sample(8, generator=g)
    return m32, m64, x


@pytest.mark.parametrize("n_observed", [1, 3, 6])
def test_masked_methods_float32_with_at_most_l_observed_features(n_observed):
    """Fewer observed features than factors in float32: before the float64 path for such
    rows the conditional means were off by 1.7 (entries of size 10) and ``log p`` by
    0.6 nats; against the dense float64 block formulas they now agree to float32 rounding."""
    m32, m64, x = _few_observed_case()
    ref = DenseMixture.from_model(m64)
    observed = torch.zeros(8, 20, dtype=torch.bool)
    observed[:, :n_observed] = True
    observed[4:, -1] = True  # mixed with rows of more observed features in one chunk
    observed[7] = False  # and a row with nothing observed
    with torch.no_grad():
        mean = m32.conditional_mean(x.float(), observed).double()
        lp = m32.observed_log_prob(x.float(), observed)
    torch.testing.assert_close(mean, _dense_conditional_mean(ref, x, observed),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(lp.double(), _dense_observed_log_prob(ref, x, observed),
                               rtol=0, atol=1e-4)
    assert lp[7] == 0.0  # nothing observed: exactly log 1


def test_condition_float32_with_fewer_observed_features_than_factors():
    m32, m64, x = _few_observed_case()
    ref = DenseMixture.from_model(m64)
    cond = m32.condition([0, 1, 2], x[0, :3].float())
    expected = ref.condition([0, 1, 2], x[0, :3])
    torch.testing.assert_close(cond.weights.double(), expected.weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.means.double(), expected.means, rtol=0, atol=1e-4)
    torch.testing.assert_close(cond.covariance().double(), expected.covs, rtol=1e-5, atol=1e-4)


def _dense_masked(model, x, observed):
    """``(log p(x_o), E[x | x_o])`` per row, from dense covariances of ``model``'s
    (differentiable) parameters and block-formula conditioning, row by row."""
    from torch.distributions import MultivariateNormal

    w, mu, a, d = model.weights, model.means, model.factor_loadings, model.noise_variance
    cov = a @ a.transpose(-1, -2) + torch.diag_embed(d)
    log_p, means = [], []
    for row, o in zip(x, observed, strict=True):
        o_idx, h_idx = o.nonzero().flatten(), (~o).nonzero().flatten()
        parts, fills = [], []
        for k in range(model.n_components):
            c_oo = cov[k][o_idx][:, o_idx]
            parts.append(MultivariateNormal(mu[k, o_idx], c_oo).log_prob(row[o_idx]))
            gain = cov[k][h_idx][:, o_idx] @ torch.linalg.inv(c_oo)
            fills.append(mu[k, h_idx] + gain @ (row[o_idx] - mu[k, o_idx]))
        joint = torch.stack(parts) + w.log()
        log_p.append(torch.logsumexp(joint, 0))
        mean = row.clone()
        mean[h_idx] = (joint.softmax(0).unsqueeze(-1) * torch.stack(fills)).sum(0)
        means.append(mean)
    return torch.stack(log_p), torch.stack(means)


@pytest.mark.parametrize("method", ["observed_log_prob", "conditional_mean"])
def test_float32_masked_gradients_where_the_float32_capacitance_fails(method):
    """Where the float32 factorisation of ``M_o`` fails (noise at 1e-6 under loadings of
    about 3, rows with at most L observed entries), the factor is taken in float64 and the
    values were right, but the failed factorisation's backward made the loadings' and
    noise's gradients NaN, so Adam with ``missing="allow"`` stopped ("lower the learning
    rate"). The gradients now agree with dense float64 ones, to what float32 allows at
    ``A²/d`` ≈ 1e7 (``ε₃₂·A²/d`` is of order 1): measured 3e-4 of the norm for log p and
    2.1e-3 for the conditional mean (whose solves by ``M_o`` add a factor), checked at 2e-3
    and 1e-2."""
    bound = 2e-3 if method == "observed_log_prob" else 1e-2
    from mfa.conditioning import masked_terms

    k, d, n_lat = 3, 8, 4
    m32 = MixtureOfFactorAnalyzers(k, d, n_lat, generator=gen(1), min_noise=0.0)
    g = gen(0)
    with torch.no_grad():
        m32.loc.copy_(torch.randn(k, d, generator=g))
        m32.logits.copy_(torch.randn(k, generator=g))
        m32.loadings.mul_(3 / m32.loadings.std())
        m32.raw_noise.copy_(torch.log(torch.expm1(torch.full_like(m32.raw_noise, 1e-6))))
    m64 = MixtureOfFactorAnalyzers(k, d, n_lat, min_noise=0.0, dtype=F64)
    m64.load_state_dict({name: v.double() for name, v in m32.state_dict().items()})
    x, _ = m32.sample(20, gen(2))
    observed = torch.rand(20, d, generator=gen(3)) < torch.linspace(0.05, 0.9, 20)[:, None]
    observed[:, 0] |= ~observed.any(1)
    terms = masked_terms(m32.weights.log(), m32.means, m32.factor_loadings, m32.noise_variance)
    cap = (observed.float() @ terms.outer).view(20, k, n_lat, n_lat) + torch.eye(n_lat)
    assert bool((torch.linalg.cholesky_ex(cap).info != 0).any())  # the case this is about
    getattr(m32, method)(x, observed).sum().backward()
    log_p, mean = _dense_masked(m64, x.double(), observed)
    (log_p if method == "observed_log_prob" else mean).sum().backward()
    for (name, p32), (_, p64) in zip(m32.named_parameters(), m64.named_parameters(),
                                     strict=True):
        assert_finite(p32.grad, p32.shape, torch.float32)
        error = (p32.grad.double() - p64.grad).norm() / p64.grad.norm()
        assert error < bound, (name, error.item())


def _near_parallel_case(k: int = 2, d: int = 50):
    """``(means, loadings, noise, generator)`` in float64: two nearly parallel loading
    columns a component, over noise at the quantisation level for component 0 (0.05 for
    component 1), which make ``M_o`` singular in float32 for many masks; the generator
    goes on to draw the rows."""
    g = gen(0)
    base = torch.randn(k, d, 1, generator=g, dtype=F64)
    loadings = torch.cat([base, base + 1e-6 * torch.randn(k, d, 1, generator=g, dtype=F64)], -1)
    noise = torch.full((k, d), 1e-6, dtype=F64)
    noise[1] = 0.05
    means = 0.5 + 0.1 * torch.randn(k, d, generator=g, dtype=F64)
    return means, loadings, noise, g


def test_masked_capacitance_falls_back_to_float64_where_float32_fails():
    """Two nearly parallel loading columns over noise at the quantisation level make the
    per-row ``M_o = I + A_oᵀD_o⁻¹A_o`` singular in float32 (seen on CUDA at K = 1000): the
    failing factors come from float64, so the conditional mean is still the dense one."""
    from mfa.conditioning import masked_capacitance_cholesky, masked_terms

    k, d, n = 2, 50, 8
    means, loadings, noise, g = _near_parallel_case()
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64), means, loadings, noise)
    x, _ = model.sample(n, generator=g)
    observed = _random_masks(n, d, seed=3, p=0.7)
    m32 = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means.float(), loadings.float(), noise.float())
    terms = masked_terms(m32.weights.log(), m32.means, m32.factor_loadings, m32.noise_variance)
    mask = observed.float()
    cap = (mask @ terms.outer).view(n, k, 2, 2) + torch.eye(2)
    failed = torch.linalg.cholesky_ex(cap).info != 0
    assert bool(failed.any()) and not bool(failed.all())  # the case this test is about
    chol = masked_capacitance_cholesky(terms, mask)
    assert chol.dtype == torch.float32
    # M_o of the float32 parameters, exactly (in float64): Σ_j∈o a_j a_jᵀ / d_j + I
    a64, d64 = m32.factor_loadings.detach().double(), m32.noise_variance.detach().double()
    cap64 = torch.einsum("nj,kja,kjb->nkab", mask.double(), a64 / d64.unsqueeze(-1), a64)
    reference = torch.linalg.cholesky(cap64 + torch.eye(2, dtype=F64))
    torch.testing.assert_close(chol[failed].double(), reference[failed], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(chol[~failed], torch.linalg.cholesky_ex(cap).L[~failed])

    ref = DenseMixture.from_model(model)
    with torch.no_grad():
        mean = m32.conditional_mean(x.float(), observed).double()
        lp = m32.observed_log_prob(x.float(), observed).double()
    torch.testing.assert_close(mean, _dense_conditional_mean(ref, x, observed),
                               rtol=1e-5, atol=1e-4)
    # log p itself is computed (no longer raises) but cancels ~ε·Σ(Az)²/d ≈ 20 nats in
    # float32 here, as the float32 model's full-row log_prob does: float64 models for that.
    assert bool(torch.isfinite(lp).all())


def test_masked_methods_chunked_equal_unchunked():
    big = random_model(3, 6, 2, "isotropic", seed=126)
    tiny = random_model(3, 6, 2, "isotropic", seed=126, chunk_elements=50)
    x = random_data(37, big, seed=127)
    observed = _random_masks(37, 6, seed=128)
    torch.testing.assert_close(tiny.conditional_mean(x, observed),
                               big.conditional_mean(x, observed), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiny.observed_log_prob(x, observed),
                               big.observed_log_prob(x, observed), rtol=1e-12, atol=1e-12)
    values = x[0, :2]
    torch.testing.assert_close(tiny.condition([0, 1], values).covariance(),
                               big.condition([0, 1], values).covariance(), rtol=1e-12, atol=1e-12)
    s = tiny.conditional_sample(x, observed, generator=gen(0))
    assert_finite(s, (37, 6))
    assert torch.equal(s[observed], x[observed])


def test_masked_methods_empty_batch():
    model = random_model(2, 3, 1, seed=129)
    x = torch.zeros(0, 3, dtype=F64)
    m = torch.zeros(0, 3, dtype=torch.bool)
    assert model.conditional_mean(x, m).shape == (0, 3)
    assert model.observed_log_prob(x, m).shape == (0,)
    assert model.conditional_sample(x, m, generator=gen(0)).shape == (0, 3)


def test_observed_log_prob_gradcheck():
    model = random_model(2, 4, 2, "diagonal", seed=130)
    x = random_data(5, model, seed=131, scale=1.0)
    observed = _random_masks(5, 4, seed=132)
    names = ["logits", "loc", "loadings", "raw_noise"]
    inputs = tuple(getattr(model, n).detach().clone().requires_grad_(True) for n in names)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.observed_log_prob(x, observed)

    wrapper = Wrapper()

    def f(*params):
        state = {f"model.{n}": p for n, p in zip(names, params, strict=True)}
        return torch.func.functional_call(wrapper, state, (x,))

    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------- conditional sampling


def test_conditional_sample_moments_match_dense_conditional():
    model = random_model(3, 5, 2, "diagonal", seed=140)
    ref = DenseMixture.from_model(model)
    obs = [0, 3]
    hid = _hidden(5, obs)
    # Halfway between two components' observed means: a genuinely mixed posterior.
    values = 0.5 * (model.means[0, obs] + model.means[1, obs]).detach()
    expected = ref.condition(obs, values)
    assert float(expected.weights.sort().values[-2]) > 0.05, expected.weights

    n = 100_000
    row = torch.full((5,), 7.0, dtype=F64)
    row[obs] = values
    x = row.expand(n, 5).contiguous()
    observed = torch.zeros(n, 5, dtype=torch.bool)
    observed[:, obs] = True
    s = model.conditional_sample(x, observed, generator=gen(141))
    assert_finite(s, (n, 5))
    assert torch.equal(s[:, obs], x[:, obs])
    samples = s[:, hid]
    mean, cov = expected.mean(), expected.covariance()
    se_mean = cov.diagonal().sqrt() / math.sqrt(n)
    assert bool(((samples.mean(0) - mean).abs() <= 5 * se_mean).all())
    centred = samples - mean
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    se_cov = products.std(0) / math.sqrt(n)
    assert bool(((products.mean(0) - cov).abs() <= 5 * se_cov).all())


def test_conditional_sample_l0_moments():
    model = random_model(2, 4, 0, "isotropic", seed=142)
    ref = DenseMixture.from_model(model)
    obs = [1]
    values = model.means[:, 1].mean().reshape(1).detach()
    expected = ref.condition(obs, values)
    n = 100_000
    x = torch.zeros(n, 4, dtype=F64)
    x[:, 1] = values
    observed = torch.zeros(n, 4, dtype=torch.bool)
    observed[:, 1] = True
    s = model.conditional_sample(x, observed, generator=gen(143))[:, [0, 2, 3]]
    se = expected.covariance().diagonal().sqrt() / math.sqrt(n)
    assert bool(((s.mean(0) - expected.mean()).abs() <= 5 * se).all())


def test_conditional_sample_copies_observed_and_is_seeded():
    model = random_model(3, 6, 2, seed=144)
    x = random_data(50, model, seed=145)
    observed = _random_masks(50, 6, seed=146)
    a = model.conditional_sample(x, observed, generator=gen(1))
    b = model.conditional_sample(x, observed, generator=gen(1))
    c = model.conditional_sample(x, observed, generator=gen(2))
    assert_finite(a, (50, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[observed], x[observed])
    assert torch.equal(a[0], x[0])
    assert not torch.equal(a[~observed], c[~observed])


def test_conditional_sample_chunks_count_the_gathered_loadings(monkeypatch):
    """Each row's loadings ``A_k`` [D, L] are gathered for its sample: the chunks are sized
    with them (they held 1.7x ``chunk_elements`` here, 3.3x at D = 3,072, L = 10)."""
    import mfa.conditioning as conditioning

    model = random_model(1, 50, 10, seed=150, chunk_elements=5000)
    x = random_data(40, model, seed=151)
    observed = _random_masks(40, 50, seed=152)
    chunks = []
    posterior = conditioning.row_posterior

    def spy(terms, xi, *args, **kwargs):
        chunks.append(xi.shape[0])
        return posterior(terms, xi, *args, **kwargs)

    monkeypatch.setattr(conditioning, "row_posterior", spy)
    sample = model.conditional_sample(x, observed, generator=gen(3))
    assert sum(chunks) == 40 and len(chunks) > 1
    assert max(chunks) * 50 * 10 <= model.chunk_elements
    assert torch.equal(sample[observed], x[observed])


def test_inpaint():
    model = random_model(3, 5, 2, seed=147)
    x = random_data(8, model, seed=148)
    observed = _random_masks(8, 5, seed=149)
    mean, samples = inpaint(model, x, observed, n_samples=3, generator=gen(5))
    torch.testing.assert_close(mean, model.conditional_mean(x, observed), rtol=0, atol=0)
    assert_finite(samples, (3, 8, 5))
    assert torch.equal(samples[:, observed], x[observed].expand(3, -1))
    _, again = inpaint(model, x, observed, n_samples=3, generator=gen(5))
    assert torch.equal(samples, again)
    assert not torch.equal(samples[0], samples[1])
    mean0, none = mfa.inpaint(model, x, observed)
    assert none.shape == (0, 8, 5)
    torch.testing.assert_close(mean0, mean, rtol=0, atol=0)


# ---------------------------------------------------------------------- validation


def test_mask_and_x_validation():
    model = random_model(2, 4, 1, seed=150)
    x = torch.zeros(3, 4, dtype=F64)
    ok = torch.ones(3, 4, dtype=torch.bool)
    for fn in (model.conditional_mean, model.observed_log_prob, model.conditional_sample):
        with pytest.raises(TypeError, match=r"observed must be a bool tensor, got dtype "
                                            r"torch\.int64"):
            fn(x, ok.long())
        with pytest.raises(ValueError, match=r"observed must have shape \(3, 4\), got \(3, 3\)"):
            fn(x, ok[:, :3])
        with pytest.raises(TypeError, match=r"observed must be a torch\.Tensor, got list"):
            fn(x, ok.tolist())
        with pytest.raises(ValueError, match=r"x must have shape \[N, 4\] .*got \(4,\)"):
            fn(x[0], ok[0])
        # (it said [..., 4], a shape it then refused)
        with pytest.raises(ValueError, match=r"x must have shape \[N, 4\] .*got \(3, 3\)"):
            fn(x[:, :3], ok[:, :3])
        with pytest.raises(TypeError, match=r"x has dtype torch\.float32 but the model has "
                                            r"dtype torch\.float64"):
            fn(x.float(), ok)
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
            fn(x.long(), ok)
        bad = x.clone()
        bad[2, 1] = float("nan")
        with pytest.raises(ValueError, match=r"x \(its observed entries\) contains 1 "
                                             r"non-finite value\(s\)"):
            fn(bad, ok)


def test_nan_in_hidden_entries_marks_missing_data():
    model = random_model(3, 5, 2, seed=152)
    x = random_data(6, model, seed=153)
    observed = torch.rand(6, 5, generator=gen(154)) < 0.5
    with_nan = torch.where(observed, x, torch.full_like(x, float("nan")))
    torch.testing.assert_close(model.conditional_mean(with_nan, observed),
                               model.conditional_mean(x, observed), rtol=0, atol=0)
    torch.testing.assert_close(model.observed_log_prob(with_nan, observed),
                               model.observed_log_prob(x, observed), rtol=0, atol=0)
    a = model.conditional_sample(with_nan, observed, generator=gen(155))
    b = model.conditional_sample(x, observed, generator=gen(155))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_marginal_feature_validation():
    model = random_model(2, 4, 1, seed=151)
    with pytest.raises(ValueError, match=r"features must lie in \[0, 4\), got values from 0 to 4"):
        model.marginal([0, 4])
    with pytest.raises(ValueError, match=r"features must lie in \[0, 4\), got values from -1"):
        model.marginal([-1, 2])
    with pytest.raises(ValueError, match=r"features contains duplicated feature indices"):
        model.marginal([1, 2, 1])
    with pytest.raises(ValueError, match=r"features must be a 1-D sequence .* got shape \(1, 2\)"):
        model.marginal([[0, 1]])  # was flattened and accepted
    with pytest.raises(ValueError, match=r"features selects no features"):
        model.marginal(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features selects no features"):
        model.marginal(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"features as a bool mask must have shape \(4,\), "
                                         r"got \(3,\)"):
        model.marginal(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"features must be integer indices or a bool mask, "
                                        r"got dtype torch\.float32"):
        model.marginal(torch.tensor([0.0, 1.0]))
    # A uint8 0/1 mask was read as indices: [0, 1] kept both features (a mask keeps one).
    for mask in (torch.tensor([0, 1, 0, 1], dtype=torch.uint8), np.array([1, 0], np.uint8)):
        with pytest.raises(TypeError, match=r"features is a uint8 tensor, which could be a "
                                            r"mask or indices"):
            model.marginal(mask)


def test_condition_validation():
    model = random_model(2, 4, 1, seed=152)
    v2 = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"observed_features covers every feature"):
        model.condition([0, 1, 2, 3], torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"observed_features covers every feature"):
        model.condition(torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"observed_values must have shape \[2\] "
                                         r"\(observed features\), got \(3,\)"):
        model.condition([0, 1], torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"observed_values must have shape \[2\] .*got \(1, 2\)"):
        model.condition([0, 1], v2[None])
    with pytest.raises(TypeError, match=r"observed_values has dtype torch\.float32"):
        model.condition([0, 1], v2.float())
    with pytest.raises(ValueError, match=r"observed_values contains 1 non-finite"):
        model.condition([0, 1], torch.tensor([0.0, float("inf")], dtype=F64))
    with pytest.raises(ValueError, match=r"observed_features must lie in \[0, 4\)"):
        model.condition([0, 7], v2)
    with pytest.raises(ValueError, match=r"observed_features contains duplicated"):
        model.condition([1, 1], v2)
    with pytest.raises(ValueError, match=r"observed_features selects no features"):
        model.condition(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=F64))


def test_empty_list_of_features_is_reported_as_empty():
    """Regression: feature_index turned [] into a float32 tensor (torch.as_tensor([])) and
    raised TypeError 'must be integer indices' instead of ValueError 'selects no features'."""
    model = random_model(2, 4, 1, seed=153)
    with pytest.raises(ValueError, match=r"features selects no features"):
        model.marginal([])
    with pytest.raises(ValueError, match=r"observed_features selects no features"):
        model.condition([], torch.zeros(0, dtype=F64))


@pytest.mark.parametrize("bad", [-5, True, 1.5])
def test_inpaint_refuses_a_bad_number_of_samples(bad):
    model = MixtureOfFactorAnalyzers(2, 4, 1, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="n_samples must be an int >= 0"):
        inpaint(model, x, torch.ones(3, 4, dtype=torch.bool), n_samples=bad)


def test_inpaint_takes_a_numpy_integer_number_of_samples():
    import numpy as np

    model = MixtureOfFactorAnalyzers(2, 4, 1, generator=torch.Generator().manual_seed(0))
    observed = torch.ones(3, 4, dtype=torch.bool)
    observed[:, 0] = False
    _, samples = inpaint(model, torch.zeros(3, 4), observed, n_samples=np.int64(2),
                         generator=torch.Generator().manual_seed(1))
    assert samples.shape == (2, 3, 4)


def _heywood_case(noise: float, seed: int = 0):
    """A float32 model where one feature's noise (``noise``) is tiny under loadings of size
    1 (a Heywood case: the factors explain that feature exactly), its float64 twin, float64
    rows drawn from it and their observed masks (that feature always observed)."""
    from helpers import random_parameters

    params = random_parameters(3, 8, 3, seed=seed)
    params["noise_variance"][:, 2] = noise
    params = {name: value.float() for name, value in params.items()}
    params["weights"] = params["weights"] / params["weights"].sum()
    m32 = MixtureOfFactorAnalyzers.from_parameters(**params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(**{n: v.double() for n, v in params.items()})
    x = m64.sample(80, generator=gen(seed + 1))[0]
    observed = torch.rand(80, 8, generator=gen(seed + 2)) < 0.6
    observed[:, 2] = True
    return m32, m64, x, observed


@pytest.mark.parametrize("noise", [1e-6, 1e-7, 1e-8])
def test_float32_heywood_components_match_the_dense_reference(noise):
    """Ill-conditioned capacitances (eigenvalues ~1/noise beside ~1) kept the Woodbury form
    in float32: log p was off by 1.3 / 11 / 31–76 nats at noise 1e-6 / 1e-7 / 1e-8 and
    depended on the chunk size; their near-top entries now go through float64."""
    m32, m64, x, _ = _heywood_case(noise)
    ref = DenseMixture.from_model(m64)
    expected = ref.log_prob(x)
    with torch.no_grad():
        for chunk in (1, 37, 1 << 24):
            m32.chunk_elements = chunk
            got = m32.log_prob(x.float()).double()
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
        resp = m32.responsibilities(x.float()).double()
    torch.testing.assert_close(resp, torch.softmax(ref.component_log_prob(x), -1), rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize("noise", [1e-7, 1e-9])
def test_float32_heywood_component_log_prob_matches_float64_on_every_row(noise):
    """An ill-conditioned component's column is recomputed in float64 on every row (one dense
    pass, mfa.residual_form._ill_conditioned_in_float64), the rows its neighbours explain 900
    nats better included: each entry within float32's relative rounding of the float64 reference."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(4, noise)
    x = x[:300]
    expected = DenseMixture.from_model(m64).component_log_prob(x.double())  # [n, K]
    with torch.no_grad():
        got = m32.component_log_prob(x).double()
    assert float((expected.amax(-1) - expected[:, 1]).max()) > 500  # far rows exist
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("noise", [1e-6, 1e-7])
def test_float32_heywood_masked_inference_matches_the_dense_reference(noise):
    """Masked log p and conditional means were off by up to 25 nats and 9.9 (and condition()
    by 11.6) with such a component; ill-conditioned rows now go through float64."""
    m32, m64, x, observed = _heywood_case(noise, seed=3)
    ref = DenseMixture.from_model(m64)
    with torch.no_grad():
        lp = m32.observed_log_prob(x.float(), observed).double()
        mean = m32.conditional_mean(x.float(), observed).double()
        cond = m32.condition([0, 1, 2, 3], x[0, :4].float())
    torch.testing.assert_close(lp, _dense_observed_log_prob(ref, x, observed), rtol=0,
                               atol=2e-3)
    torch.testing.assert_close(mean, _dense_conditional_mean(ref, x, observed), rtol=0,
                               atol=1e-3)
    expected = ref.condition([0, 1, 2, 3], x[0, :4])
    torch.testing.assert_close(cond.weights.double(), expected.weights, rtol=0, atol=1e-4)
    torch.testing.assert_close(cond.means.double(), expected.means, rtol=0, atol=1e-3)
    torch.testing.assert_close(cond.covariance().double(), expected.covs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("seed", [659, 2393])
def test_float32_masked_capacitance_ill_conditioned_beyond_its_diagonal(seed):
    """One isotropic component whose loadings span four decades of feature scale (|a|²/d up
    to ~1e10): ε·cond(M_o) reaches 0.46 where ε·(max diag C / min diag C)², the test masked
    inference used until 2026-12-07, stayed at 3.5e-6, so such rows kept float32 and
    observed_log_prob came out up to 2 nats off, silently (log_prob was right). Now every
    row matches the dense float64 marginal, as marginal(o).log_prob does, and so do the
    conditional means."""
    import copy

    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(3, 8, (1,), generator=g))
    lat = min(int(torch.randint(1, 4, (1,), generator=g)), d - 1)
    scales = 10 ** (torch.rand(d, generator=g, dtype=torch.float64) * 4 - 2)
    a = torch.randn(1, d, lat, generator=g, dtype=torch.float64) * scales[:, None]
    cap = 1e10 if seed == 659 else 1e8
    noise = float((a ** 2).sum(-1).max()) / cap * float(10 ** (torch.rand(1, generator=g) * 2))
    m32 = MixtureOfFactorAnalyzers.from_parameters(torch.ones(1), torch.zeros(1, d), a.float(),
                                                   torch.full((1,), noise), "isotropic")
    m64 = copy.deepcopy(m32).double()
    x = m64.sample(40, torch.Generator().manual_seed(seed))[0].float()
    observed = torch.rand(40, d, generator=g) < 0.7
    observed[:10] = True
    observed[:, 0] = True  # (at least one observed feature a row)
    ref = DenseMixture.from_model(m64)
    with torch.no_grad():
        lp = m32.observed_log_prob(x, observed).double()
        partial = ~observed.all(-1)
        mean = m32.conditional_mean(x, observed).double()[partial]
    torch.testing.assert_close(lp, _dense_observed_log_prob(ref, x.double(), observed),
                               rtol=0, atol=1e-2)
    expected = _dense_conditional_mean(ref, x.double(), observed)[partial]
    torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-4 * float(scales.max()))


def test_masked_paths_where_float32_rounding_of_the_capacitance_terms_exceeds_one():
    """float32, every noise variance ~1e-8 under loadings of size 1 (|a|²/d ~ 1e8), a row with
    one observed feature (fewer than L = 2): the float64 retry of M_o = I + A_oᵀD_o⁻¹A_o summed
    float32-rounded terms (rounding ~10 > its smallest eigenvalue 1), and every masked path
    raised a raw Cholesky error. Now: the dense float64 marginal's value."""
    import copy

    from helpers import random_parameters

    from mfa.missing import row_log_prob

    p = random_parameters(1, 3, 2, "isotropic", seed=0, dtype=torch.float32)
    p["noise_variance"] = p["noise_variance"] * 1e-8
    m32 = MixtureOfFactorAnalyzers.from_parameters(**p, noise="isotropic")
    m64 = copy.deepcopy(m32).double()
    x = m32.means.detach().clone()
    observed = torch.tensor([[True, False, False]])
    with torch.no_grad():
        ref = DenseMixture.from_model(m64).marginal([0]).log_prob(x[:, [0]].double())
        assert m32.observed_log_prob(x, observed).double() == pytest.approx(ref, abs=1e-4)
        hidden = x.clone()
        hidden[0, 1:] = math.nan
        assert row_log_prob(m32, hidden).double() == pytest.approx(ref, abs=1e-4)
        torch.testing.assert_close(m32.conditional_mean(x, observed).double(),
                                   m64.conditional_mean(x.double(), observed), rtol=1e-4,
                                   atol=1e-4)
        assert torch.isfinite(inpaint(m32, x, observed, 1)[1]).all()


def test_a_generator_that_is_not_one_is_refused_before_the_work(monkeypatch):
    """An int as the generator failed inside torch.multinomial, after inpaint had computed
    the whole conditional mean."""
    from mfa import inference

    model = MixtureOfFactorAnalyzers(2, 4, 1, generator=torch.Generator().manual_seed(0))
    observed = torch.ones(3, 4, dtype=torch.bool)
    observed[:, 0] = False
    calls = []
    monkeypatch.setattr(inference, "conditional_mean", lambda *a: calls.append(a))
    for call in (lambda: inpaint(model, torch.zeros(3, 4), observed, 1, generator=1),
                 lambda: model.conditional_sample(torch.zeros(3, 4), observed, generator=1),
                 lambda: model.sample(3, generator=1)):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None, "
                           "got int"):
            call()
    assert calls == []
