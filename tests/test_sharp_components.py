"""Very sharp components (noise variances 10¹³–10¹⁵ below squared loadings of 1) in float64
and float32: the Woodbury subtraction loses ``ε·‖C⁻¹AᵀD⁻¹(x−μ)‖²``, nats a row, unless the
near-top entries are recomputed in the residual form. Against a float64 least-squares
reference written here (QR of the stacked system, not the library's formulas)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, gen

from mfa import MixtureOfFactorAnalyzers, linalg

D, L, N = 10, 3, 200


def least_squares_log_prob(*params: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` ``[n]`` of :func:`least_squares_log_joint`'s mixture."""
    return torch.logsumexp(least_squares_log_joint(*params), -1)


def least_squares_log_joint(log_w: torch.Tensor, mu: torch.Tensor, a: torch.Tensor,
                            d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log w_k + log N(x; μ_k, Σ_k)`` ``[n, K]`` of the mixture (log-weights ``[K]``, means
    ``[K, D]``, loadings ``[K, D, L]``, noise ``[K, D]``) in float64, differentiable: per
    component the least squares ``min_z ‖[D^-½A; I] z − [D^-½(x−μ); 0]‖²`` by QR, whose
    residual is the Mahalanobis distance, and ``log|Σ| = log|D| + 2 log|R|``."""
    log_w, mu, a, d, x = (t.double() for t in (log_w, mu, a, d, x))
    out = []
    for k in range(a.shape[0]):
        s = d[k].rsqrt()
        stacked = torch.cat([a[k] * s[:, None], torch.eye(a.shape[-1], dtype=F64)])  # [D+L, L]
        q, r = torch.linalg.qr(stacked)
        rhs = torch.cat([(x - mu[k]) * s, x.new_zeros(x.shape[0], a.shape[-1])], 1)
        z = torch.linalg.solve_triangular(r, (rhs @ q).T, upper=True).T  # [n, L]
        maha = (rhs - z @ stacked.T).square().sum(1)
        logdet = d[k].log().sum() + 2 * r.diagonal().abs().log().sum()
        out.append(log_w[k] - 0.5 * (x.shape[1] * math.log(2 * math.pi) + logdet + maha))
    return torch.stack(out, -1)  # [n, K]


def sharp_model(n_components: int, ratio: float, dtype: torch.dtype):
    """Loadings ~N(0, 1), noise variances ``1/ratio``; one component at 0, or two whose
    means ``±h`` lie close enough (``h`` ~ 1e-2 in float64, 1e-5 in float32) that the
    diagonal expansion rounds by under 0.01 nats (so nothing but the Woodbury subtraction
    loses precision), and symmetric, so the rows' reference point is exactly 0 and ``x − c``
    does not round in float32. Returns the model and 200 of its rows."""
    g = gen(0)
    a = torch.randn(n_components, D, L, generator=g, dtype=F64)
    h = (1e-2 if dtype == F64 else 1e-5) * torch.randn(D, generator=g, dtype=F64)
    mu = torch.zeros(1, D, dtype=F64) if n_components == 1 else torch.stack([h, -h])
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((n_components,), 1 / n_components, dtype=F64).to(dtype), mu.to(dtype),
        a.to(dtype), torch.full((n_components, D), 1 / ratio, dtype=dtype))
    assert model.component_terms().rounding < linalg.QUADRATIC_TOLERANCE
    return model, model.sample(N, generator=g)[0]


CASES = [(F64, 1e14), (F64, 1e15), (torch.float32, 1e13)]


@pytest.mark.parametrize("n_components", [1, 2])
@pytest.mark.parametrize("dtype,ratio", CASES)
def test_log_prob_and_observed_log_prob_of_sharp_components(dtype, ratio, n_components):
    """Within 1e-3 nats of least squares (the Woodbury form alone was 0.2–24 nats off), and
    ``observed_log_prob`` with the last feature hidden within 1e-3 of the reference on the
    observed features' parameters."""
    model, x = sharp_model(n_components, ratio, dtype)
    params = (model.weights.log(), model.means, model.factor_loadings, model.noise_variance)
    observed = torch.ones_like(x, dtype=torch.bool)
    observed[:, -1] = False
    with torch.no_grad():
        ref = least_squares_log_prob(*params, x)
        ref_obs = least_squares_log_prob(params[0], *(p[:, :-1] for p in params[1:]),
                                         x[:, :-1])
        err = (model.log_prob(x).double() - ref).abs().max()
        err_obs = (model.observed_log_prob(x, observed).double() - ref_obs).abs().max()
    assert err < 1e-3, err
    assert err_obs < 1e-3, err_obs


@pytest.mark.parametrize("dtype,ratio", CASES)
def test_a_sharp_row_scores_alike_alone_and_in_a_batch(dtype, ratio):
    """``log_prob(x)[i]`` equals ``log_prob(x[i:i+1])`` up to rounding (float64 at 10¹⁴: one
    row scored 4 nats apart, the matrix products' summation order differing)."""
    model, x = sharp_model(1, ratio, dtype)
    with torch.no_grad():
        batch = model.log_prob(x)
        alone = torch.cat([model.log_prob(x[i : i + 1]) for i in range(N)])
    tol = 1e-6 if dtype == F64 else 1e-4
    torch.testing.assert_close(batch, alone, rtol=0, atol=tol)


@pytest.mark.parametrize("ratio", [1e13, 1e14])
def test_adam_takes_the_exact_loss_for_sharp_float64_components(ratio):
    """Adam's per-epoch switch (``ε·λ_max > SHARP_LOSS_LIMIT``) turns on in float64 too, and
    the exact loss and its gradients match least squares' (the noise variances' gradient
    was 0.4–4 relative off, the loss 0.04–0.07 nats a row)."""
    from mfa._terms import SHARP_LOSS_LIMIT, woodbury_rounding

    model, x = sharp_model(1, ratio, F64)
    assert woodbury_rounding(model.factor_loadings, model.noise_variance) > SHARP_LOSS_LIMIT
    params = [p for p in model.parameters() if p.requires_grad]
    ref = least_squares_log_prob(model.weights.log(), model.means, model.factor_loadings,
                                 model.noise_variance, x).mean()
    loss = linalg.logsumexp(model._component_log_prob(x, exact=True)).mean()
    assert (loss - ref).abs() < 1e-6
    for got, want in zip(torch.autograd.grad(loss, params, allow_unused=True),
                         torch.autograd.grad(ref, params, allow_unused=True), strict=True):
        if want is not None and want.norm() > 0:
            assert (got - want).norm() < 1e-6 * want.norm()


@pytest.mark.parametrize("n_components,ratio", [(1, 1e15), (2, 1e14)])
def test_float64_e_step_of_sharp_components(n_components, ratio):
    """The float64 E-step's recorded log-likelihood and responsibility mass against least
    squares: they kept the Woodbury rounding (3.9 and 0.18 nats a row off); now within the
    E-step's tolerance (:data:`mfa.residual_form.E_STEP_TOLERANCE`, 1e-2 nats an entry)."""
    from mfa.statistics import accumulate_statistics

    model, x = sharp_model(n_components, ratio, F64)
    with torch.no_grad():
        got = accumulate_statistics(model, x, model.component_terms())
        joint = least_squares_log_joint(model.weights.log(), model.means,
                                        model.factor_loadings, model.noise_variance, x)
    assert (got.log_likelihood - torch.logsumexp(joint, -1).sum()).abs() < 1e-2 * N
    torch.testing.assert_close(got.mass, torch.softmax(joint, -1).sum(0), rtol=0, atol=1e-2)
