"""EM's E-step over a data source: the summed sufficient statistics of one streamed pass,
in the precision mode of ``EMConfig.stats_dtype`` (:mod:`mfa.precision`), with the rows that
hold NaN routed to :mod:`mfa.missing` and every process's sums added under torch.distributed.
:meth:`mfa.em.EMTrainer.e_step` is this function."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mfa import distributed, linalg, missing
from mfa._data_stream import DataSource
from mfa._terms import build_component_terms
from mfa.model import MixtureOfFactorAnalyzers
from mfa.precision import resolve_stats_dtype
from mfa.statistics import SufficientStatistics, accumulate_statistics

__all__ = ["CONDITION_LIMIT", "capacitance_condition", "streamed_e_step"]

#: Above this ``ε·cond(M)`` of any component's capacitance ``M = I + AᵀD⁻¹A`` (``ε`` of the
#: model's dtype) a float32 E-step is taken in float64. The float32 sums err by about
#: ``ε·cond(M)`` relative (measured, one feature's noise far below its loadings': 3e-3 → 3e-4
#: relative in ``Σ r E[z]E[z]ᵀ``, 3.5e-2 → 7e-3, 0.5 → 240×, the responsibilities' mass 0.9×
#: off); trained image models sit far below (Fashion-MNIST, K = 50, 20 default iterations:
#: 1.5e-4, sums within 2e-4).
CONDITION_LIMIT = 1e-3


def capacitance_condition(loadings: Tensor, noise: Tensor) -> Tensor:
    """``cond(M)`` of ``M = I + AᵀD⁻¹A`` per component, from its eigenvalues in float64.

    Args: loadings: ``A`` ``[K, D, L]``; noise: ``d`` ``[K, D]``. Returns: ``[K]`` float64
    (ones when ``L = 0``). Cost ``O(K·D·L² + K·L³)``.
    """
    a, d = loadings.detach().double(), noise.detach().double()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    values = torch.linalg.eigvalsh(eye + a.mT @ (a / d.unsqueeze(-1)))  # ascending, ≥ 1
    if values.shape[-1] == 0:
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
    return values[..., -1] / values[..., 0]


def _needs_float64(model: MixtureOfFactorAnalyzers) -> bool:
    """Whether a component is too ill-conditioned for an E-step in the model's dtype; warns."""
    if model.dtype == torch.float64 or model.n_factors == 0:
        return False
    error = torch.finfo(model.dtype).eps * capacitance_condition(model.factor_loadings,
                                                                 model.noise_variance)
    ill = (error > CONDITION_LIMIT).nonzero().flatten().tolist()
    if ill:
        warnings.warn(
            f"E-step in float64: component(s) {ill[:10]} have a capacitance too "
            f"ill-conditioned for {model.dtype} (a noise variance far below its loadings'; "
            f"ε·cond above {CONDITION_LIMIT}); a float64 E-step costs 2-4x the time",
            RuntimeWarning, stacklevel=3)
    return bool(ill)


def streamed_e_step(
    model: MixtureOfFactorAnalyzers, source: DataSource, stats_dtype: str = "auto",
    temperature: float = 1.0,
) -> SufficientStatistics:
    """One streamed pass: the summed sufficient statistics of every batch.

    ``stats_dtype`` as in :class:`mfa.em.EMConfig` (a ``torch.dtype`` is read as its name). A
    source that allows missing data routes its rows with NaN to :mod:`mfa.missing`.
    A float32 model with a component whose ``ε·cond(M)`` exceeds :data:`CONDITION_LIMIT` is
    passed in float64 whatever ``stats_dtype`` says (with a ``RuntimeWarning``).
    ``temperature`` ``T ≠ 1`` takes the sums with responsibilities ``∝ p(k, x)^(1/T)``
    (:mod:`mfa.tempering`; complete data only).
    """
    if isinstance(stats_dtype, torch.dtype):
        stats_dtype = str(stats_dtype).removeprefix("torch.")
    stats_dtype = resolve_stats_dtype(stats_dtype, model.means.device, model.dtype)
    with torch.no_grad():
        full = model.dtype != torch.float64 and (stats_dtype == "float64"
                                                 or _needs_float64(model))
        params = (model.log_weights, model.means, model.factor_loadings, model.noise_variance)
        if full:  # derived from the parameters in float64, not rounded in float32 first
            params = tuple(t.double() for t in params)
        terms = build_component_terms(*params)
        chol = linalg.capacitance_cholesky(params[2], params[3])
        stats = None
        statistics = (missing.batch_statistics if getattr(source, "allow_missing", False)
                      else accumulate_statistics)
        if temperature != 1.0 and statistics is not accumulate_statistics:
            raise ValueError("a tempered E-step needs complete data")
        for batch in source:
            if full:
                batch = batch.double()
            part = statistics(model, batch, terms, chol, stats_dtype=torch.float64,
                              precise_moments=stats_dtype != "float32",
                              precise_latent=stats_dtype == "precise",
                              centred=stats_dtype in ("centred", "centred32"),
                              pair_dtype=torch.float32 if stats_dtype == "centred32" else None,
                              temperature=temperature)
            stats = part if stats is None else stats + part
        if source.sharded:  # add every process's sums (one all-reduce)
            stats = distributed.all_reduce_statistics(stats, model, terms.reference)
    return stats
