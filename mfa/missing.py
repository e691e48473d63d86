"""EM from incomplete data: the expected sufficient statistics of rows with missing entries.

Rows mark a missing entry with NaN, a different pattern in every row. EM for a mixture of
factor analyzers then treats the hidden entries ``x_h`` as latent variables beside ``k`` and
``z`` (Ghahramani & Jordan, 1994). For row ``n`` with observed set ``o`` and hidden set ``h``,
component ``k`` (loadings ``A``, noise ``d``, mean ``μ``)::

    M_nk   = I + A_oᵀ D_o⁻¹ A_o                     (the masked capacitance, per row)
    E[z]   = M_nk⁻¹ A_oᵀ D_o⁻¹ (x_o − μ_o),   Cov(z) = M_nk⁻¹,   S = E[z] E[z]ᵀ + M_nk⁻¹
    E[x_h]       = μ_h + A_h E[z]
    E[x_h zᵀ]    = μ_h E[z]ᵀ + A_h S
    E[x_j²]      = μ_j² + 2 μ_j a_j·E[z] + a_j S a_jᵀ + d_j      (j hidden)

and the responsibilities come from the observed-data likelihood ``N(x_o; μ_o, Σ_oo)``
(:func:`mfa.conditioning.row_posterior`). With the mask ``o`` [n, D] and ``h = 1 − o``, every
sum over rows is a matrix product with an ``[n, ·]`` matrix::

    Σ r x    = (o⊙x)ᵀ r + μ ⊙ (hᵀ r) + A · (hᵀ (r⊙E[z]))
    Σ r x zᵀ = (o⊙x)ᵀ (r⊙E[z]) + μ (hᵀ (r⊙E[z])) + A · (hᵀ (r⊙S))
    Σ r x²   = (o⊙x²)ᵀ r + (μ² + d) ⊙ (hᵀ r) + 2 μ ⊙ A · (hᵀ (r⊙E[z])) + A · (hᵀ (r⊙S)) · A

the largest being ``hᵀ (r⊙S)``: ``[D, n] @ [n, K·L·L]``, the same size as the masked
capacitances ``o @ [D, K·L·L]``. The statistics are those of
:class:`mfa.statistics.SufficientStatistics`, so :func:`mfa.m_step.m_step` maximises
them unchanged: that M-step adds ``(Σ r) M⁻¹`` (the complete-data posterior covariance) to
``sum_zz`` itself, so ``sum_zz`` here is ``Σ r S − (Σ r) M⁻¹``, which makes the M-step use
each row's own ``M_nk⁻¹`` exactly. With isotropic noise the M-step's average over features is
exact, because the expected complete-data likelihood covers every feature. Each iteration
never decreases the observed-data log-likelihood; with nothing missing the statistics equal
those of complete-data EM.

Rows with nothing missing go through :func:`mfa.statistics.accumulate_statistics` (cheaper:
no per-row ``L × L`` factorisation); :func:`batch_statistics` routes a batch's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from mfa import linalg
from mfa._data_stream import DEFAULT_BATCH_SIZE, DataSource
from mfa._terms import ComponentTerms
from mfa._validation import all_not_nan
from mfa.conditioning import MaskedTerms, masked_terms, row_posterior
from mfa.model import MixtureOfFactorAnalyzers
from mfa.statistics import SufficientStatistics, accumulate_statistics

__all__ = [
    "batch_statistics",
    "evaluate",
    "impute_column_means",
    "incomplete_statistics",
    "row_log_prob",
]

#: Values held by one chunk's per-row intermediates (about 8 ``[n, K, L, L]`` tensors).
CHUNK_ELEMENTS = 2**23


def impute_column_means(x: Tensor) -> Tensor:
    """``x`` [N, D] with every NaN replaced by its column's mean over the observed entries (a
    column with nothing observed takes the mean of all observed entries, or 0). Used by the
    initialisation (K-means and the complete-data fit run on the imputed rows)."""
    if all_not_nan(x):
        return x
    missing = torch.isnan(x)
    observed = (~missing).to(x.dtype)
    filled = torch.where(missing, torch.zeros((), dtype=x.dtype, device=x.device), x)
    counts = observed.sum(0)  # [D]
    overall = filled.sum() / observed.sum().clamp_min(1)
    means = torch.where(counts > 0, filled.sum(0) / counts.clamp_min(1), overall)  # [D]
    return torch.where(missing, means.expand_as(x), x)


def _rebased_terms(model: MixtureOfFactorAnalyzers, dtype: torch.dtype,
                   reference: Tensor) -> MaskedTerms:
    """:class:`MaskedTerms` of ``model`` in ``dtype``, centred on ``reference`` [D] (the
    complete-data terms' reference point, so the two kinds of sums add up)."""
    params = [p.detach().to(dtype) for p in (
        model.log_weights, model.means, model.factor_loadings, model.noise_variance)]
    terms = masked_terms(*params)
    mu = terms.means - reference  # [K, D]
    k, d, n_lat = terms.loadings.shape
    mu_scaled = terms.mu_scaled
    if n_lat:
        scaled = terms.loadings * terms.inv_noise.unsqueeze(-1)  # [K, D, L]
        mu_scaled = (scaled * mu.unsqueeze(-1)).permute(1, 0, 2).reshape(d, k * n_lat)
    return dataclasses.replace(
        terms, reference=reference, mu=mu, mu_scaled=mu_scaled,
        precise=linalg.needs_float64_quadratic(mu, terms.inv_noise),
    )


def _chunk_rows(k: int, d: int, n_lat: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // (4 * d + k * (8 * n_lat * n_lat + 2 * n_lat + 4)))


def incomplete_statistics(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    reference: Tensor,
    *,
    stats_dtype: torch.dtype = torch.float64,
    precise: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> SufficientStatistics:
    """Expected sufficient statistics of rows with missing entries (see the module notes).

    Args:
        model: the current parameters (used in ``x``'s dtype).
        x: ``[n, D]`` float32 or float64, NaN where an entry is missing; the observed entries
            must be finite (unchecked: :class:`mfa._data_stream.DataSource` checks them).
        reference: ``c`` [D] in ``x``'s dtype: the sums are of ``x − c`` (the reference of
            the complete-data statistics they are added to, ``model.component_terms()``).
        stats_dtype: dtype of the returned sums.
        precise: below float64, each row's near-top log-joints in the residual form
            (``row_posterior(exact=True)``) and every product after the posterior in
            ``stats_dtype``; ``False`` (the ``"float32"`` mode) takes them in ``x``'s dtype.
            A float32 model with noise near the quantisation level otherwise recorded a
            training log-likelihood 30 nats a row off and EM lowered the observed-data
            likelihood (12 of 30 iterations on rows 30 % hidden, K = 2, D = 20, L = 2).
        chunk_elements: rows are processed in chunks whose ``[n, K, L, L]`` intermediates
            hold about this many values.

    Returns:
        :class:`mfa.statistics.SufficientStatistics` whose ``sum_zz`` is
        ``Σ r E[z zᵀ] − (Σ r) M⁻¹`` (the M-step adds the second term back).
    """
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    terms = _rebased_terms(model, x.dtype, reference)
    size = _chunk_rows(k, d, n_lat, chunk_elements)
    total = None
    for i in range(0, x.shape[0], size):
        part = _chunk_statistics(terms, x[i : i + size], stats_dtype, precise)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("incomplete_statistics needs at least one row, got x of shape "
                         f"{tuple(x.shape)}")
    if n_lat:
        # m_step adds (Σ r) M⁻¹ with the complete-data M; take it off here, computed exactly as
        # m_step computes it, so the M-step sees Σ r (E[z]E[z]ᵀ + M_nk⁻¹).
        chol = linalg.capacitance_cholesky(model.factor_loadings.detach().to(stats_dtype),
                                           model.noise_variance.detach().to(stats_dtype))
        total.sum_zz = total.sum_zz - total.mass.view(k, 1, 1) * torch.cholesky_inverse(chol)
    return total


def _chunk_statistics(terms: MaskedTerms, x: Tensor, stats_dtype: torch.dtype,
                      precise: bool = True) -> SufficientStatistics:
    """:func:`incomplete_statistics` of one chunk ``x`` [n, D] (NaN where missing), with
    ``sum_zz = Σ r E[z zᵀ]`` (nothing subtracted yet)."""
    k, d, n_lat = terms.loadings.shape
    n = x.shape[0]
    observed = ~torch.isnan(x)  # [n, D]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    filled = torch.where(observed, x, zero)
    post = row_posterior(terms, filled, observed, exact=precise)
    log_p = linalg.logsumexp(post.log_joint)  # [n]
    s = stats_dtype
    # The products after the posterior: in stats_dtype when precise (their sums over rows
    # feed the noise update, a small difference of large second moments).
    w = s if precise else x.dtype
    resp = torch.exp(post.log_joint - log_p.unsqueeze(-1)).to(w)  # [n, K]
    hidden = (~observed).to(w)  # [n, D]
    # observed x − c, 0 where hidden
    xc = torch.where(observed, x.to(w) - terms.reference.to(w), zero.to(w))
    mu, noise = terms.mu.to(s), terms.noise.to(s)  # [K, D]
    resp_s = resp.to(s)
    xc_s = xc.to(s)
    hr = (hidden.T @ resp).to(s).T  # Σ_n h_nj r_nk  [K, D]
    sum_x = (xc_s.T @ resp_s).T + mu * hr  # [K, D]
    sum_x2 = ((xc_s * xc_s).T @ resp_s).T + (mu * mu + noise) * hr  # [K, D]
    if n_lat:
        ez = post.latent_mean.to(w)  # [n, K, L]
        cov = torch.cholesky_inverse(post.chol.to(w))  # M_nk⁻¹  [n, K, L, L]
        second = ez.unsqueeze(-1) * ez.unsqueeze(-2) + cov  # S  [n, K, L, L]
        rez = resp.unsqueeze(-1) * ez  # [n, K, L]
        rs = resp.view(n, k, 1, 1) * second  # [n, K, L, L]
        rez_flat = rez.reshape(n, k * n_lat)
        rs_flat = rs.reshape(n, k * n_lat * n_lat)
        obs_xz = (xc.T @ rez_flat).to(s).view(d, k, n_lat).permute(1, 0, 2)  # [K, D, L]
        h_rez = (hidden.T @ rez_flat).to(s).view(d, k, n_lat).permute(1, 0, 2)  # [K, D, L]
        h_rs = (hidden.T @ rs_flat).to(s).view(d, k, n_lat, n_lat).permute(1, 0, 2, 3)
        a = terms.loadings.to(s)  # [K, D, L]
        a_rez = (a * h_rez).sum(-1)  # Σ h r a_j·E[z]  [K, D]
        a_rs = (a.unsqueeze(-1) * h_rs).sum(-2)  # Σ h r a_j S  [K, D, L]
        sum_x = sum_x + a_rez
        sum_x2 = sum_x2 + 2.0 * mu * a_rez + (a_rs * a).sum(-1)
        sum_xz = obs_xz + mu.unsqueeze(-1) * h_rez + a_rs
        sum_z = rez.sum(0).to(s)
        sum_zz = rs.sum(0).to(s)
    else:
        sum_xz = x.new_zeros(k, d, 0, dtype=s)
        sum_z = x.new_zeros(k, 0, dtype=s)
        sum_zz = x.new_zeros(k, 0, 0, dtype=s)
    return SufficientStatistics(
        mass=resp_s.sum(0), sum_x=sum_x, sum_x2=sum_x2, sum_xz=sum_xz, sum_z=sum_z,
        sum_zz=sum_zz, log_likelihood=log_p.to(s).sum(),
        n_rows=torch.tensor(n, dtype=s, device=x.device), reference=terms.reference.to(s),
    )


def batch_statistics(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    terms: ComponentTerms,
    chol: Tensor | None = None,
    *,
    stats_dtype: torch.dtype = torch.float64,
    **precision,
) -> SufficientStatistics:
    """E-step statistics of a batch ``x`` [n, D] whose rows may hold NaN (missing entries):
    complete rows by :func:`mfa.statistics.accumulate_statistics` (the same arguments; the
    keyword ``precision`` options, e.g. ``precise_moments``, go to it unchanged), incomplete
    ones by :func:`incomplete_statistics`, centred on ``terms.reference``, ``precise`` unless
    ``precise_moments=False`` (the ``"float32"`` mode).

    Raises:
        ValueError: fixed responsibilities (``resp``) or tempered ones (``temperature`` ≠ 1)
            asked for a batch with incomplete rows: their statistics use the posterior.
    """
    incomplete = torch.isnan(x).any(-1)  # [n]
    if not bool(incomplete.any()):
        return accumulate_statistics(model, x, terms, chol, stats_dtype=stats_dtype, **precision)
    unsupported = ["resp"] if precision.get("resp") is not None else []
    if precision.get("temperature", 1.0) != 1.0:
        unsupported.append(f"temperature={precision['temperature']!r}")
    if unsupported:
        raise ValueError(f"batch_statistics: {' and '.join(unsupported)} cannot be applied to "
                         f"the {int(incomplete.sum())} row(s) with missing entries (NaN); "
                         "pass complete rows, or leave it out")
    stats = incomplete_statistics(model, x[incomplete], terms.reference, stats_dtype=stats_dtype,
                                  precise=precision.get("precise_moments", True))
    if bool(incomplete.all()):
        return stats
    complete = accumulate_statistics(model, x[~incomplete], terms, chol,
                                     stats_dtype=stats_dtype, **precision)
    return complete + stats


def row_log_prob(model: MixtureOfFactorAnalyzers, x: Tensor) -> Tensor:
    """``log p(x_o)`` of every row of ``x`` ``[..., D]`` (NaN where missing), differentiable:
    the full log-density for complete rows, the observed-data marginal for the others →
    ``[...]``. A row with nothing observed scores 0."""
    if not isinstance(x, Tensor):  # (a TypeError, as log_prob's)
        raise TypeError(f"x must be a torch.Tensor [..., D] with D = {model.n_features}, got "
                        f"{type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != model.n_features:
        raise ValueError(f"x must be a tensor [..., D] with D = {model.n_features}, got "
                         f"{tuple(x.shape)}")
    if x.dim() != 2:  # one row [D], or [..., D]: as rows [n, D], the result shaped back
        return row_log_prob(model, x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
    infinite = torch.isinf(x)
    if bool(infinite.any()):  # (checked here: the subsets below would misname the row)
        first = tuple(infinite.nonzero()[0].tolist())
        raise ValueError(f"x contains {int(infinite.sum())} infinite value(s); the first is "
                         f"{x[first].item()} at index {first} (NaN marks a missing entry; "
                         "an observed entry must be finite)")
    observed = ~torch.isnan(x)
    incomplete = ~observed.all(-1)  # [n]
    if not bool(incomplete.any()):
        return model.log_prob(x)
    out = torch.zeros(x.shape[0], dtype=model.dtype, device=x.device)
    rows = x[incomplete]
    out = out.index_put((incomplete.nonzero().flatten(),),
                        model.observed_log_prob(rows, observed[incomplete]))
    if not bool(incomplete.all()):
        out = out.index_put(((~incomplete).nonzero().flatten(),), model.log_prob(x[~incomplete]))
    return out


def evaluate(model: MixtureOfFactorAnalyzers, source: DataSource | Iterable) -> float:
    """Mean observed-data log-likelihood per row (nats) over a source whose rows may hold NaN
    (:func:`mfa.training.evaluate` on a source that allows missing entries; equal to it on
    complete rows)."""
    from mfa import training

    if not isinstance(source, DataSource):
        source = DataSource(source, model, DEFAULT_BATCH_SIZE, "data", allow_missing=True)
    return training.evaluate(model, source)
