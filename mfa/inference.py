"""Exact marginals, conditionals and inpainting for a Mixture of Factor Analyzers.

A conditional of a mixture is a reweighted mixture of the component conditionals::

    p(x_h | x_o) = Σ_k w̃_k N(x_h; μ_k,h|o, Σ_k,h|o),   w̃_k ∝ w_k N(x_o; μ_k,o, Σ_k,oo)

For a factor analyzer the component conditional follows from the latent posterior
``z | x_o ~ N(m, M_o⁻¹)`` with ``M_o = I + A_oᵀ D_o⁻¹ A_o`` and
``m = M_o⁻¹ A_oᵀ D_o⁻¹ (x_o − μ_o)``::

    μ_k,h|o = μ_h + A_h m                       (= μ_h + Σ_ho Σ_oo⁻¹ (x_o − μ_o))
    Σ_k,h|o = A_h M_o⁻¹ A_hᵀ + D_h              (= Σ_hh − Σ_ho Σ_oo⁻¹ Σ_oh)

so the conditional covariance is again low rank plus diagonal, with loadings ``A_h C⁻ᵀ``
(``M_o = C Cᵀ``). Only ``L × L`` matrices are factorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mfa import linalg
from mfa._validation import (
    check_data,
    check_finite,
    check_floating,
    check_mask,
    check_tensor,
    feature_index,
)
from mfa.model import MixtureOfFactorAnalyzers, needs_float64_quadratic


def marginal(model: MixtureOfFactorAnalyzers, features) -> MixtureOfFactorAnalyzers:
    """The marginal over ``features`` (see :meth:`MixtureOfFactorAnalyzers.marginal`)."""
    idx = feature_index(features, model.n_features).to(model.device)
    with torch.no_grad():
        raw_noise = model.raw_noise if model.noise == "isotropic" else model.raw_noise[:, idx]
        return _rebuild(
            model, model.logits, model.means[:, idx], model.factor_loadings[:, idx], raw_noise
        )


def _rebuild(
    model: MixtureOfFactorAnalyzers,
    logits: Tensor,
    means: Tensor,
    loadings: Tensor,
    raw_noise: Tensor,
) -> MixtureOfFactorAnalyzers:
    """A model like ``model`` over ``means.shape[1]`` features with these raw parameters.

    The noise is copied in its unconstrained form, so a variance sitting at the floor
    ``min_noise`` stays representable.
    """
    loadings = _reduce_rank(loadings)
    out = MixtureOfFactorAnalyzers(
        model.n_components, means.shape[1], loadings.shape[-1], model.noise,
        min_noise=model.min_noise, dtype=model.dtype, device=model.device,
        chunk_elements=model.chunk_elements,
    )
    with torch.no_grad():
        out.logits.copy_(logits)
        out.loc.copy_(means)
        out.loadings.copy_(loadings)
        out.raw_noise.copy_(raw_noise)
    return out


def _reduce_rank(loadings: Tensor) -> Tensor:
    """Loadings ``[K, n, L]`` with ``L > n`` rewritten as ``[K, n, n]`` with the same ``A Aᵀ``.

    A rank-``L`` term over ``n < L`` features has rank ``<= n``: with ``Aᵀ = Q R`` (reduced
    QR), ``A Aᵀ = Rᵀ R``, so ``Rᵀ`` serves as loadings.
    """
    n, n_lat = loadings.shape[-2:]
    if n_lat <= n:
        return loadings
    _, r = torch.linalg.qr(loadings.mT, mode="reduced")  # [K, n, n]
    return r.mT


def condition(
    model: MixtureOfFactorAnalyzers, observed_features, observed_values: Tensor
) -> MixtureOfFactorAnalyzers:
    """``p(x_h | x_o = observed_values)`` as a :class:`MixtureOfFactorAnalyzers` over the
    hidden features in increasing index order.

    Args:
        observed_features: indices or a bool mask ``[D]``; at least one feature must remain
            hidden.
        observed_values: ``[|o|]``, in the order of ``observed_features``.
    """
    obs = feature_index(observed_features, model.n_features, "observed_features")
    if obs.numel() == model.n_features:
        raise ValueError("observed_features covers every feature: nothing is left to condition")
    hidden_mask = torch.ones(model.n_features, dtype=torch.bool)
    hidden_mask[obs] = False
    hid = hidden_mask.nonzero().flatten().to(model.device)
    obs = obs.to(model.device)
    values = check_data(observed_values, "observed_values", obs.numel(), model.dtype, model.device)
    if values.dim() != 1:
        raise ValueError(
            f"observed_values must have shape [{obs.numel()}], got {tuple(values.shape)}"
        )
    with torch.no_grad():
        means, loadings, noise = model.means, model.factor_loadings, model.noise_variance
        log_evidence = marginal(model, obs).component_log_prob(values)  # [K]
        a_o, a_h = loadings[:, obs], loadings[:, hid]  # [K, |o|, L], [K, |h|, L]
        d_o = noise[:, obs]
        chol = linalg.capacitance_cholesky(a_o, d_o)  # [K, L, L]
        resid = values - means[:, obs]  # [K, |o|]
        b = ((a_o / d_o.unsqueeze(-1)).mT @ resid.unsqueeze(-1))  # [K, L, 1]
        if model.n_factors:
            m = torch.cholesky_solve(b, chol)  # M_o⁻¹ b, [K, L, 1]
            cond_means = means[:, hid] + (a_h @ m).squeeze(-1)
            cond_loadings = a_h @ linalg.capacitance_inverse_factor(chol)
        else:
            cond_means = means[:, hid]
            cond_loadings = a_h
        raw_noise = model.raw_noise if model.noise == "isotropic" else model.raw_noise[:, hid]
        logits = torch.log_softmax(log_evidence, dim=-1)
        return _rebuild(model, logits, cond_means, cond_loadings, raw_noise)


@dataclass
class RowPosterior:
    """Per-row, per-component conditional quantities for one chunk of ``n`` rows.

    ``log_joint`` [n, K]: ``log w_k + log N(x_o; μ_k,o, Σ_k,oo)``; ``latent_mean`` [n, K, L]:
    ``E[z | x_o, k]``; ``chol`` [n, K, L, L]: Cholesky of ``M_o``; ``reference`` [D].
    """

    log_joint: Tensor
    latent_mean: Tensor
    chol: Tensor
    reference: Tensor


@dataclass
class MaskedTerms:
    """Per-call quantities shared by every chunk of :func:`_row_posterior` (built once).

    ``log_w`` [K], ``noise`` [K, D], ``inv_noise`` [K, D], ``reference`` [D], ``mu`` [K, D]
    (centred), ``outer`` [D, K·L·L] (``A_kj A_kjᵀ / d_kj``), ``scaled`` [D, K·L]
    (``A/d``), ``mu_scaled`` [D, K·L] (``A μ / d``). ``outer`` holds ``K·D·L²`` values, the
    largest allocation of masked inference.
    """

    log_w: Tensor
    noise: Tensor
    inv_noise: Tensor
    reference: Tensor
    mu: Tensor
    outer: Tensor | None
    scaled: Tensor | None
    mu_scaled: Tensor | None
    precise: bool


def _masked_terms(model: MixtureOfFactorAnalyzers) -> MaskedTerms:
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    log_w = model.log_weights
    noise = model.noise_variance
    inv_noise = noise.reciprocal()  # [K, D]
    reference = (log_w.exp() @ model.means).detach()
    mu = model.means - reference  # [K, D]
    outer = scaled_flat = mu_scaled = None
    if n_lat:
        a = model.factor_loadings  # [K, D, L]
        scaled = a * inv_noise.unsqueeze(-1)  # D⁻¹A  [K, D, L]
        outer = (scaled.unsqueeze(-1) * a.unsqueeze(-2)).permute(1, 0, 2, 3).reshape(d, -1)
        scaled_flat = scaled.permute(1, 0, 2).reshape(d, k * n_lat)
        mu_scaled = (scaled * mu.unsqueeze(-1)).permute(1, 0, 2).reshape(d, k * n_lat)
    precise = needs_float64_quadratic(mu, inv_noise)
    return MaskedTerms(log_w, noise, inv_noise, reference, mu, outer, scaled_flat, mu_scaled,
                       precise)


def _row_posterior(
    model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor, terms: MaskedTerms
) -> RowPosterior:
    """The latent posterior of every row and component under per-row masks.

    With ``m`` the float mask of a chunk ``[n, D]`` and ``P[j, k] = A_kj A_kjᵀ / d_kj``
    (``[D, K·L·L]``), ``M_o = I + m @ P``; every other quantity is a product of ``m``,
    ``m ⊙ x`` or ``m ⊙ x²`` with a ``[D, ·]`` matrix. Cost ``O(n·K·D·L²)``.
    """
    k, n_lat = model.n_components, model.n_factors
    t = terms
    mask = observed.to(x.dtype)
    xc = (x - t.reference) * mask  # zero where hidden
    # Σ_{j∈o} (x_j − μ_kj)² / d_kj  [n, K], in float64 when the expansion would cancel.
    xq, muq, invq, maskq = (
        (v.double() for v in (xc, t.mu, t.inv_noise, mask)) if t.precise
        else (xc, t.mu, t.inv_noise, mask)
    )
    quad = ((xq * xq) @ invq.T - 2.0 * (xq @ (muq * invq).T) + maskq @ (muq * muq * invq).T)
    quad = quad.to(x.dtype)
    logdet = mask @ t.noise.log().T  # [n, K]
    n_obs = mask.sum(-1, keepdim=True)  # [n, 1]
    n = x.shape[0]
    if n_lat:
        eye = torch.eye(n_lat, dtype=x.dtype, device=x.device)
        cap = (mask @ t.outer).view(n, k, n_lat, n_lat) + eye
        chol = torch.linalg.cholesky(cap)  # [n, K, L, L]
        b = (xc @ t.scaled - mask @ t.mu_scaled).view(n, k, n_lat, 1)  # A_oᵀD_o⁻¹(x_o − μ_o)
        u = torch.linalg.solve_triangular(chol, b, upper=False)  # C⁻¹ b
        latent_mean = torch.linalg.solve_triangular(chol.mT, u, upper=True).squeeze(-1)
        quad = quad - u.squeeze(-1).pow(2).sum(-1)
        logdet = logdet + 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        chol = x.new_zeros(n, k, 0, 0)
        latent_mean = x.new_zeros(n, k, 0)
    log_joint = t.log_w + linalg.gaussian_log_normaliser(n_obs, logdet) - 0.5 * quad.clamp_min(0.0)
    return RowPosterior(log_joint, latent_mean, chol, t.reference)


def _check_masked(model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor) -> Tensor:
    """Validate ``x`` and its mask; hidden entries may be anything (NaN marks missing data).

    Returns ``x`` with its hidden entries set to zero.
    """
    x = check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, {model.n_features}], got {tuple(x.shape)}")
    if x.shape[-1] != model.n_features:
        raise ValueError(
            f"x must have shape [..., {model.n_features}] (n_features={model.n_features}), "
            f"got {tuple(x.shape)}"
        )
    check_floating(x, "x", model.dtype, model.device)
    check_mask(observed, "observed", x.shape, model.device)
    filled = torch.where(observed, x, torch.zeros((), dtype=x.dtype, device=x.device))
    check_finite(filled, "x (its observed entries)")
    return filled


def _chunks(model: MixtureOfFactorAnalyzers, n: int):
    per_row = model.n_features * 3 + model.n_components * (model.n_factors + 2) ** 2
    size = max(1, model.chunk_elements // per_row)
    return range(0, n, size), size


def observed_log_prob(model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor) -> Tensor:
    """``log p(x_o)`` per row under per-row masks; ``[N, D]``, bool ``[N, D]`` → ``[N]``.

    A row with nothing observed has ``log p = 0``.
    """
    x = _check_masked(model, x, observed)
    starts, size = _chunks(model, x.shape[0])
    terms = _masked_terms(model)
    parts = [
        _row_posterior(model, x[i : i + size], observed[i : i + size], terms)
        .log_joint.logsumexp(-1)
        for i in starts
    ]
    return torch.cat(parts) if parts else x.new_zeros(0)


def conditional_mean(model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor) -> Tensor:
    """``E[x_h | x_o]`` per row: ``Σ_k w̃_k (μ_k,h + A_k,h E[z | x_o, k])``.

    Args:
        x: ``[N, D]``; observed: bool ``[N, D]``.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    x = _check_masked(model, x, observed)
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    loadings_flat = model.factor_loadings.permute(0, 2, 1).reshape(k * n_lat, d)  # [K·L, D]
    starts, size = _chunks(model, x.shape[0])
    terms = _masked_terms(model)
    parts = []
    for i in starts:
        xi, oi = x[i : i + size], observed[i : i + size]
        post = _row_posterior(model, xi, oi, terms)
        resp = torch.softmax(post.log_joint, dim=-1)  # [n, K]
        mean = resp @ model.means  # [n, D]
        if n_lat:
            weighted = (resp.unsqueeze(-1) * post.latent_mean).reshape(-1, k * n_lat)
            mean = mean + weighted @ loadings_flat
        parts.append(torch.where(oi, xi, mean))
    return torch.cat(parts) if parts else x.clone()


def conditional_sample(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    observed: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One exact sample per row from ``p(x_h | x_o)``.

    Draw ``k ~ w̃``, ``z ~ N(E[z | x_o, k], M_o⁻¹)``, ``x_h = μ_k,h + A_k,h z + √d_k,h ε``.

    Args:
        x: ``[N, D]``; observed: bool ``[N, D]``; generator: on the model's device.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    x = _check_masked(model, x, observed)
    n_lat = model.n_factors
    starts, size = _chunks(model, x.shape[0])
    parts = []
    with torch.no_grad():
        terms = _masked_terms(model)
        noise_std = model.noise_variance.sqrt()
        for i in starts:
            xi, oi = x[i : i + size], observed[i : i + size]
            n = xi.shape[0]
            post = _row_posterior(model, xi, oi, terms)
            probs = torch.softmax(post.log_joint, dim=-1)
            comp = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [n]
            rows = torch.arange(n, device=x.device)
            eps = torch.randn(n, model.n_features, generator=generator,
                              dtype=x.dtype, device=x.device)
            sample = model.means[comp] + noise_std[comp] * eps
            if n_lat:
                chol = post.chol[rows, comp]  # [n, L, L]
                white = torch.randn(n, n_lat, 1, generator=generator,
                                    dtype=x.dtype, device=x.device)
                # z = m + C⁻ᵀ ε has covariance C⁻ᵀC⁻¹ = M_o⁻¹.
                z = post.latent_mean[rows, comp].unsqueeze(-1) + torch.linalg.solve_triangular(
                    chol.mT, white, upper=True
                )
                sample = sample + (model.factor_loadings[comp] @ z).squeeze(-1)
            parts.append(torch.where(oi, xi, sample))
    return torch.cat(parts) if parts else x.clone()


def inpaint(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    observed: Tensor,
    n_samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Fill the hidden entries of ``x`` with the conditional mean and ``n_samples`` samples.

    Returns:
        ``(mean [N, D], samples [n_samples, N, D])``.
    """
    mean = conditional_mean(model, x, observed)
    samples = [conditional_sample(model, x, observed, generator) for _ in range(n_samples)]
    stacked = torch.stack(samples) if samples else x.new_zeros(0, *x.shape)
    return mean, stacked


__all__ = [
    "marginal",
    "condition",
    "conditional_mean",
    "conditional_sample",
    "observed_log_prob",
    "inpaint",
]
