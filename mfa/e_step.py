"""EM's E-step over a data source: the summed sufficient statistics of one streamed pass,
in the precision mode of ``EMConfig.stats_dtype`` (:mod:`mfa.precision`), with the rows that
hold NaN routed to :mod:`mfa.missing` and every process's sums added under torch.distributed.
:meth:`mfa.em.EMTrainer.e_step` is this function."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from mfa import distributed, linalg, missing, pair_kernel
from mfa._data_stream import DEFAULT_BATCH_SIZE, DataSource
from mfa._terms import CONDITION_LIMIT, build_component_terms, ill_conditioned
from mfa._validation import check_positive_real
from mfa.exact_components import ExactComponents
from mfa.model import MixtureOfFactorAnalyzers
from mfa.precision import resolve_stats_dtype
from mfa.statistics import SufficientStatistics, accumulate_statistics

__all__ = ["streamed_e_step"]


def _ill_components(model: MixtureOfFactorAnalyzers, warn: bool) -> Tensor:
    """The components too ill-conditioned for an E-step in the model's dtype ``[K']``;
    with ``warn`` (the whole E-step then goes to float64), a warning names them."""
    ill = ill_conditioned(model.factor_loadings, model.noise_variance).nonzero().flatten()
    if warn and ill.numel():
        warnings.warn(
            f"E-step in float64: component(s) {ill[:10].tolist()} have a capacitance too "
            f"ill-conditioned for {model.dtype} (a noise variance far below its loadings'; "
            f"ε·cond above {CONDITION_LIMIT}), and the data may have missing entries; a "
            "float64 E-step costs 2-4x the time", RuntimeWarning, stacklevel=3)
    return ill


#: The warning of an E-step whose components lie too far apart for its sums.
FAR_APART = (
    "the components lie so far apart, relative to their noise, that the E-step's sums about "
    "one reference point lose more than a nat to rounding even in float64 (rows far from the "
    "rest, such as sentinel values or outliers, pull components there): its statistics and "
    "the recorded log-likelihood may be wrong, and the MAP objective may fall. Remove or "
    "rescale such rows")


def far_apart(terms) -> bool:
    """Whether the expansion about the terms' reference point would lose more than a nat even
    in float64 (``ε₆₄·κ > 1``; the float64 sums and checks cannot recover that). Image rows
    stay far below it: a default Fashion-MNIST fit at K = 200 reached ``ε₃₂·κ`` ≈ 20
    (float32's own limit, past which its diagonal form is taken in float64), ``ε₆₄·κ`` ≈
    4e-8."""
    kappa = terms.rounding / torch.finfo(terms.means.dtype).eps
    return kappa * torch.finfo(torch.float64).eps > 1.0


def streamed_e_step(
    model: MixtureOfFactorAnalyzers, source: DataSource | Tensor, stats_dtype: str = "auto",
    temperature: float | Sequence[float] = 1.0,
) -> SufficientStatistics | list[SufficientStatistics]:
    """One streamed pass: the summed sufficient statistics of every batch.

    ``source``: a :class:`~mfa._data_stream.DataSource`, or what it takes (a tensor
    ``[N, D]``, a ``Dataset``, a ``DataLoader``), streamed in batches of
    :data:`~mfa._data_stream.DEFAULT_BATCH_SIZE` (a tensor was iterated row by row and
    failed in a matrix product).

    ``stats_dtype`` as in :class:`mfa.em.EMConfig` (a ``torch.dtype`` is read as its name). A
    source that allows missing data routes its rows with NaN to :mod:`mfa.missing`.
    The share of a float32 model's components whose ``ε·cond(M)`` exceeds
    :data:`mfa._terms.CONDITION_LIMIT` is taken in float64 whatever ``stats_dtype`` says
    (:mod:`mfa.exact_components`); where the source allows missing data the whole pass then
    is (with a ``RuntimeWarning``).
    ``temperature`` ``T ≠ 1`` takes the sums with responsibilities ``∝ p(k, x)^(1/T)``
    (:mod:`mfa.tempering`; complete data only). A sequence of temperatures gives a list of
    statistics, one per temperature, from one pass that computes the log-densities once (the
    same values as one pass each; over 10,000 Fashion-MNIST rows at K = 100, the tempered
    step's three temperatures took 0.33 s instead of 0.50 s, its two 0.25 s instead of 0.32).
    """
    several = isinstance(temperature, Sequence) and not isinstance(temperature, str)
    if several:
        temperature = [check_positive_real(t, "temperature") for t in temperature]
        if not temperature:
            raise ValueError("temperature: got an empty sequence")
    else:  # (0 or NaN: NaN sums)
        temperature = check_positive_real(temperature, "temperature")
    if not isinstance(source, DataSource):
        source = DataSource(source, model, DEFAULT_BATCH_SIZE, "data")
    if isinstance(stats_dtype, torch.dtype):
        stats_dtype = str(stats_dtype).removeprefix("torch.")
    stats_dtype = resolve_stats_dtype(stats_dtype, model.means.device, model.dtype)
    with torch.no_grad():
        allow_missing = getattr(source, "allow_missing", False)
        ill = (None if model.dtype == torch.float64 or stats_dtype == "float64"
               else _ill_components(model, warn=allow_missing))
        full = model.dtype != torch.float64 and (stats_dtype == "float64" or (
            allow_missing and ill.numel() > 0))
        params = (model.log_weights, model.means, model.factor_loadings, model.noise_variance)
        if full:  # derived from the parameters in float64, not rounded in float32 first
            params = tuple(t.double() for t in params)
        terms = build_component_terms(*params)
        if far_apart(terms):
            warnings.warn(FAR_APART, RuntimeWarning, stacklevel=2)
        chol = linalg.capacitance_cholesky(params[2], params[3])
        exact = (ExactComponents.build(ill, *params, terms.reference)
                 if not full and ill is not None and ill.numel() else None)
        stats = None
        statistics = missing.batch_statistics if allow_missing else accumulate_statistics
        if (several or temperature != 1.0) and statistics is not accumulate_statistics:
            raise ValueError("a tempered E-step needs complete data")
        # observed entries per feature (no host sync: checked once, after the pass)
        observed = torch.zeros(model.n_features, dtype=torch.int64, device=model.means.device)
        # The CPU's compiled pair sums where the data repay their one-time cost
        with pair_kernel.preferred(pair_kernel.worthwhile(_rows(source), model.n_features)):
            for batch in source:
                if allow_missing:
                    observed += (~torch.isnan(batch)).sum(0).to(observed.device)
                if full:
                    batch = batch.double()
                part = statistics(
                    model, batch, terms, chol, stats_dtype=torch.float64,
                    precise_moments=stats_dtype != "float32",
                    precise_latent=stats_dtype == "precise",
                    centred=stats_dtype in ("centred", "centred32"),
                    pair_dtype=torch.float32 if stats_dtype == "centred32" else None,
                    temperature=temperature, exact=exact)
                if several:
                    stats = part if stats is None else [a + b for a, b in zip(stats, part,
                                                                               strict=True)]
                else:
                    stats = part if stats is None else stats + part
        if source.sharded:  # add every process's sums (one all-reduce each)
            stats = ([distributed.all_reduce_statistics(s, model, terms.reference)
                      for s in stats or [None] * len(temperature)] if several else
                     distributed.all_reduce_statistics(stats, model, terms.reference))
        if allow_missing:
            _check_observed(observed, source, stats)
    return stats


def _rows(source: DataSource) -> int | None:
    """The rows a pass over ``source`` reads (every process's), or ``None`` for a stream."""
    if source.tensor is not None:
        return int(source.tensor.shape[0])
    return None if source.dataset is None else len(source.dataset)


def _check_observed(observed: Tensor, source: DataSource,
                    stats: SufficientStatistics | None) -> None:
    """Refuse a pass without an observed entry (its sums are the prior's: EM "converged" on
    nothing); warn of features observed in no row (only the initialisation and the priors set
    their parameters: a noise variance at the floor without a noise prior, under which any
    later observation of them scores ~−10⁵ nats; one the prior alone grows with it)."""
    counts = observed.cpu()
    if source.sharded and distributed.is_active():
        counts = torch.tensor(distributed.sum_across_processes(*counts.tolist()))
    if int(counts.sum()) == 0:
        rows = int(stats.n_rows) if stats is not None else 0
        raise ValueError(f"{source.name} has no observed entry: all of its {rows} rows are "
                         "NaN (missing), so there is nothing to fit")
    never = (counts == 0).nonzero().flatten()
    if never.numel():
        warnings.warn(
            f"{never.numel()} feature(s) of {source.name} are missing (NaN) in every row, e.g. "
            f"{never[:10].tolist()}: EM cannot learn them (only the initialisation and the "
            "priors set their means and variances), so the model's densities of rows "
            "observing them and its samples of them mean nothing; drop those features or "
            "supply values",
            UserWarning, stacklevel=4)
