"""Choosing the noise prior's variance ``s₀`` on validation data, inside one EM fit.

:class:`mfa.em.EMTrainer` with ``noise_prior_variance="auto"`` runs ``search_warmup`` EM
iterations with the weakest candidate (``s₀`` at the data's lower bound, the quantisation
variance), then, from the statistics of the next E-step (shared by every candidate, so the
search costs no extra pass over the training data), takes the MAP M-step of ``s₀`` values on a
log grid (by golden section, :func:`choose_noise_variance`), scores each on the validation data
and keeps the best; EM then continues with it.
When early stopping's patience runs out, the search runs again from the model EM reached
(up to ``max_searches`` searches a restart): overfitting shows there, where it did not
after the warm-up. A repeated search always moves to a stronger prior (from one grid step
above the previous choice it climbs while the score rises: the first local maximum above
it); EM continues under it, and the restart ends
(returning the best validation parameters) when that stint ends without a better
validation score. On the embedded digits (4,000 rows, K = 200) this took held-out 6.14 to
5.77 bits/dim when it came (``e37ca06``, before the re-seeding rounds and the tempered
step), within 0.01 of the best fixed ``s₀`` hand-tuned on validation then (5.76). The
grid runs from the lower bound (no noise variance of 8-bit data can usefully fall below the
quantisation variance ``1/(12·256²)``) to the largest per-feature variance of the training
data, ``per_decade`` points a decade. The cost is one validation pass per candidate scored
(6 or 7 of the 22 points of 8-bit images' grid for the first search, one to four for a
repeated one).

The first search keeps the best-scoring candidate. The one-standard-error rule of the
tempered step (:func:`mfa.tempering._one_standard_error`: the strongest ``s₀`` within one
standard error of the best) was tried here too, on default fits (2026-12-07), and not
adopted: on the embedded digits (seeds 0–7, K = 20, 50, 100) held-out bits/dim moved by
−0.065 ± 0.047 on average, better at K = 50 and 100 (−0.11, −0.13) but worse at K = 20
(+0.045; one seed +0.54), and on 10,000 Fashion-MNIST rows it lost at K = 20, 50 and 100
(+0.018, +0.002, +0.026). EM continues under the chosen prior, and a repeated search already
moves to a stronger one when early stopping shows overfitting.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from mfa import linalg, training
from mfa._data_stream import DataSource
from mfa._validation import all_finite
from mfa.init import floored_weights
from mfa.m_step import m_steps
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior
from mfa.statistics import SufficientStatistics

__all__ = [
    "choose_noise_variance", "log_grid", "score_candidates", "training_variance",
    "warn_if_floored",
]

logger = logging.getLogger(__name__)


#: The golden section's inner share ``(3 − √5)/2`` of a bracket.
GOLDEN = (3 - math.sqrt(5)) / 2

#: The most points :func:`log_grid` makes (8-bit images' grid spans about 5 decades).
MAX_GRID_POINTS = 10_000


def log_grid(lower: float, upper: float, per_decade: int) -> list[float]:
    """``lower · 10^(i / per_decade)`` for ``i = 0, 1, …`` up to the first point ``≥ upper``
    (just ``[lower]`` when ``upper <= lower``)."""
    if not (lower > 0 and per_decade >= 1):
        raise ValueError(f"need lower > 0 and per_decade >= 1, got {lower!r}, {per_decade!r}")
    if not upper > lower:
        return [float(lower)]
    n = math.ceil(per_decade * math.log10(upper / lower) - 1e-9)
    if n >= MAX_GRID_POINTS:  # (a per-decade count of 10⁹ filled the memory)
        raise ValueError(f"the noise prior's search grid would have {n + 1} points from "
                         f"{lower:.3g} to {upper:.3g}: lower search_per_decade (got "
                         f"{per_decade})")
    return [float(lower * 10 ** (i / per_decade)) for i in range(n + 1)]


def training_variance(stats: SufficientStatistics) -> Tensor:
    """The per-feature variance ``[D]`` of the training rows, from one pass's statistics."""
    n = stats.mass.sum()
    mean = stats.sum_x.sum(0) / n  # [D], about the reference point
    return (stats.sum_x2.sum(0) / n - mean * mean).clamp_min(0.0)


#: :func:`warn_if_floored` warns when the largest per-feature variance of the training data
#: is below this many times the noise variances' floor.
FLOOR_MARGIN = 10.0


def warn_if_floored(stats: SufficientStatistics, floor: float, stacklevel: int = 3,
                    dtype: torch.dtype = torch.float32) -> None:
    """Warn when the training rows' largest per-feature variance (from one pass's ``stats``)
    is below :data:`FLOOR_MARGIN` × the noise variances' ``floor``: every noise variance
    then sits at or near the floor whatever the data, and the fit is the floor's, not the
    data's (features of variance 1e-8 under the default floor of 1e-6 fitted ~18 nats a row
    below the same rows rescaled, silently). Image rows in ``[0, 1]`` have variances near
    0.1. ``dtype``: the rows' (the model's) floating dtype.

    Identical rows, summed over several components, leave a rounding residue (5e-48 for
    float64 rows near 1, 4e-25 for float32 ones) rather than 0: the rows do not vary when
    every feature's variance is within ``(16·ε·|mean|)²`` of 0, ``ε`` the rows' dtype's (a
    float32 model's sums may be float64), feature by feature (one bound from the largest
    mean called rows of a small spread about a large mean constant)."""
    variance = training_variance(stats)  # [D]
    largest = float(variance.max())
    mean = stats.reference + stats.sum_x.sum(0) / stats.mass.sum()  # [D]
    residue = (16 * torch.finfo(dtype).eps * mean.abs()) ** 2
    if bool((variance <= residue).all()):  # (one row, or identical rows: rescaling cannot help)
        warnings.warn(
            f"the training rows do not vary ({float(stats.mass.sum()):.6g} row(s), every "
            "feature constant): every noise variance sits at the floor and the noise prior's "
            "search has a single candidate, so held-out rows that differ score far below a "
            "fit of varied rows. Train on rows that differ, or set noise_prior_variance",
            RuntimeWarning, stacklevel=stacklevel)
    elif largest < FLOOR_MARGIN * floor:
        warnings.warn(
            f"the training data's largest per-feature variance ({largest:.3g}) is below "
            f"{FLOOR_MARGIN:g}x the noise variances' floor ({floor:.3g}): the noise variances "
            "cannot follow the data's scale. Rescale the data (e.g. to unit variance), or "
            "lower the model's min_noise and the trainer's variance_floor and "
            "quantization_variance", RuntimeWarning, stacklevel=stacklevel)


def score_candidates(
    model: MixtureOfFactorAnalyzers,
    stats: SufficientStatistics,
    candidates: list[float],
    prior_for: Callable[[float], Prior],
    variance_floor: float,
    validation: DataSource,
) -> list[float]:
    """The validation log-likelihood (mean per row) after one MAP M-step with each candidate.

    Every candidate starts from the same statistics (of ``model``'s current parameters); the
    model is left as it was. A candidate whose M-step is not finite scores ``-inf``.

    Args:
        model: the model the statistics were computed under.
        stats: that pass's statistics.
        candidates: noise prior variances ``s₀``.
        prior_for: ``s₀`` → the :class:`Prior` of that candidate.
        variance_floor: the hard floor of the M-step.
        validation: the held-out rows.
    """
    saved = training.clone_params(model)
    dtype = stats.mass.dtype
    latent_covariance = None
    if model.n_factors:
        chol = linalg.capacitance_cholesky(model.factor_loadings.detach().to(dtype),
                                           model.noise_variance.detach().to(dtype))
        latent_covariance = torch.cholesky_inverse(chol)
    scores = []
    priors = [prior_for(value) for value in candidates]
    # one loadings' solve for every candidate (they differ only in the noise update)
    steps = m_steps(stats, model, priors, variance_floor=variance_floor,
                    latent_covariance=latent_covariance)
    try:
        for prior in priors:
            with torch.no_grad():
                params = next(steps)
                params["weights"] = floored_weights(prior.weight_counts(stats.mass),
                                                    params["weights"].dtype)
            if not all(all_finite(v) for v in params.values()):
                scores.append(-math.inf)
                continue
            model.set_parameters(**params)
            score = training.evaluate(model, validation)
            scores.append(score if math.isfinite(score) else -math.inf)
            model.load_state_dict(saved)
    finally:
        model.load_state_dict(saved)
    return scores


def choose_noise_variance(
    model: MixtureOfFactorAnalyzers,
    stats: SufficientStatistics,
    validation: DataSource,
    prior: Prior,
    *,
    lower: float,
    per_decade: int,
    variance_floor: float,
    above: float | None = None,
    near: float | None = None,
    log_level: int = logging.INFO,
) -> tuple[float, list[tuple[float, float]]]:
    """The best ``s₀`` of the grid ``log_grid(lower, max training variance, per_decade)``,
    found by a golden-section search over its points: two probes split the bracket in the
    golden ratio and the worse one's outer part is dropped (both non-finite: the weaker
    side's), so most steps after the first score one new point; about ``log_φ(n) + 1``
    validation passes for ``n`` grid points (6 or 7 of 22 on 8-bit images, where the
    coarse-to-fine walk it replaced in 2026-12, a candidate a decade and then halving steps,
    took 11, with the same choices in the eight default fits of ``scripts/baselines.py``).
    It finds the grid's best when the validation score is unimodal in ``log s₀``.

    With ``above`` (a repeated search, which moves to a stronger prior), the walk starts one
    grid step above that value and climbs while the score rises; ``above`` itself comes back
    only when the grid has nothing stronger. The step is taken even when its one-step score
    is lower: a stronger prior pays over the iterations that follow, which one M-step does not
    show (on the embedded digits, K = 200, each step from 0.023 to 0.13 lowered the one-step
    score yet raised the validation score EM reached), and the trainer ends the restart when
    that stint does not beat the best validation score.

    With ``near`` (a warm start: the best value of a similar problem), the walk climbs from
    the grid point nearest it one step at a time while a neighbour scores higher: ``3 + d``
    passes for a best ``d`` grid steps away, the grid's best under the same unimodality. The
    tempered step's warm starts lie about a step from the best on average, where the
    coarse-to-fine passes this replaced (half a decade either side, widened a decade at a
    time while an end scored best, then halving steps) took 5 to 9: over the 78 searches of
    the tempered steps of the eight ``scripts/baselines.py`` default fits, 4.2 passes a
    search instead of 6.0, with the same choices (2026-12).

    Args:
        model, stats: the current model and the statistics of its E-step.
        validation: the held-out rows.
        prior: the other prior settings (its ``noise_variance`` is replaced by each candidate).
        lower: the data's lower bound of a useful noise variance (the grid's first point).
        per_decade: grid points per decade.
        variance_floor: the hard floor of the M-step.
        above: the previous choice, for a repeated search.
        near: a warm start for the hill climb (ignored with ``above``).
        log_level: of the line naming the choice (the tempered step's searches: DEBUG, as
            they choose no prior of the fit).

    Returns:
        ``(best s₀, [(candidate, validation log-likelihood), ...])`` (the candidates scored, in
        grid order); ties go to the smaller.
    """
    upper = float(training_variance(stats).max())
    grid = log_grid(lower, upper, per_decade)
    scored: dict[int, float] = {}

    def score(indices) -> None:
        todo = [i for i in dict.fromkeys(indices) if 0 <= i < len(grid) and i not in scored]
        values = score_candidates(model, stats, [grid[i] for i in todo],
                                  lambda s0: replace(prior, noise_variance=s0), variance_floor,
                                  validation)
        scored.update(zip(todo, values, strict=True))

    def best_of(indices) -> int:
        return max((i for i in indices if i in scored), key=lambda i: (scored[i], -i))

    def nearest(value: float) -> int:
        return min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / value)))

    if above is not None:
        best = nearest(above)
        if best + 1 >= len(grid):  # nothing stronger on the grid
            return above, []
        best += 1
        score([best, best + 1])
        while best + 1 in scored and scored[best + 1] > scored[best]:
            best += 1
            score([best + 1])
    elif near is not None:  # a hill climb from the warm start, one grid step at a time
        best = nearest(near)
        score([best - 1, best, best + 1])
        while (top := best_of([best - 1, best, best + 1])) != best:
            best = top
            score([best - 1, best + 1])
    else:  # golden-section search: the bracket [low, high] keeps the best
        low, high = 0, len(grid) - 1
        while high - low > 2:
            inner = round((high - low) * GOLDEN)  # probes low + inner and high − inner
            a, b = low + inner, high - inner
            if a >= b:  # (a short bracket: probes one apart)
                a, b = low + (high - low) // 2, low + (high - low) // 2 + 1
            score([a, b])
            # Ties go to the smaller, except between probes whose M-step or score is not
            # finite (-inf both): those lie at the weak end, where the M-step overfits.
            if scored[a] > scored[b] or scored[a] == scored[b] > -math.inf:
                high = b
            else:
                low = a
        score(range(low, high + 1))
        best = best_of(range(low, high + 1))
    logger.debug("noise prior variance search: %s", sorted(
        (grid[i], v) for i, v in scored.items()))
    logger.log(log_level, "noise prior variance %.3g chosen from %d of %d candidates in "
               "[%.3g, %.3g] (validation log-likelihood %.6g)", grid[best], len(scored),
               len(grid), grid[0], grid[-1], scored[best])
    return grid[best], [(grid[i], scored[i]) for i in sorted(scored)]


