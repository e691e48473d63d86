"""The residual form and the near-top refinement of float32 log-densities
(:mod:`mfa.residual_form`), against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, gen

from mfa import MixtureOfFactorAnalyzers, linalg, residual_form


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_residual_mahalanobis_matches_dense_float64(grouped, grad, masked):
    """Both strategies (one product per component; gathered loadings), both modes (in place
    without autograd; out of place with it), with and without a mask of observed features,
    against ``(x_o−μ_o)ᵀ Σ_oo⁻¹ (x_o−μ_o)`` from a dense solve, and the gradient against
    ``2 Σ_oo⁻¹ (x_o−μ_o)``."""
    g = gen(5)
    k, d, lat, p = 3, 12, 3, 9
    a = torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = 0.05 + torch.rand(k, d, generator=g, dtype=F64)
    means = torch.randn(k, d, generator=g, dtype=F64)
    # sorted; component 1 has no pair (a piece taken by component, not position, fails)
    comps = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 2])
    rows = torch.randn(p, d, generator=g, dtype=F64).requires_grad_(grad)
    observed = torch.rand(p, d, generator=g) < (0.6 if masked else 2.0)
    mask = observed.to(F64)
    # m = M_o⁻¹ A_oᵀ D_o⁻¹ (x_o − μ_o) from a dense solve (an independent route)
    a_o = a[comps] * mask.unsqueeze(-1)  # [P, D, L], zero rows where hidden
    scaled = a_o / noise[comps].unsqueeze(-1)
    cap = torch.eye(lat, dtype=F64) + scaled.mT @ a_o
    with torch.set_grad_enabled(grad):
        y = (rows - means[comps]) * mask
        posterior = torch.linalg.solve(cap, (scaled.mT @ y.unsqueeze(-1))).squeeze(-1)
        got = residual_form.residual_mahalanobis(rows.clone() if grad else rows.detach().clone(),
                                          comps, means, a, noise.reciprocal(), posterior,
                                          mask=mask if masked else None, grouped=grouped)
    want, grads = [], []
    for i in range(p):
        o = observed[i]
        cov = (a[comps[i]] @ a[comps[i]].T + torch.diag(noise[comps[i]]))[o][:, o]
        yi = (rows[i].detach() - means[comps[i]])[o]
        solved = torch.linalg.solve(cov, yi)
        want.append(yi @ solved)
        grads.append(torch.zeros(d, dtype=F64).index_put((o.nonzero().flatten(),), 2 * solved))
    torch.testing.assert_close(got.detach(), torch.stack(want), rtol=1e-10, atol=0)
    if grad:
        got.sum().backward()
        torch.testing.assert_close(rows.grad, torch.stack(grads), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("grouped", [True, False])
def test_residual_mahalanobis_parameter_gradients_match_dense_float64(grouped):
    """The gradients with respect to the means, loadings and inverse noise variances (the
    ones Adam's exact loss takes) against autograd through a dense solve of
    ``(x−μ)ᵀ Σ⁻¹ (x−μ)`` with ``Σ = A Aᵀ + diag(d)``, components present or not."""
    g = gen(6)
    k, d, lat = 4, 10, 2
    comps = torch.tensor([0, 0, 2, 2, 2, 3])  # sorted; component 1 has no pair
    rows = torch.randn(comps.numel(), d, generator=g, dtype=F64)
    leaves = [torch.randn(k, d, generator=g, dtype=F64),  # means
              torch.randn(k, d, lat, generator=g, dtype=F64),  # loadings
              (1 / (0.1 + torch.rand(k, d, generator=g, dtype=F64)))]  # 1/d
    mine = [t.clone().requires_grad_() for t in leaves]
    dense = [t.clone().requires_grad_() for t in leaves]
    means, a, inv = mine
    with torch.no_grad():  # m is an input of the function (the caller derives it)
        y = rows - leaves[0][comps]
        scaled = leaves[1][comps] * leaves[2][comps].unsqueeze(-1)  # D⁻¹A  [P, D, L]
        cap = torch.eye(lat, dtype=F64) + leaves[1][comps].mT @ scaled
        posterior = torch.linalg.solve(cap, scaled.mT @ y.unsqueeze(-1)).squeeze(-1)
    got = residual_form.residual_mahalanobis(rows.clone(), comps, means, a, inv, posterior,
                                             grouped=grouped)
    (got * torch.arange(1.0, comps.numel() + 1, dtype=F64)).sum().backward()
    dm, da, dinv = dense
    cov = da[comps] @ da[comps].mT + torch.diag_embed(1 / dinv[comps])  # [P, D, D]
    yd = rows - dm[comps]
    want = (yd.unsqueeze(-2) @ torch.linalg.solve(cov, yd.unsqueeze(-1))).flatten()
    (want * torch.arange(1.0, comps.numel() + 1, dtype=F64)).sum().backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=0)
    # (the value is stationary in m, so m held fixed changes no first derivative)
    for leaf, ref in zip(mine, dense, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-8, atol=1e-10)


def test_grouped_residual_backward_assembles_each_gradient_once():
    """The grouped (CPU) strategy's graph holds no per-component slice or select of the
    rows, loadings, means or noise: the backward of each fills and adds a zero gradient of
    the whole tensor, per component (Adam on a sharp Fashion-MNIST model, K = 50, batch
    256: 36 ms a step with them, 24 without, one thread)."""
    g = gen(7)
    k, d, lat = 8, 6, 2
    comps = torch.arange(k).repeat_interleave(3)  # every component, 3 pairs each
    rows = torch.randn(comps.numel(), d, generator=g, dtype=F64, requires_grad=True)
    params = [torch.randn(k, d, dtype=F64, requires_grad=True),
              torch.randn(k, d, lat, dtype=F64, requires_grad=True),
              torch.rand(k, d, dtype=F64).add(0.5).requires_grad_()]
    posterior = torch.randn(comps.numel(), lat, generator=g, dtype=F64)
    out = residual_form.residual_mahalanobis(rows * 1.0, comps, *params, posterior,
                                             grouped=True)
    names, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    per_piece = [n for n in names if n.startswith(("SliceBackward", "SelectBackward",
                                                   "IndexBackward"))]
    assert per_piece == [], per_piece
    out.sum().backward()  # (and the gradients exist)
    assert all(p.grad is not None for p in [rows, *params])


def _woodbury_cancels(noise: float):
    """Loadings that explain nearly all of the variance over noise variances at the
    quantisation level: the Woodbury subtraction cancels ~10⁶-sized terms."""
    from mfa import MixtureOfFactorAnalyzers

    g = gen(11)
    k, d, lat = 3, 200, 4
    params = [torch.full((k,), 1 / 3, dtype=F64), torch.rand(k, d, generator=g, dtype=F64),
              0.3 * torch.randn(k, d, lat, generator=g, dtype=F64),
              torch.full((k, d), noise, dtype=F64)]
    params = [t.float() for t in params]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*params)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in params))
    x, _ = m64.sample(300, generator=g)
    return x.float(), m32, m64


def test_float32_log_prob_keeps_its_precision_where_the_woodbury_term_cancels():
    """float32 densities of rows their component explains well, with noise at 1.3e-6, against
    the float64 model of exactly the same parameters: the Woodbury form alone
    (``exact=False``) is off by tens of nats (measured 54), the default within 0.05
    (measured 0.002); the responsibilities follow."""
    from mfa._terms import component_log_prob_from_terms

    x, m32, m64 = _woodbury_cancels(1.3e-6)
    with torch.no_grad():
        ref = m64.log_prob(x.double())
        got = m32.log_prob(x).double()
        woodbury = linalg.logsumexp(
            component_log_prob_from_terms(x, m32.component_terms(), exact=False)).double()
        assert (woodbury - ref).abs().max() > 3.0
        assert (got - ref).abs().max() < 0.05
        torch.testing.assert_close(m32.responsibilities(x).double(),
                                   m64.responsibilities(x.double()), rtol=0, atol=1e-4)
        torch.testing.assert_close(m32.component_log_prob(x).double().amax(-1),
                                   m64.component_log_prob(x.double()).amax(-1), rtol=0,
                                   atol=0.05)


def test_refine_woodbury_near_top_leaves_entries_far_below_the_top():
    """Only entries within 30 nats (plus slack) of their row's top are recomputed."""
    x, m32, _ = _woodbury_cancels(1e-3)
    terms = m32.component_terms()
    xc = x[:5] - terms.reference
    proj = torch.einsum("nd,kld->nkl", xc, terms.whitened) - terms.whitened_means
    diag = linalg.diagonal_quadratic(xc, terms.means, terms.inv_noise, False)
    scale = terms.log_weights + terms.log_norm
    estimate = torch.zeros(5, 3)
    estimate[:, 1:] = -1000.0  # far below
    got = residual_form.refine_woodbury_near_top(estimate, scale, xc, terms.means, terms.inv_noise,
                                          terms.factors, terms.capacitance_chol, proj, diag)
    assert torch.equal(got[:, 1:], estimate[:, 1:])
    exact = scale[0] - 0.5 * linalg.woodbury_mahalanobis(diag, proj)[:, 0]
    torch.testing.assert_close(got[:, 0], exact, rtol=1e-4, atol=0)


def test_residual_form_where_components_are_alike_and_where_the_capacitance_is_singular():
    """Review cases. Twelve near-identical sharp components: every entry of a row qualifies;
    keeping only the 4 largest estimates left the others tens of nats off (10.9; now 0.004).
    Collinear loading columns over noise 1e-6: float32's C is too inaccurate for the
    residual form (-78.8 against 7.33), so that component keeps the Woodbury form (7.58)."""
    from mfa import MixtureOfFactorAnalyzers
    from mfa._terms import component_log_prob_from_terms

    g = gen(0)
    k, d, lat = 12, 50, 3
    a0 = torch.randn(d, lat, generator=g, dtype=F64)
    mu = torch.rand(d, generator=g, dtype=F64) + 1e-4 * torch.randn(k, d, generator=g,
                                                                    dtype=F64)
    a = a0 + 1e-3 * torch.randn(k, d, lat, generator=g, dtype=F64)
    params = [torch.full((k,), 1 / k, dtype=F64), mu, a, torch.full((k, d), 1e-6, dtype=F64)]
    x = (mu.mean(0) + (a0 @ torch.randn(lat, 20, generator=g, dtype=F64)).T
         + 1e-3 * torch.randn(20, d, generator=g, dtype=F64)).float()
    m32 = MixtureOfFactorAnalyzers.from_parameters(*(t.float() for t in params))
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.float().double() for t in params))
    with torch.no_grad():
        assert (m32.log_prob(x).double() - m64.log_prob(x.double())).abs().max() < 0.05
    loadings = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]]]) * 10
    model = MixtureOfFactorAnalyzers.from_parameters(torch.ones(1), torch.zeros(1, 3), loadings,
                                                     torch.full((1, 3), 1e-6))
    row = torch.tensor([[10.0, 20.0, 5.0]])
    exact = MixtureOfFactorAnalyzers.from_parameters(
        torch.ones(1, dtype=F64), torch.zeros(1, 3, dtype=F64), loadings.double(),
        torch.full((1, 3), 1e-6, dtype=F64)).component_log_prob(row.double())
    with torch.no_grad():
        got = component_log_prob_from_terms(row, model.component_terms()).double()
    assert (got - exact).abs().item() < 1.0


def test_a_component_of_weight_0_leaves_the_ill_conditioned_refinement_on():
    """A Heywood component (one float32 noise variance at 1e-9) beside a component of weight
    0: the weight-0 component's −inf − −inf (NaN) turned the float64 refinement off for every
    row (log p 14 nats off, responsibilities 0.99996 off); the refinement now holds."""
    import copy

    from helpers import DenseMixture, random_parameters

    from mfa import MixtureOfFactorAnalyzers

    p = random_parameters(3, 6, 2, seed=4, dtype=torch.float32)
    p["noise_variance"][1, 2] = 1e-9
    p["weights"][0] = 0.0
    p["weights"] = p["weights"] / p["weights"].sum()
    m32 = MixtureOfFactorAnalyzers.from_parameters(**p)
    m64 = copy.deepcopy(m32).double()
    x = m64.sample(2000, generator=gen(5))[0].float()
    with torch.no_grad():
        ref = DenseMixture.from_model(m64).log_prob(x.double())
        assert (m32.log_prob(x).double() - ref).abs().max() < 1e-3
        torch.testing.assert_close(m32.responsibilities(x).double(),
                                   m64.responsibilities(x.double()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed,noise", [(4, 1e-8), (0, 1e-9), (1, 1e-7)])
def test_float32_log_prob_of_components_ill_conditioned_beyond_their_diagonal(seed, noise):
    """One feature's noise at 1e-7–1e-9 under loadings of size ~3, a second component with
    three features at 10× that (K = 8, D = 200, L = 6), rows drawn from the float64 copy.
    The float64 fallback was chosen by ``ε·(max diag C / min diag C)²``, which for seed 4
    sat at 9e-6 against ``ε·cond(M)`` = 2.4e-3: that component stayed in float32 and log p
    was 5.96 nats off. The predicted error ``(ε·cond)²·‖w‖²`` of each near-top entry now
    decides (measured: 3.5e-4, 3.7e-4, 4.2e-4 nats for the three cases)."""
    from helpers import DenseMixture

    from mfa import MixtureOfFactorAnalyzers

    g = gen(seed)
    k, d, lat = 8, 200, 6
    means = torch.rand(k, d, generator=g, dtype=F64)
    loadings = torch.randn(k, d, lat, generator=g, dtype=F64)
    var = torch.full((k, d), 1e-3, dtype=F64)
    var[1, 3], var[2, 5:8] = noise, noise * 10
    loadings[1, 3] *= 3
    p32 = [torch.full((k,), 1 / k), means.float(), loadings.float(), var.float()]
    m32 = MixtureOfFactorAnalyzers.from_parameters(*p32)
    m64 = MixtureOfFactorAnalyzers.from_parameters(*(t.double() for t in p32))
    x, _ = m64.sample(300, generator=g)
    with torch.no_grad():
        ref = DenseMixture.from_model(m64).log_prob(x)
        got = m32.log_prob(x.float()).double()
    assert (got - ref).abs().max() < 0.01


def test_e_step_refinement_takes_the_gpu_form_alike(monkeypatch):
    """The E-step's residual refinement (refine_e_step_chunk) off the CPU gathers each pair's
    loadings instead of grouping by component: both forms give the same statistics on
    pixel-like rows (noise 1e-6 under loadings of 0.3), where entries are refined."""
    import mfa.residual_form as rf
    from mfa._data_stream import DataSource
    from mfa.e_step import streamed_e_step

    g = torch.Generator().manual_seed(0)
    k, d, lat, n = 2, 20, 2, 300
    means = 0.4 + 0.2 * torch.rand(k, d, generator=g)
    loadings = 0.3 * torch.randn(k, d, lat, generator=g)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means, loadings, torch.full((k, d), 1e-6), min_noise=1e-9)
    comp = torch.randint(0, k, (n,), generator=g)
    x = means[comp] + (loadings[comp] @ torch.randn(n, lat, 1, generator=g)).squeeze(-1)
    x = x + 1e-3 * torch.randn(n, d, generator=g)
    calls = []
    plain = rf.residual_mahalanobis

    def counted(*args, grouped=None, **kwargs):
        calls.append(grouped)
        return plain(*args, grouped=grouped, **kwargs)

    monkeypatch.setattr(rf, "residual_mahalanobis", counted)
    grouped = streamed_e_step(model, DataSource(x, model, 1000), "centred")
    assert calls, "no entry was refined: the test lost its case"
    monkeypatch.setattr(rf, "residual_mahalanobis",
                        lambda *args, grouped=None, **kwargs: plain(*args, grouped=False,
                                                                     **kwargs))
    gathered = streamed_e_step(model, DataSource(x, model, 1000), "centred")
    for name in ("log_likelihood", "mass", "sum_x", "sum_x2", "sum_xz"):
        torch.testing.assert_close(getattr(gathered, name), getattr(grouped, name),
                                   rtol=1e-6, atol=1e-6, msg=name)
