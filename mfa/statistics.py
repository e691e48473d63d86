"""Expected sufficient statistics of an MFA and the M-step that maximises them.

For responsibilities ``r_nk = p(k | x_n)`` and the latent posterior
``z | x, k ~ N(E[z], M_k⁻¹)`` with ``E[z] = M_k⁻¹ A_kᵀ D_k⁻¹ (x − μ_k)``, EM for a mixture of
factor analyzers (Ghahramani & Hinton, 1996) needs, per component::

    Σ r,   Σ r x,   Σ r x²  (diagonal),   Σ r x E[z]ᵀ,   Σ r E[z],   Σ r E[z zᵀ]

All of them are sums over rows, so they are accumulated batch by batch: streaming gives the
same M-step as one full batch. They are computed on ``x − c`` (``c`` the weighted mean of the
means at E-step time, fixed for the pass) and accumulated in float64 by default, so float32
data with a large offset cannot lose the variances to cancellation.

Cost of one batch of ``n`` rows: ``4·n·D·K·(L+2)`` flops in six matrix products — three for
the log-densities and ``E[z]`` (shared with :meth:`MixtureOfFactorAnalyzers.log_prob`) and
three for the sums ``(x−c)ᵀ r``, ``((x−c)²)ᵀ r`` and ``(x−c)ᵀ (r ⊙ E[z])``. With
``precise_moments`` the first two sums (``2·n·D·K`` flops) run in float64, because the M-step
subtracts a squared mean from them; :meth:`mfa.em.EMTrainer.e_step` can also run the whole
batch in float64 (``stats_dtype="float64"``), which makes the M-step exact for float32 models
whose loadings explain most of the variance.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mfa import linalg
from mfa._terms import ComponentTerms
from mfa.linalg import diagonal_quadratic
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior


@dataclass
class SufficientStatistics:
    """Sums over rows (shapes with ``K`` components, ``D`` features, ``L`` factors).

    ``mass`` [K] ``Σ r``; ``sum_x`` [K, D] ``Σ r (x−c)``; ``sum_x2`` [K, D] ``Σ r (x−c)²``;
    ``sum_xz`` [K, D, L] ``Σ r (x−c) E[z]ᵀ``; ``sum_z`` [K, L] ``Σ r E[z]``; ``sum_zz``
    [K, L, L] ``Σ r E[z] E[z]ᵀ`` (the posterior covariance ``M⁻¹`` is added in the M-step);
    ``log_likelihood`` (scalar tensor) ``Σ log p(x)``; ``n_rows`` (scalar tensor);
    ``reference`` [D] ``c``, the same for every batch of one pass.
    """

    mass: Tensor
    sum_x: Tensor
    sum_x2: Tensor
    sum_xz: Tensor
    sum_z: Tensor
    sum_zz: Tensor
    log_likelihood: Tensor
    n_rows: Tensor
    reference: Tensor

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.name != "reference"
        }
        return SufficientStatistics(reference=self.reference, **summed)


def latent_posterior_means(proj: Tensor, chol: Tensor) -> Tensor:
    """``E[z | x, k] = M⁻¹ Aᵀ D⁻¹ (x − μ) = C⁻ᵀ (B (x − μ))`` from ``proj = B(x − μ)``.

    Args:
        proj: ``[n, K, L]``; chol: ``C`` ``[K, L, L]``.

    Returns:
        ``[n, K, L]``.
    """
    # Solve Cᵀ e = proj for every row: move rows last so each component is one solve.
    rhs = proj.permute(1, 2, 0)  # [K, L, n]
    sol = torch.linalg.solve_triangular(chol.mT, rhs, upper=True)
    return sol.permute(2, 0, 1)


def accumulate_statistics(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    terms: ComponentTerms,
    chol: Tensor | None = None,
    *,
    resp: Tensor | None = None,
    stats_dtype: torch.dtype = torch.float64,
    precise_moments: bool = True,
) -> SufficientStatistics:
    """E-step statistics of one batch.

    Args:
        model: supplies the number of components and factors.
        x: ``[n, D]`` in the model's dtype (unchecked).
        terms: ``model.component_terms()`` computed once for the pass.
        chol: the capacitance Cholesky factors ``[K, L, L]`` (recomputed when ``None``).
        resp: fixed responsibilities ``[n, K]`` (e.g. one-hot labels); by default the
            posterior ``p(k | x)`` under the model.
        stats_dtype: dtype of the returned sums (batches are accumulated in it).
        precise_moments: compute ``Σ r x`` and ``Σ r x²`` in ``stats_dtype`` (exact for
            components far from the reference point, but a float64 product is ~3× slower on a
            CPU); ``False`` computes them in ``x``'s dtype like the other sums.

    Returns:
        The batch's :class:`SufficientStatistics`.
    """
    k, n_lat, d = terms.whitened.shape
    xc = x - terms.reference  # [n, D]
    # Log-densities, as in mfa._terms.component_log_prob_from_terms but keeping B(x − μ).
    diag_quad = diagonal_quadratic(xc, terms.means, terms.inv_noise, terms.precise)  # [n, K]
    if n_lat:
        proj = (xc @ terms.whitened.reshape(k * n_lat, d).T).view(-1, k, n_lat)
        proj = proj - terms.whitened_means  # B(x − μ)  [n, K, L]
        maha = linalg.woodbury_mahalanobis(diag_quad, proj)
    else:
        proj = None
        maha = diag_quad
    log_joint = terms.log_weights + terms.log_norm - 0.5 * maha.clamp_min(0.0)  # [n, K]
    log_p = torch.logsumexp(log_joint, dim=-1)  # [n]
    if resp is None:
        resp = torch.exp(log_joint - log_p.unsqueeze(-1))  # [n, K]
    if n_lat:
        if chol is None:
            chol = linalg.capacitance_cholesky(model.factor_loadings, model.noise_variance)
        ez = latent_posterior_means(proj, chol)  # [n, K, L]
        rez = resp.unsqueeze(-1) * ez  # [n, K, L]
        rez_flat = rez.reshape(-1, k * n_lat)
    else:
        rez_flat = resp[:, :0]
    if stats_dtype == x.dtype or not precise_moments:
        # One product for Σ r x and Σ r x E[z]ᵀ, one for Σ r x².
        sums = xc.T @ torch.cat([resp, rez_flat], dim=1)  # [D, K + K·L]
        sum_x, sum_xz_flat = sums[:, :k].T, sums[:, k:]
        sum_x2 = ((xc * xc).T @ resp).T  # [K, D]
    else:
        # Σ r x and Σ r x² in the statistics' dtype: the M-step subtracts the squared mean
        # from the second moment, which cancels in float32 for components far from c.
        xc_s, resp_s = xc.to(stats_dtype), resp.to(stats_dtype)
        sum_x = (xc_s.T @ resp_s).T  # [K, D]
        sum_x2 = ((xc_s * xc_s).T @ resp_s).T  # [K, D]
        sum_xz_flat = xc.T @ rez_flat
    if n_lat:
        sum_xz = sum_xz_flat.reshape(d, k, n_lat).permute(1, 0, 2)  # [K, D, L]
        sum_z = rez.sum(0)
        sum_zz = rez.permute(1, 2, 0) @ ez.permute(1, 0, 2)  # [K, L, L]
    else:
        sum_xz = x.new_zeros(k, d, 0)
        sum_z = x.new_zeros(k, 0)
        sum_zz = x.new_zeros(k, 0, 0)
    out = {
        "mass": resp.sum(0),
        "sum_x": sum_x,
        "sum_x2": sum_x2,
        "sum_xz": sum_xz,
        "sum_z": sum_z,
        "sum_zz": sum_zz,
        "log_likelihood": log_p.sum(),
        "n_rows": torch.tensor(x.shape[0], device=x.device),
    }
    out = {name: value.detach().to(stats_dtype) for name, value in out.items()}
    return SufficientStatistics(reference=terms.reference.detach().to(stats_dtype), **out)


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
    dtype = stats.mass.dtype
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    if prior is not None and prior.is_flat:
        prior = None
    mass = stats.mass  # [K]
    safe = mass.clamp_min(torch.finfo(dtype).tiny ** 0.5)
    if n_lat:
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
        if prior is not None and prior.has_loading_prior:
            # The ridge prior on the loading rows: λ on the loadings' block, not on μ's.
            aug[:, :n_lat, :n_lat] += prior.loading_ridge * torch.eye(
                n_lat, dtype=dtype, device=mass.device
            )
        sum_xzt = torch.cat([stats.sum_xz, stats.sum_x.unsqueeze(-1)], dim=-1)  # [K, D, L+1]
        # Ã_newᵀ = (Σ r E[z̃z̃ᵀ])⁻¹ (Σ r E[z̃] xᵀ): a symmetric positive-definite solve. A tiny
        # ridge keeps it defined for components with (almost) no mass.
        ridge = 1e-10 * aug.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)
        aug = aug + ridge.view(k, 1, 1) * torch.eye(n_lat + 1, dtype=dtype, device=mass.device)
        chol_aug, info = torch.linalg.cholesky_ex(aug)
        solved = torch.cholesky_solve(sum_xzt.mT, chol_aug).mT  # [K, D, L+1]
        loadings = solved[..., :n_lat]
        means_c = solved[..., n_lat]
        scatter = stats.sum_x2 - (solved * sum_xzt).sum(-1)  # [K, D]
        bad = info != 0
    else:
        means_c = stats.sum_x / safe.unsqueeze(-1)
        loadings = stats.sum_xz
        scatter = None
        bad = torch.zeros(k, dtype=torch.bool, device=mass.device)
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
