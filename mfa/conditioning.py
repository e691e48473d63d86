"""The math of exact marginals and conditionals of a Mixture of Factor Analyzers.

A conditional of a mixture is a reweighted mixture of the component conditionals::

    p(x_h | x_o) = Σ_k w̃_k N(x_h; μ_k,h|o, Σ_k,h|o),   w̃_k ∝ w_k N(x_o; μ_k,o, Σ_k,oo)

For a factor analyzer the component conditional follows from the latent posterior
``z | x_o ~ N(m, M_o⁻¹)`` with ``M_o = I + A_oᵀ D_o⁻¹ A_o`` and
``m = M_o⁻¹ A_oᵀ D_o⁻¹ (x_o − μ_o)``::

    μ_k,h|o = μ_h + A_h m                       (= μ_h + Σ_ho Σ_oo⁻¹ (x_o − μ_o))
    Σ_k,h|o = A_h M_o⁻¹ A_hᵀ + D_h              (= Σ_hh − Σ_ho Σ_oo⁻¹ Σ_oh)

so the conditional covariance is again low rank plus diagonal, with loadings ``A_h C⁻ᵀ``
(``M_o = C Cᵀ``). Only ``L × L`` matrices are factorised.

Everything here works on parameter tensors and never builds a model: the methods of
:class:`mfa.model.MixtureOfFactorAnalyzers` check their inputs and call these functions, and
:mod:`mfa.inference` offers the same operations as functions of a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mfa import linalg, residual_form
from mfa._terms import check_log_densities, check_noise, check_parameters
from mfa._validation import (
    check_finite,
    check_floating,
    check_mask,
    check_tensor,
    feature_index,
)


def reduce_rank(loadings: Tensor) -> Tensor:
    """Loadings ``[K, n, L]`` with ``L > n`` rewritten as ``[K, n, n]`` with the same ``A Aᵀ``.

    A rank-``L`` term over ``n < L`` features has rank ``<= n``: with ``Aᵀ = Q R`` (reduced
    QR), ``A Aᵀ = Rᵀ R``, so ``Rᵀ`` serves as loadings.
    """
    n, n_lat = loadings.shape[-2:]
    if n_lat <= n:
        return loadings
    _, r = torch.linalg.qr(loadings.mT, mode="reduced")  # [K, n, n]
    return r.mT


def split_features(
    observed_features: object, n_features: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Observed indices (as given) and hidden indices (increasing) of ``n_features``, on
    ``device``; ``observed_features`` are indices or a bool mask ``[D]`` that must leave at
    least one feature hidden."""
    obs = feature_index(observed_features, n_features, "observed_features")
    if obs.numel() == n_features:
        raise ValueError("observed_features covers every feature: nothing is left to condition")
    hidden_mask = torch.ones(n_features, dtype=torch.bool)
    hidden_mask[obs] = False
    return obs.to(device), hidden_mask.nonzero().flatten().to(device)


#: Masked capacitance factors ``C`` of :func:`conditional_components` with ``ε·cond(M_o)``
#: above this (:func:`mfa.residual_form.capacitance_inflation`) are recomputed in float64
#: there (the per-row masks of :func:`row_posterior` use the predicted error of
#: :data:`mfa.residual_form.ILL_CONDITIONED_ERROR`, as the complete-data log-densities do).
#: Until 2026-12-07 both tested ``ε·(max diag C / min diag C)²``, which can sit far below
#: ``ε·cond(M_o)``: a float32 model (noise 8.6e-7, loadings² up to 3.8e9 times it) passed it
#: at 3.5e-6 with ``ε·cond`` 0.46, and ``observed_log_prob`` of a row with 5 of 6 features
#: observed came out 2.0 nats below float64's (2,345 nats in a sharper case), silently.
CONDITION_TOLERANCE = 1e-5


def conditional_components(
    means: Tensor, loadings: Tensor, noise: Tensor, obs: Tensor, hid: Tensor, values: Tensor
) -> tuple[Tensor, Tensor]:
    """Means and loadings of every component conditional ``p(x_h | x_o = values, k)``.

    Args:
        means: ``μ`` [K, D]; loadings: ``A`` [K, D, L]; noise: ``d`` [K, D].
        obs: observed feature indices ``[|o|]``; hid: hidden feature indices ``[|h|]``.
        values: ``x_o`` [|o|].

    Returns:
        ``(μ_h|o [K, |h|], A_h C⁻ᵀ [K, |h|, L])``; the conditional noise is ``d_h``.
    """
    a_o, a_h = loadings[:, obs], loadings[:, hid]  # [K, |o|, L], [K, |h|, L]
    if not loadings.shape[-1]:
        return means[:, hid], a_h
    if obs.numel() <= loadings.shape[-1] and loadings.dtype != torch.float64:
        # Rank-deficient A_o: see the float64 note in row_posterior.
        cond = conditional_components(means.double(), loadings.double(), noise.double(),
                                      obs, hid, values.double())
        return tuple(t.to(loadings.dtype) for t in cond)
    d_o = noise[:, obs]
    chol = linalg.capacitance_cholesky(a_o, d_o)  # [K, L, L]
    if (loadings.dtype != torch.float64
            and bool((residual_form.capacitance_inflation(chol) > CONDITION_TOLERANCE).any())):
        # M_o's eigenvalues too far apart for the dtype (a feature of tiny noise under
        # sizeable loadings): the conditional's mean and factors in float64.
        cond = conditional_components(means.double(), loadings.double(), noise.double(),
                                      obs, hid, values.double())
        return tuple(t.to(loadings.dtype) for t in cond)
    resid = values - means[:, obs]  # [K, |o|]
    b = (a_o / d_o.unsqueeze(-1)).mT @ resid.unsqueeze(-1)  # [K, L, 1]
    m = torch.cholesky_solve(b, chol)  # M_o⁻¹ b, [K, L, 1]
    cond_means = means[:, hid] + (a_h @ m).squeeze(-1)
    cond_loadings = a_h @ linalg.capacitance_inverse_factor(chol)
    return cond_means, cond_loadings


# ---------------------------------------------------------------------- per-row masks


@dataclass
class MaskedTerms:
    """Per-call quantities shared by every chunk of :func:`row_posterior` (built once).

    ``log_w`` [K], ``means`` [K, D], ``loadings`` [K, D, L], ``noise`` [K, D], ``inv_noise``
    [K, D], ``reference`` [D], ``mu`` [K, D] (centred), ``outer`` [D, K·L·L]
    (``A_kj A_kjᵀ / d_kj``), ``scaled`` [D, K·L] (``A/d``), ``mu_scaled`` [D, K·L]
    (``A μ / d``); ``precise``: the diagonal form expanded around ``reference`` would lose
    more than :data:`mfa.linalg.QUADRATIC_TOLERANCE` in the dtype (evaluated in float64;
    in float64 each row's near-top entries recomputed directly). ``outer`` holds
    ``K·D·L²`` values, the largest allocation of masked inference. ``float64``: the same
    terms in float64, built on first use (:meth:`in_float64`).
    """

    log_w: Tensor
    means: Tensor
    loadings: Tensor
    noise: Tensor
    inv_noise: Tensor
    reference: Tensor
    mu: Tensor
    outer: Tensor | None
    scaled: Tensor | None
    mu_scaled: Tensor | None
    precise: bool
    float64: MaskedTerms | None = None

    def in_float64(self) -> MaskedTerms:
        """These terms in float64 (themselves when already float64), built once."""
        if self.loadings.dtype == torch.float64:
            return self
        if self.float64 is None:
            self.float64 = masked_terms(self.log_w.double(), self.means.double(),
                                        self.loadings.double(), self.noise.double())
        return self.float64

    def chunk_size(self, chunk_elements: int, extra_per_row: int = 0) -> int:
        """Rows per chunk so that one chunk's intermediates hold ≲ ``chunk_elements`` values
        (``extra_per_row``: a caller's own, per row)."""
        k, d, n_lat = self.loadings.shape
        per_row = d * 3 + k * (n_lat + 2) ** 2 + extra_per_row
        return max(1, chunk_elements // per_row)


def masked_terms(log_w: Tensor, means: Tensor, loadings: Tensor, noise: Tensor) -> MaskedTerms:
    """:class:`MaskedTerms` of a model with log-weights [K], means [K, D], loadings
    [K, D, L] and noise variances [K, D] (checked by :func:`mfa._terms.check_parameters` and
    :func:`mfa._terms.check_noise`); ``O(K·D·L²)``."""
    check_parameters(log_w, means, loadings, noise)
    check_noise(noise)
    k, d, n_lat = loadings.shape
    inv_noise = noise.reciprocal()  # [K, D]
    reference = (log_w.exp() @ means).detach()
    mu = means - reference  # [K, D]
    outer = scaled_flat = mu_scaled = None
    if n_lat:
        scaled = loadings * inv_noise.unsqueeze(-1)  # D⁻¹A  [K, D, L]
        outer = (scaled.unsqueeze(-1) * loadings.unsqueeze(-2)).permute(1, 0, 2, 3).reshape(d, -1)
        scaled_flat = scaled.permute(1, 0, 2).reshape(d, k * n_lat)
        mu_scaled = (scaled * mu.unsqueeze(-1)).permute(1, 0, 2).reshape(d, k * n_lat)
    precise = linalg.needs_float64_quadratic(mu, inv_noise)
    return MaskedTerms(log_w, means, loadings, noise, inv_noise, reference, mu, outer,
                       scaled_flat, mu_scaled, precise)


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


def masked_capacitance_cholesky(terms: MaskedTerms, mask: Tensor) -> Tensor:
    """Cholesky factors of ``M_o = I + A_oᵀ D_o⁻¹ A_o`` for every row's observed set and
    component: float ``mask`` [n, D] → ``[n, K, L, L]``.

    ``M_o`` is positive definite, but summed in float32 from terms of size ``A²/d`` its
    smallest eigenvalues drown in rounding once the noise is near the quantisation level
    (seen on CUDA: K = 1000 after one EM iteration). Where the float32 factorisation fails,
    the failing rows' and components' ``M_o`` are summed and factored in float64 (in
    component chunks of bounded memory) and the factors returned in ``mask``'s dtype
    (differentiable: the gradients of those slots are the float64 factors').
    """
    k, d, n_lat = terms.loadings.shape
    n = mask.shape[0]
    eye = torch.eye(n_lat, dtype=mask.dtype, device=mask.device)
    cap = (mask @ terms.outer).view(n, k, n_lat, n_lat) + eye
    chol, info = torch.linalg.cholesky_ex(cap)
    failed = info != 0  # [n, K]
    if not bool(failed.any()):
        return chol
    if mask.dtype == torch.float64:
        raise linalg.capacitance_error(terms.loadings, terms.noise, failed.any(0))
    rows = failed.any(1).nonzero().squeeze(1)
    comps = failed.any(0).nonzero().squeeze(1)
    mask64 = mask[rows].double()
    eye64 = eye.double()
    # Factored again with the identity in the failed slots: their failed factorisation, though
    # overwritten below, stayed in the graph and its backward made every gradient NaN.
    chol = torch.linalg.cholesky_ex(torch.where(failed[..., None, None], eye, cap))[0].clone()
    step = max(1, 2**25 // (d * n_lat * n_lat))  # ≤ 256 MB of float64 terms at a time
    for i in range(0, comps.numel(), step):
        c = comps[i : i + step]
        # A A^T/d from the parameters in float64: terms.outer's float32 rounding (ε·|a|²/d)
        # can exceed M_o's smallest eigenvalue (1) and leave the float64 sum indefinite.
        a64 = terms.loadings[c].double()  # [c, D, L]
        outer = (a64 / terms.noise[c].double().unsqueeze(-1)).unsqueeze(-1) * a64.unsqueeze(-2)
        cap64 = (mask64 @ outer.permute(1, 0, 2, 3).reshape(d, -1)).view(
            rows.numel(), -1, n_lat, n_lat) + eye64
        chol64, info = torch.linalg.cholesky_ex(cap64)
        if bool((info != 0).any()):
            bad = torch.zeros(k, dtype=torch.bool, device=c.device)
            bad[c[(info != 0).any(0)]] = True
            raise linalg.capacitance_error(terms.loadings, terms.noise, bad)
        chol[rows.unsqueeze(1), c.unsqueeze(0)] = chol64.to(chol.dtype)
    return chol


def row_posterior(
    terms: MaskedTerms, x: Tensor, observed: Tensor, exact: bool = False
) -> RowPosterior:
    """The latent posterior of every row and component under per-row masks.

    With ``m`` the float mask of a chunk ``[n, D]`` and ``P[j, k] = A_kj A_kjᵀ / d_kj``
    (``[D, K·L·L]``), ``M_o = I + m @ P``; every other quantity is a product of ``m``,
    ``m ⊙ x`` or ``m ⊙ x²`` with a ``[D, ·]`` matrix. Cost ``O(n·K·D·L²)``. With ``exact``,
    each row's near-top log-joints are recomputed in the residual form
    (:func:`mfa.residual_form.residual_mahalanobis`, as the complete-data densities are): the
    Woodbury subtraction loses tens of nats in float32 on rows their component explains well
    with noise near the quantisation level (float64 alike, far sharper: 23 nats with noise
    variances 10¹⁵ below squared loadings of 1). The trainers' E-step turns it on (but in the
    ``"float32"`` mode).

    Rows with at most ``L`` observed features are computed in float64 when ``x`` is not:
    there ``A_o`` has rank ``|o| < L`` (or is square), so ``M_o`` has eigenvalues 1 beside
    ones of size ``A²/d``, and float32 rounding of the large ones (relative 1e-7 of 1e6 and
    more with noise near the quantisation level) lands in the small ones' directions, which
    ``A_h`` maps to the hidden features: conditional means off by the data's own scale.

    Args:
        x: ``[n, D]``, finite where observed; observed: bool ``[n, D]``.
    """
    k, _, n_lat = terms.loadings.shape
    t = terms
    mask = observed.to(x.dtype)
    xc = (x - t.reference) * mask  # zero where hidden
    # Σ_{j∈o} (x_j − μ_kj)² / d_kj  [n, K], in float64 when the expansion would cancel
    # (float64's own near-top entries recomputed directly below).
    quad = linalg.diagonal_quadratic(xc, t.mu, t.inv_noise, t.precise, mask=mask)
    logdet = mask @ t.noise.log().T  # [n, K]
    n_obs = mask.sum(-1, keepdim=True)  # [n, 1]
    n = x.shape[0]
    if n_lat:
        chol = masked_capacitance_cholesky(t, mask)  # [n, K, L, L]
        b = (xc @ t.scaled - mask @ t.mu_scaled).view(n, k, n_lat, 1)  # A_oᵀD_o⁻¹(x_o − μ_o)
        u = torch.linalg.solve_triangular(chol, b, upper=False)  # C⁻¹ b
        latent_mean = torch.linalg.solve_triangular(chol.mT, u, upper=True).squeeze(-1)
        diag_quad, quad = quad, linalg.woodbury_mahalanobis(quad, u.squeeze(-1))
        logdet = logdet + 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        chol = x.new_zeros(n, k, 0, 0)
        latent_mean = x.new_zeros(n, k, 0)
    log_scale = t.log_w + linalg.gaussian_log_normaliser(n_obs, logdet)  # [n, K]
    log_joint = log_scale - 0.5 * quad.clamp_min(0.0)
    if t.precise and x.dtype == torch.float64:  # no wider dtype: the near-top entries directly
        direct = linalg.refine_near_top(
            diag_quad if n_lat else quad, log_joint, xc, t.mu, t.inv_noise,
            linalg.quadratic_rounding(t.mu, t.inv_noise), mask=mask)
        if n_lat:
            diag_quad, quad = direct, linalg.woodbury_mahalanobis(direct, u.squeeze(-1))
        else:
            quad = direct
        log_joint = log_scale - 0.5 * quad.clamp_min(0.0)
    # float64 too: its Woodbury subtraction loses ε·‖w‖² (23 nats with noise variances 10¹⁵
    # below squared loadings of 1), and where its expansion loses precision (t.precise) b
    # cancels as the diagonal form does (0.3 nats at means 10¹⁰ noise sds apart), every
    # near-top entry then; the residual form is stationary in m
    wide = t.precise and x.dtype == torch.float64
    if exact and n_lat:
        rows, comps = residual_form.near_top_pairs(log_joint, diag_quad, diag_quad - quad,
                                            slack=8.0 * linalg.QUADRATIC_TOLERANCE, every=wide)
        if rows.numel():
            maha = residual_form.residual_mahalanobis(
                xc.index_select(0, rows), comps, t.mu, t.loadings, t.inv_noise,
                latent_mean[rows, comps], mask=mask.index_select(0, rows))
            log_joint = log_joint.index_put((rows, comps), log_scale[rows, comps] - 0.5 * maha)
    if n_lat and x.dtype != torch.float64:
        # Rows with at most L observed features, or with a component near the top whose
        # residual form would err by more than ILL_CONDITIONED_ERROR in the dtype (predicted
        # (ε·cond M_o)²·‖w‖², as the complete-data log-densities test it; the Woodbury
        # estimate's own bound ε·cond·‖w‖² widening the window), are recomputed in float64.
        cancelled = (diag_quad - quad).detach().clamp_min(0.0).double()  # ‖w‖²  [n, K]
        limit = residual_form.ILL_CONDITIONED_ERROR
        # ε·cond(M_o) ≤ ε·trace(M_o) = ε·‖C‖²_F (M_o's eigenvalues are at least 1; 50-220×
        # the exact value on a Fashion-MNIST model, 10⁵× on sharper ones), then ≤
        # ε·trace(M_o)·trace(M_o⁻¹) (a triangular solve each, in float64: float32's can
        # fail where it matters): the exact value (eigenvalues, O(L³) each, 0.5 s for 2,000
        # rows × 50 components) only where both bounds predict an error. The first in the
        # dtype, with a margin for its rounding (float64 of all of C took 26 ms of 0.3 s).
        eps = torch.finfo(x.dtype).eps
        inflation = (eps * (1 + 1e-4)) * chol.detach().square().sum((-2, -1)).double()
        suspect = inflation.square() * cancelled > limit  # [n, K]
        if bool(suspect.any()):
            factors = chol.detach()[suspect].double()  # [P, L, L]
            eye = torch.eye(n_lat, dtype=factors.dtype, device=factors.device)
            inverse = torch.linalg.solve_triangular(factors, eye, upper=False)
            tighter = inflation[suspect] * inverse.square().sum((-2, -1))
            inflation = inflation.masked_scatter(suspect, tighter)
            suspect &= inflation.square() * cancelled > limit
        if bool(suspect.any()):
            inflation = inflation.masked_scatter(
                suspect, residual_form.capacitance_inflation(chol[suspect]))
        bound = (inflation * cancelled).to(x.dtype)
        ill = inflation.square() * cancelled > limit
        estimate = log_joint.detach()
        near = estimate >= estimate.amax(-1, keepdim=True) - (
            30.0 + bound + bound.amax(-1, keepdim=True))
        few = ((n_obs.squeeze(-1) <= n_lat) | (ill & near).any(-1)).nonzero().squeeze(-1)
        if few.numel():
            sub = row_posterior(t.in_float64(), x.index_select(0, few).double(),
                                observed.index_select(0, few), exact)
            log_joint = log_joint.index_copy(0, few, sub.log_joint.to(x.dtype))
            latent_mean = latent_mean.index_copy(0, few, sub.latent_mean.to(x.dtype))
            chol = chol.index_copy(0, few, sub.chol.to(x.dtype))
    check_log_densities(log_joint.detach(), t.log_w.detach(), x, t.inv_noise, t.means)
    return RowPosterior(log_joint, latent_mean, chol, t.reference)


def observed_log_prob(
    terms: MaskedTerms, x: Tensor, observed: Tensor, chunk_elements: int
) -> Tensor:
    """``log p(x_o)`` per row; ``x`` [N, D] (zero where hidden), bool ``observed`` [N, D]
    → ``[N]``. A row with nothing observed has ``log p = 0``."""
    size = terms.chunk_size(chunk_elements)
    parts = [
        linalg.logsumexp(row_posterior(terms, x[i : i + size], observed[i : i + size],
                                       exact=True).log_joint)
        for i in range(0, x.shape[0], size)
    ]
    if not parts:
        return x.new_zeros(0)
    # exactly 0 where nothing is observed (the weights' logsumexp rounds to ~1e-7 in float32)
    return torch.cat(parts).masked_fill(~observed.any(-1), 0.0)


def conditional_mean(
    terms: MaskedTerms, x: Tensor, observed: Tensor, chunk_elements: int
) -> Tensor:
    """``E[x_h | x_o]`` per row: ``Σ_k w̃_k (μ_k,h + A_k,h E[z | x_o, k])``.

    Args:
        x: ``[N, D]``, zero where hidden; observed: bool ``[N, D]``.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    k, d, n_lat = terms.loadings.shape
    loadings_flat = terms.loadings.permute(0, 2, 1).reshape(k * n_lat, d)  # [K·L, D]
    size = terms.chunk_size(chunk_elements)
    parts = []
    for i in range(0, x.shape[0], size):
        xi, oi = x[i : i + size], observed[i : i + size]
        post = row_posterior(terms, xi, oi, exact=True)
        resp = torch.softmax(post.log_joint, dim=-1)  # [n, K]
        mean = resp @ terms.means  # [n, D]
        if n_lat:
            weighted = (resp.unsqueeze(-1) * post.latent_mean).reshape(-1, k * n_lat)
            mean = mean + weighted @ loadings_flat
        parts.append(torch.where(oi, xi, mean))
    return torch.cat(parts) if parts else x.clone()


def conditional_sample(
    terms: MaskedTerms,
    x: Tensor,
    observed: Tensor,
    chunk_elements: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One exact sample per row from ``p(x_h | x_o)`` (no gradient is recorded).

    Draw ``k ~ w̃``, ``z ~ N(E[z | x_o, k], M_o⁻¹)``, ``x_h = μ_k,h + A_k,h z + √d_k,h ε``.

    Args:
        x: ``[N, D]``, zero where hidden; observed: bool ``[N, D]``; generator: on ``x``'s
            device.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    _, d, n_lat = terms.loadings.shape
    # each row's loadings A_k [D, L] are gathered (as model.sample counts them): at K = 1,
    # D = 3,072, L = 10 a chunk held 3.3x chunk_elements values in them alone
    size = terms.chunk_size(chunk_elements, extra_per_row=d * n_lat)
    parts = []
    with torch.no_grad():
        noise_std = terms.noise.sqrt()
        for i in range(0, x.shape[0], size):
            xi, oi = x[i : i + size], observed[i : i + size]
            n = xi.shape[0]
            post = row_posterior(terms, xi, oi, exact=True)
            probs = torch.softmax(post.log_joint, dim=-1)
            comp = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [n]
            rows = torch.arange(n, device=x.device)
            eps = torch.randn(n, d, generator=generator, dtype=x.dtype, device=x.device)
            sample = terms.means[comp] + noise_std[comp] * eps
            if n_lat:
                chol = post.chol[rows, comp]  # [n, L, L]
                white = torch.randn(n, n_lat, 1, generator=generator,
                                    dtype=x.dtype, device=x.device)
                # z = m + C⁻ᵀ ε has covariance C⁻ᵀC⁻¹ = M_o⁻¹.
                z = post.latent_mean[rows, comp].unsqueeze(-1) + torch.linalg.solve_triangular(
                    chol.mT, white, upper=True
                )
                sample = sample + (terms.loadings[comp] @ z).squeeze(-1)
            parts.append(torch.where(oi, xi, sample))
    return torch.cat(parts) if parts else x.clone()


def check_masked(
    x: object, observed: object, n_features: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Validate rows ``x`` [N, D] and their mask ``observed`` (bool [N, D]) against a model's
    size, dtype and device; hidden entries may be anything (NaN marks missing data).

    Returns ``x`` with its hidden entries set to zero.
    """
    x = check_tensor(x, "x")
    if x.dim() != 2 or x.shape[-1] != n_features:
        raise ValueError(f"x must have shape [N, {n_features}] (n_features={n_features}), "
                         f"got {tuple(x.shape)}")
    check_floating(x, "x", dtype, device)
    check_mask(observed, "observed", x.shape, device)
    filled = torch.where(observed, x, torch.zeros((), dtype=x.dtype, device=x.device))
    check_finite(filled, "x (its observed entries)")
    return filled
