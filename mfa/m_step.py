"""The M-step of EM for an MFA: the parameters that maximise the expected complete-data
log-likelihood (or, with :class:`mfa.priors.Prior`, log-posterior) given the sufficient
statistics of one pass (:class:`mfa.statistics.SufficientStatistics`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from mfa import linalg
from mfa._validation import is_real_number
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior
from mfa.statistics import SufficientStatistics

__all__ = ["m_step", "m_steps"]


def m_step(
    stats: SufficientStatistics,
    model: MixtureOfFactorAnalyzers,
    *,
    variance_floor: float,
    latent_covariance: Tensor | None = None,
    prior: Prior | None = None,
) -> dict[str, Tensor]:
    """Maximise the expected complete-data log-likelihood (log-posterior with ``prior``)
    given the statistics.

    With the augmented loadings ``Ã = [A, μ]`` and ``z̃ = [z; 1]`` (mean and loadings are
    updated jointly)::

        Ã_new = (Σ r x E[z̃]ᵀ) (Σ r E[z̃ z̃ᵀ])⁻¹
        d_new = diag(Σ r x² − Ã_new ⊙ Σ r x E[z̃]ᵀ summed over columns) / Σ r
        w_new = Σ r / N

    with ``Σ r E[z zᵀ] = Σ r E[z] E[z]ᵀ + (Σ r) M⁻¹``; isotropic noise averages ``d_new`` over
    features. Every variance is floored at ``variance_floor``. Components with no mass keep
    their current parameters (the caller re-seeds them). With a :class:`~mfa.priors.Prior`
    the update is its MAP form (``λ P`` added to the system, pseudo-counts added to the noise
    and weight updates; see :mod:`mfa.priors`); ``None`` or a flat prior is plain EM.

    Args:
        stats: the pass's statistics.
        model: the model the statistics were computed under (supplies ``M⁻¹`` and shapes).
        variance_floor: lower bound of the noise variances.
        latent_covariance: ``M⁻¹`` ``[K, L, L]``; computed from ``model`` when ``None``.
        prior: the conjugate priors (``None``: none).

    Returns:
        ``{"weights", "means", "factor_loadings", "noise_variance"}`` in the model's dtype,
        ready for :meth:`MixtureOfFactorAnalyzers.set_parameters`.
    """
    return next(m_steps(stats, model, [prior], variance_floor=variance_floor,
                        latent_covariance=latent_covariance))


def m_steps(
    stats: SufficientStatistics,
    model: MixtureOfFactorAnalyzers,
    priors: list[Prior | None],
    *,
    variance_floor: float,
    latent_covariance: Tensor | None = None,
) -> Iterator[dict[str, Tensor]]:
    """:func:`m_step` under each of ``priors`` in turn (yielded one at a time, so that only
    one parameter set is held beside the shared work), the same values as one call each,
    with the loadings' solve (``O(K·D·L²)``, the bulk of the work) done once for the priors
    that share a loading ridge: the noise prior's ``s₀`` and strength and the weights'
    Dirichlet enter only the noise and weight updates (the noise-prior search scores many
    ``s₀`` against one pass's statistics). A bad ``variance_floor`` is refused when called,
    not at the first ``next`` (NaN, infinite or negative floors gave NaN, infinite or
    unfloored noise variances here)."""
    if not (is_real_number(variance_floor) and 0 <= variance_floor < math.inf):  # (NaN: NaNs)
        raise ValueError(f"variance_floor must be a finite number >= 0, got {variance_floor!r}")
    return _m_steps(stats, model, priors, variance_floor, latent_covariance)


def _m_steps(stats: SufficientStatistics, model: MixtureOfFactorAnalyzers,
             priors: list[Prior | None], variance_floor: float,
             latent_covariance: Tensor | None) -> Iterator[dict[str, Tensor]]:
    """:func:`m_steps`' generator, its floor checked."""
    solved: dict[float, tuple] = {}
    for prior in priors:
        if prior is not None and prior.is_flat:
            prior = None
        ridge = prior.loading_ridge if prior is not None and prior.has_loading_prior else 0.0
        if ridge not in solved:
            solved[ridge] = _solve_loadings(stats, model, ridge, latent_covariance)
        yield _finish_m_step(stats, model, prior, variance_floor, *solved[ridge])


def _solve_loadings(stats: SufficientStatistics, model: MixtureOfFactorAnalyzers,
                    loading_ridge: float, latent_covariance: Tensor | None) -> tuple:
    """The part of :func:`m_step` shared by every noise prior: ``(means_c [K, D], loadings
    [K, D, L], scatter [K, D] or None, bad [K])`` (``scatter``: ``Σ r x² − Ã ⊙ Σ r x E[z̃]ᵀ``)."""
    dtype = stats.mass.dtype
    k, n_lat = model.n_components, model.n_factors
    mass = stats.mass  # [K]
    safe = mass.clamp_min(torch.finfo(dtype).tiny ** 0.5)
    if not n_lat:
        return (stats.sum_x / safe.unsqueeze(-1), stats.sum_xz, None,
                torch.zeros(k, dtype=torch.bool, device=mass.device))
    if latent_covariance is None:
        chol = linalg.capacitance_cholesky(
            model.factor_loadings.detach().to(dtype), model.noise_variance.detach().to(dtype)
        )
        latent_covariance = torch.cholesky_inverse(chol)
    cov = latent_covariance.detach().to(dtype)
    ezz = stats.sum_zz + mass.view(k, 1, 1) * cov  # [K, L, L]
    aug = torch.zeros(k, n_lat + 1, n_lat + 1, dtype=dtype, device=mass.device)
    aug[:, :n_lat, :n_lat] = ezz
    aug[:, :n_lat, n_lat] = stats.sum_z
    aug[:, n_lat, :n_lat] = stats.sum_z
    aug[:, n_lat, n_lat] = mass
    if loading_ridge:
        # The ridge prior on the loading rows: λ on the loadings' block, not on μ's.
        aug[:, :n_lat, :n_lat] += loading_ridge * torch.eye(
            n_lat, dtype=dtype, device=mass.device
        )
    sum_xzt = torch.cat([stats.sum_xz, stats.sum_x.unsqueeze(-1)], dim=-1)  # [K, D, L+1]
    # Ã_newᵀ = (Σ r E[z̃z̃ᵀ])⁻¹ (Σ r E[z̃] xᵀ): a symmetric positive-definite solve. A tiny
    # ridge keeps it defined for components with (almost) no mass, only them (on all, it
    # raised noise variances by ~1e-10·|Ã_j|²: 2e-4 relative at 1e-6 under loadings of 0.3).
    weak = mass <= torch.finfo(dtype).eps * mass.sum()  # [K]
    chol_aug, info = torch.linalg.cholesky_ex(aug)
    weak = weak | (info != 0)
    if bool(weak.any()):
        ridge = 1e-10 * aug.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)
        ridged = aug + ridge.view(k, 1, 1) * torch.eye(n_lat + 1, dtype=dtype,
                                                       device=mass.device)
        chol_ridged, info_ridged = torch.linalg.cholesky_ex(ridged)
        chol_aug = torch.where(weak.view(k, 1, 1), chol_ridged, chol_aug)
        info = torch.where(weak, info_ridged, info)
    solved = torch.cholesky_solve(sum_xzt.mT, chol_aug).mT  # [K, D, L+1]
    scatter = stats.sum_x2 - (solved * sum_xzt).sum(-1)  # [K, D]
    return solved[..., n_lat], solved[..., :n_lat], scatter, info != 0


def _finish_m_step(stats: SufficientStatistics, model: MixtureOfFactorAnalyzers,
                   prior: Prior | None, variance_floor: float, means_c: Tensor,
                   loadings: Tensor, scatter: Tensor | None, bad: Tensor) -> dict[str, Tensor]:
    """The noise and weight updates of :func:`m_step` given :func:`_solve_loadings`."""
    dtype = stats.mass.dtype
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    mass = stats.mass  # [K]
    safe = mass.clamp_min(torch.finfo(dtype).tiny ** 0.5)
    if prior is None:
        if scatter is not None:
            noise = scatter / safe.unsqueeze(-1)
        else:
            noise = stats.sum_x2 / safe.unsqueeze(-1) - means_c * means_c
    else:
        if scatter is None:
            scatter = stats.sum_x2 - means_c * stats.sum_x
        extra_scatter, extra_rows = prior.noise_pseudo_counts(n_lat)
        denominator = (mass + extra_rows).clamp_min(torch.finfo(dtype).tiny ** 0.5)
        noise = (scatter + extra_scatter) / denominator.unsqueeze(-1)
    if model.noise == "isotropic":
        noise = noise.mean(-1, keepdim=True).expand(k, d)
    noise = noise.clamp_min(variance_floor)
    counts = mass if prior is None else prior.weight_counts(mass)
    weights = counts / counts.sum()
    means = means_c + stats.reference
    # Components with no mass (or a singular system) keep their parameters.
    keep = (mass <= torch.finfo(dtype).eps * mass.sum()) | bad
    out_dtype = model.dtype
    params = {
        "means": torch.where(keep.unsqueeze(-1), model.means.detach().to(dtype), means),
        "factor_loadings": torch.where(
            keep.view(k, 1, 1), model.factor_loadings.detach().to(dtype), loadings
        ),
        "noise_variance": torch.where(
            keep.unsqueeze(-1), model.noise_variance.detach().to(dtype), noise
        ),
    }
    params = {name: value.to(out_dtype).contiguous() for name, value in params.items()}
    weights = weights.to(out_dtype)
    params["weights"] = weights / weights.sum()
    return params
