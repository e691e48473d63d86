"""The tempered last step of an ``"auto"`` EM fit: one MAP M-step from smoothed
responsibilities, kept only when it raises the validation score.

After the restarts and re-seeding rounds, :class:`mfa.em.EMTrainer` (``EMConfig.tempered_step``)
computes the E-step statistics with *tempered* responsibilities::

    r_nk(T) ∝ (w_k N(x_n; μ_k, Σ_k))^(1/T)        (T = 1: the posterior)

for ``T`` in ``D/4, D, 4D`` (the log-densities of image rows differ by hundreds to
thousands of nats between components, so the temperatures that matter scale with ``D``),
and for each the MAP M-step under the fit's prior strength ``ν`` and under ``16ν``
(:data:`STRENGTHS`); then, for each strength whose best of these beats the fit, halfway to
that best temperature's neighbours (``T/2``, ``2T``). Each M-step takes the noise prior variance
``s₀`` on the search's grid (:func:`mfa.prior_search.choose_noise_variance`, scored on the
validation rows, hill-climbing from a warm start: the fit's ``s₀`` (a golden-section search
when the fit has none), then the nearest temperature's of the same strength, or, for a
strength's first search, the other strength's at this temperature scaled to the same
``ν·s₀``; :func:`_warm_start`). The best (``T``,
``ν``, ``s₀``), its ``s₀`` then raised by the one-standard-error rule (the strongest prior
whose validation score is within one standard error of the best's, :func:`_one_standard_error`),
replaces the model when its validation log-likelihood beats the fit's by more
than :data:`MARGIN` standard errors of the paired per-row gain (the 44 to 62 candidates of
the baselines' default fits, ``bench_selection.py`` at ``bb0f416``, were chosen on those rows
too), on at least :data:`MIN_ROWS` validation rows.
The score need not be unimodal in ``T`` (on the embedded digits at K=50: ``D/8`` scored
1,637 nats, ``D/2`` 1,650, ``D`` 1,917, ``2D`` 1,854), hence the refinement. Cost: one or
two passes over the training rows (the first computes the log-densities once for its three
temperatures, about 0.65 of three E-steps; the second, when the refinement runs, for its
two to four, whose statistics it then holds at once) and ``3 + d`` validation passes a
temperature and strength for a best ``d`` grid steps from its warm start (4.2 on average
in the eight default fits of ``scripts/baselines.py``; 6.0 with the coarse-to-fine searches
before 2026-12-07, which made the same choices).

Why: with few rows per component, EM's responsibilities (near 0 or 1) let each component
fit its own rows' pixels to the noise floor, and the noise prior that prevents this also
keeps the variance of pixels that are constant across a component's rows far above the
quantisation level. An M-step from tempered responsibilities pools every component's
statistics over the rows near it (a kernel-smoothed estimate), and the weak prior that step
can then afford lets constant pixels reach their true variance. When it came (``c2feeb4``,
the default ``EMConfig``, L=6, 2 threads, ``ν`` alone): on the embedded digits (4,000 rows)
it took held-out bits/dim from 5.161 to 4.267 at K=100 (``T`` = 2D, ``s₀`` 2.3e-4) and was
not applied at K=20, 50, 200; on 10,000 Fashion-MNIST rows it took K=50 from 4.770 to 4.756
(``T`` = D/4) and was applied at K=200 (``T`` = 2D), not at K=20, 100; it cost 0.3–1.4 s
of 0.7–17 s fits on the digits, 0.5–2.7 s of 5–17 s on Fashion-MNIST (about half the
tempered passes, half the ``s₀`` searches' validation passes). The fits have changed since
(re-seeding rounds, ``16ν``, the refinement, the one-standard-error rule): today's choices
and figures are in ``docs/results/baselines.md`` (at ``23e4f74``: applied at digits K=50,
100, 200 and Fashion-MNIST K=50, 200).

Why ``16ν``: where components have a few dozen rows each, pixels that are constant within
a component's rows (background) keep a noise variance near ``ν·s₀/n_k``, and test rows that
are not constant there score thousands of nats lower. On 3,000 Fashion-MNIST rows at K=50
(60 rows a component) the default fit's held-out bits/dim were 5.611 against 5.433 for
scikit-learn's diagonal GMM, with a median row better than the GMM's (5.185 against 5.349)
and a tail much worse (99th percentile 18.2 against 10.7); ``ν`` alone gave the step
64 ± 34 nats (``T = D``, not applied), ``16ν`` 164 ± 62 (``T = 8D``): 5.146 bits/dim. A
strength 4× the default's for the whole fit reached 5.101 there but lost 0.4–0.7 bits/dim
on the embedded digits, and one M-step's validation score does not tell the two apart
during EM (it preferred ``ν`` on both); in the step, whose one M-step *is* the result, it
does. The eight cases above chose ``ν``, with unchanged results.

The result is not a fixed point of EM: another EM iteration from it would sharpen the
responsibilities again; the step is a validation-chosen estimate, like early stopping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mfa import distributed, linalg, training
from mfa._data_stream import DataSource
from mfa._validation import all_finite
from mfa.init import floored_weights
from mfa.m_step import m_step
from mfa.model import MixtureOfFactorAnalyzers
from mfa.prior_search import choose_noise_variance, log_grid, training_variance
from mfa.priors import Prior
from mfa.statistics import SufficientStatistics

__all__ = ["TEMPERATURES", "TemperedStep", "tempered_step"]

logger = logging.getLogger(__name__)

#: The temperatures tried first, as multiples of the number of features ``D``.
TEMPERATURES = (1 / 4, 1.0, 4.0)

#: The noise prior strengths ``ν`` of the step's M-step, as multiples of the fit's.
STRENGTHS = (1.0, 16.0)


@dataclass(frozen=True)
class TemperedStep:
    """What :func:`tempered_step` chose: the temperature ``T``, the noise prior variance
    ``s₀`` of the M-step and the validation log-likelihood (mean per row) it reached, against
    ``before``, the fit's own; ``standard_error`` of the paired per-row gain (``nan`` when
    the step did not score above ``before``, or with fewer than 2 validation rows);
    ``applied`` when the model was replaced; ``noise_prior_strength``: the M-step's prior
    strength ``ν`` (pseudo-rows); ``best_noise_prior_variance``: the ``s₀`` that scored best
    on validation, from which the one-standard-error rule (:func:`_one_standard_error`) moved
    to ``noise_prior_variance`` (``None`` in a step recorded before the rule)."""

    temperature: float
    noise_prior_variance: float
    val_log_likelihood: float
    before: float
    standard_error: float
    applied: bool
    noise_prior_strength: float
    best_noise_prior_variance: float | None = None


def tempered_step(
    model: MixtureOfFactorAnalyzers,
    e_step: Callable[[list[float]], list[SufficientStatistics]],
    validation: DataSource,
    prior: Prior,
    *,
    before: float,
    lower: float,
    per_decade: int,
    variance_floor: float,
    start: float | None = None,
) -> TemperedStep | None:
    """Try the tempered M-steps of the module docstring on ``model`` and apply the best in
    place when its validation log-likelihood beats ``before``.

    Args:
        model: the fitted model (left as it is unless the step pays).
        e_step: temperatures ``[T, ...]`` → for each, the statistics of the training rows
            with responsibilities tempered by ``T``, from one pass
            (:func:`mfa.e_step.streamed_e_step` given a sequence of temperatures; the three
            temperatures' statistics are then held at once: 3 × ``K·D·(L+2)`` floats).
        validation: the held-out rows (a shuffling DataLoader is read in a fixed order here,
            :meth:`mfa._data_stream.DataSource.in_fixed_order`: the per-row comparisons pair
            passes; another iterable must yield the same rows in the same order each pass).
        prior: the fit's prior (its ``noise_variance`` is replaced by each candidate).
        before: the mean validation log-likelihood of ``model``.
        lower, per_decade: the ``s₀`` grid (:func:`mfa.prior_search.choose_noise_variance`).
        variance_floor: the hard floor of the M-step.
        start: the fit's own ``s₀``, where the first search starts (the others start from
            :func:`_warm_start`'s value); ``None`` searches the whole grid by golden section
            for the first.

    Returns:
        The best candidate (``applied`` if the model now holds it); ``None`` when no candidate
        had a finite score, or when ``validation`` has fewer than :data:`MIN_ROWS` rows (the
        step could not be applied: nothing is tried).
    """
    # The same rows in the same order on every pass: the paired gains subtract passes
    validation = validation.in_fixed_order()
    if too_few_rows(validation, "tempered step"):
        return None
    best: tuple[float, float, float, float, SufficientStatistics] | None = None
    tried: dict[tuple[float, float], tuple[float, float]] = {}  # (T, ν) → (score, s₀)
    strengths = [prior.noise_strength * factor for factor in STRENGTHS]

    def consider(plan: dict[float, list[float]]) -> None:
        # one pass for every temperature, each one's statistics shared by its strengths
        temperatures = list(plan)
        for temperature, stats in zip(temperatures, e_step(temperatures), strict=True):
            search(temperature, stats, plan[temperature])

    def search(temperature: float, stats: SufficientStatistics, among: list[float]) -> None:
        nonlocal best
        for strength in among:
            near = _warm_start(tried, temperature, strength, start)
            s0, scored = choose_noise_variance(
                model, stats, validation, replace(prior, noise_strength=strength),
                lower=lower, per_decade=per_decade, variance_floor=variance_floor, near=near,
                log_level=logging.DEBUG)
            score = max((value for _, value in scored), default=-math.inf)
            logger.debug("tempered step T=%.4g, strength %g: s0 %.3g, validation %.6g",
                         temperature, strength, s0, score)
            tried[temperature, strength] = (score, s0)
            if best is None or score > best[0]:
                best = (score, temperature, strength, s0, stats)

    consider({t * model.n_features: strengths for t in TEMPERATURES})
    # For each strength, halfway to its best temperature's neighbours (a factor 4 apart),
    # unless none of its three beat the fit (then the step would not be applied from there).
    # Every such strength, not only the leader's: on 3,000 Fashion-MNIST rows (K=50) ν led
    # the coarse temperatures (D: 1,404 nats) while 16ν's best was at 4D (1,386), and 16ν
    # at 8D reached 1,514 (held-out 5.12 bits/dim); refining the leader alone (3e1a984 to
    # af31f65) kept ν at D (5.46, worse than scikit-learn's default diagonal GMM).
    refine: dict[float, list[float]] = {}
    for strength in strengths:
        mine = {t: value[0] for (t, nu), value in tried.items() if nu == strength}
        top = max(mine, key=mine.__getitem__)
        if mine[top] > before:
            for temperature in (top / 2, top * 2):
                refine.setdefault(temperature, []).append(strength)
    if refine:
        consider(refine)
    if best is None or not math.isfinite(best[0]):
        return None
    score, temperature, strength, s0, stats = best
    applied, error, best_s0 = False, math.nan, s0
    if score > before:
        step_prior = replace(prior, noise_strength=strength)
        saved = training.clone_params(model)
        old = _row_log_probs(model, validation)
        s0, new, score = _one_standard_error(model, stats, validation, step_prior, s0,
                                             lower=lower, per_decade=per_decade,
                                             variance_floor=variance_floor, saved=saved)
        gain, error, rows = _paired_gain(new, old, validation.sharded)
        applied = rows >= MIN_ROWS and gain > MARGIN * error
        if applied:
            model.set_parameters(**_step_params(model, stats, replace(step_prior,
                                                                      noise_variance=s0),
                                                variance_floor))
    # (no standard error where the best did not beat the fit: "nan" read as a failure)
    logger.info("tempered step: T=%.4g, strength %g, s0 %.3g (best on validation: %.3g), "
                "validation %.6g against %.6g, %s (%s)", temperature, strength, s0, best_s0,
                score, before, f"standard error {error:.3g}" if math.isfinite(error) else
                "no gain over the fit", "applied" if applied else "not applied")
    return TemperedStep(temperature, s0, score, before, error, applied, strength, best_s0)


#: The one-standard-error rule of :func:`_one_standard_error`: a stronger ``s₀`` is taken
#: while the best candidate's mean gain over it is at most this many standard errors.
ONE_SE = 1.0


def _step_params(model: MixtureOfFactorAnalyzers, stats: SufficientStatistics, prior: Prior,
                 variance_floor: float) -> dict[str, Tensor]:
    """The step's M-step parameters under ``prior`` (weights floored as EM's are)."""
    with torch.no_grad():
        params = m_step(stats, model, variance_floor=variance_floor, prior=prior)
        params["weights"] = floored_weights(prior.weight_counts(stats.mass),
                                            params["weights"].dtype)
    return params


def _candidate_rows(model: MixtureOfFactorAnalyzers, stats: SufficientStatistics,
                    validation: DataSource, prior: Prior, variance_floor: float,
                    saved: dict[str, Tensor]) -> list[Tensor] | None:
    """Each validation row's ``log p`` (per batch) under the step's M-step with ``prior``
    (``None`` when that M-step is not finite: the same on every process); the model is left
    as ``saved``. A row's non-finite score is kept: the paired comparison, summed over the
    processes, then fails on every process alike."""
    params = _step_params(model, stats, prior, variance_floor)
    if not all(all_finite(v) for v in params.values()):
        return None
    try:
        model.set_parameters(**params)
        return _row_log_probs(model, validation)
    finally:
        model.load_state_dict(saved)


def _one_standard_error(
    model: MixtureOfFactorAnalyzers, stats: SufficientStatistics, validation: DataSource,
    prior: Prior, s0: float, *, lower: float, per_decade: int, variance_floor: float,
    saved: dict[str, Tensor],
) -> tuple[float, list[Tensor], float]:
    """The one-standard-error rule on the ``s₀`` grid: from the best-scoring ``s₀``, step to
    stronger priors (larger ``s₀``) while the best's mean per-row gain over the candidate is
    at most :data:`ONE_SE` standard errors of that paired gain; returns ``(s₀, its rows'
    log p per batch, their mean)``.

    Why: near its best, the validation score of the step is flat in ``s₀`` over a decade or
    more, while held-out rows differ: the weaker the prior, the closer to the quantisation
    level the noise variances of pixels that are blank in every training row near a
    component, and the more a held-out row with ink there loses (tens of thousands of nats
    at the weakest, for one row in a few hundred). A validation split of a few hundred rows
    holds few such rows, so its mean cannot tell these ``s₀`` apart, and the best of them
    is the weakest by chance as often as not. On the embedded digits (seed 1, K=50,
    ``T = 4D``) ``s₀`` from 1.3e-6 to 2.3e-4 all scored within one standard error of the best
    (4.0e-5) on 500 validation rows, while the 500 test rows' bits/dim went from 5.35 to
    4.63 (4.0e-5: 5.05; the fit before the step: 4.87); the rule took 2.3e-4. Taking the
    most regularised candidate within one standard error of the best is the usual guard of
    cross-validated choices (Breiman et al., 1984; Hastie, Tibshirani and Friedman, *The
    Elements of Statistical Learning*, 7.10). Measured on the step alone, from the same
    fits, against the best-scoring ``s₀`` (2026-12-07): on the embedded digits, seeds 0–7 at
    K = 50 and 100 (500 test rows each), held-out bits/dim 0.19 ± 0.08 better on average;
    the worst results improved most (6.90 → 5.61, 5.09 → 4.56 where the best alone was not
    applied, 5.05 → 4.63; eight gained 0.10 to 1.29 in all), three lost 0.15–0.25 (a
    weaker prior paid there), and five moved by less than 0.02. On Fashion-MNIST (10,000
    training rows, K = 20 to 200; 4,000 rows, seeds 0–3, K = 50 and 100, 10,000 test rows)
    the validation curve is sharper and the choice changed once, by 0.001 bits/dim. Cost:
    one validation pass for the best and one for each step up (one more than taken)."""
    grid = log_grid(lower, float(training_variance(stats).max()), per_decade)
    at = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / s0)))
    best = _candidate_rows(model, stats, validation, replace(prior, noise_variance=s0),
                           variance_floor, saved)
    if best is None:  # (it scored finite in the search: not expected)
        return s0, _row_log_probs(model, validation), -math.inf
    chosen, rows = s0, best
    for value in grid[at + 1:]:
        candidate = _candidate_rows(model, stats, validation,
                                    replace(prior, noise_variance=value), variance_floor, saved)
        if candidate is None:
            break
        loss, error, _ = _paired_gain(best, candidate, validation.sharded)
        if not loss <= ONE_SE * error:  # (also a NaN: a row not finite under one of them)
            break
        chosen, rows = value, candidate
    return chosen, rows, _mean(rows, validation.sharded)


def _mean(rows: list[Tensor], sharded: bool) -> float:
    """The mean of every process's rows' values."""
    total = torch.cat(rows).sum() if rows else torch.zeros((), dtype=torch.float64)
    count = sum(r.numel() for r in rows)
    if sharded:
        total, count = distributed.sum_across_processes(total, count)
    return float(total) / max(int(round(float(count))), 1)


def _warm_start(tried: dict[tuple[float, float], tuple[float, float]], temperature: float,
                strength: float, start: float | None) -> float | None:
    """Where the ``s₀`` search at (``temperature``, ``strength``) starts, from the searches
    ``tried`` so far ((T, ν) → (score, s₀)): the same strength's ``s₀`` at the nearest
    temperature tried (the geometric mean of the two where one lies either side at the same
    distance, as the refinements' ``T/2`` and ``2T`` do); at a strength's first temperature,
    another strength's ``s₀`` at this temperature times the ratio of the strengths (the same
    prior sum of squares ``ν·s₀``; the baselines' 16ν searches chose 3 to 18 times below
    ν's), else ``start``."""
    same = {t: s0 for (t, nu), (_, s0) in tried.items() if nu == strength}
    if same:
        gap = {t: abs(math.log(t / temperature)) for t in same}
        closest = min(gap.values())
        ties = [same[t] for t in same if gap[t] <= closest * (1 + 1e-9)]
        return math.exp(sum(math.log(s0) for s0 in ties) / len(ties))
    other = [(nu, s0) for (t, nu), (_, s0) in tried.items() if t == temperature]
    if other:
        nu, s0 = other[0]
        return s0 * nu / strength
    return start


#: Standard errors by which the step's mean gain over the validation rows must exceed 0.
MARGIN = 2.0

#: Validation rows below which the step is never applied: the standard error of fewer rows'
#: gain says little (with one row it was 0, and the step was applied on any gain: on held-out
#: rows it then lost 1.7 nats a row in 4 of 5 draws).
MIN_ROWS = 10


def too_few_rows(validation: DataSource, what: str) -> bool:
    """Whether ``validation`` has fewer than :data:`MIN_ROWS` rows (every process's), logged
    as ``what`` skipped: a choice made on so few rows' mean is mostly noise (EM's re-seeding
    rounds kept on 1 to 5 rows took the test log-likelihood from -5.6 to -8 to -10 nats a
    row)."""
    rows = _validation_rows(validation)
    if rows < MIN_ROWS:
        logger.info("%s skipped: %d validation row(s), fewer than the %d it needs", what, rows,
                    MIN_ROWS)
    return rows < MIN_ROWS


def _validation_rows(validation: DataSource) -> int:
    """The number of validation rows of every process (a tensor's without a pass), counted
    up to :data:`MIN_ROWS` a process: a stream is read only until it has that many."""
    if validation.tensor is not None:  # (every process holds the whole tensor)
        return int(validation.tensor.shape[0])
    count = 0
    for batch in validation:
        count += batch.shape[0]
        if count >= MIN_ROWS:
            break
    if validation.sharded:
        (count,) = distributed.sum_across_processes(count)
    return int(round(count))


def _row_log_probs(model: MixtureOfFactorAnalyzers, validation: DataSource) -> list[Tensor]:
    """``log p(x)`` of every validation row, per batch (float64, on the CPU): the exact
    log-density, as the candidates were scored (the plain Woodbury form put rows up to 12.5
    nats off float64 under a float32 component with one noise variance at 1e-9)."""
    with torch.no_grad():
        terms = model.component_terms()
        return [linalg.logsumexp(model._component_log_prob(batch, terms, near_rows_only=True)
                                 ).double().cpu() for batch in validation]


def _paired_gain(new: list[Tensor], old: list[Tensor],
                 sharded: bool) -> tuple[float, float, int]:
    """The mean per-row gain ``log p_new − log p_old`` over the validation rows, its standard
    error (from the sample variance; ``nan`` below 2 rows) and the number of rows (a paired
    comparison: the same rows under both models; every process's rows when ``sharded``)."""
    # (a process whose validation shard is empty has no batches: it adds zeros)
    diff = (torch.cat(new) - torch.cat(old)) if new else torch.zeros(0, dtype=torch.float64)
    total, count = diff.sum(), diff.numel()
    if sharded:
        total, count = distributed.sum_across_processes(total, count)
    count = int(round(float(count)))
    mean = float(total) / max(count, 1)
    if count < 2:
        return mean, math.nan, count
    # The squares about the mean (a second pass): Σd² − n·mean² cancels where the gain is
    # large beside its spread (46 % off at a gain of 1e4 nats with a spread of 1e-4).
    squares = (diff - mean).square().sum()
    if sharded:
        (squares,) = distributed.sum_across_processes(squares)
    return mean, math.sqrt(float(squares) / (count - 1) / count), count
