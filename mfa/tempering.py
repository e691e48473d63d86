"""The tempered last step of an ``"auto"`` EM fit: one MAP M-step from smoothed
responsibilities, kept only when it raises the validation score.

After the restarts and re-seeding rounds, :class:`mfa.em.EMTrainer` (``EMConfig.tempered_step``)
computes the E-step statistics with *tempered* responsibilities::

    r_nk(T) ∝ (w_k N(x_n; μ_k, Σ_k))^(1/T)        (T = 1: the posterior)

for ``T`` in ``D/4, D, 4D`` and then, when one of them beats the fit, halfway to the best
one's neighbours (``T/2``, ``2T``; the log-densities of image rows differ by hundreds to
thousands of nats between components, so the temperatures that matter scale with ``D``),
and for each the MAP M-step of the noise prior variances ``s₀`` on the search's grid
(:func:`mfa.prior_search.choose_noise_variance`, scored on the validation rows, warm-started
from the fit's ``s₀`` and then from the nearest temperature's). The best
(``T``, ``s₀``) replaces the model when its validation log-likelihood beats the fit's by
more than :data:`MARGIN` standard errors of the paired per-row gain (the 20 to 35
candidates were chosen on those rows too). The score need not be unimodal in ``T`` (on the embedded
digits at K=50: ``D/8`` scored 1,637 nats, ``D/2`` 1,650, ``D`` 1,917, ``2D`` 1,854),
hence the refinement. Cost: three to five passes over the training rows (each about the
price of an E-step) and about seven validation passes a temperature.

Why: with few rows per component, EM's responsibilities (near 0 or 1) let each component
fit its own rows' pixels to the noise floor, and the noise prior that prevents this also
keeps the variance of pixels that are constant across a component's rows far above the
quantisation level. An M-step from tempered responsibilities pools every component's
statistics over the rows near it (a kernel-smoothed estimate), and the weak prior that step
can then afford lets constant pixels reach their true variance. Measured with the default
``EMConfig`` (L=6, 2 threads): on the embedded digits (4,000 rows) it took held-out bits/dim
from 5.161 to 4.267 at K=100 (``T`` = 2D, ``s₀`` 2.3e-4) and was not applied at K=20, 50,
200; on 10,000 Fashion-MNIST rows it took K=50 from 4.770 to 4.756 (``T`` = D/4) and was
applied at K=200 (``T`` = 2D), not at K=20, 100. Its cost in those fits: 0.1–1.8 s of
0.8–18 s (the same fit timed with and without it).

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
from mfa._terms import component_log_prob_from_terms
from mfa.init import floored_weights
from mfa.model import MixtureOfFactorAnalyzers
from mfa.prior_search import choose_noise_variance
from mfa.priors import Prior
from mfa.statistics import SufficientStatistics, m_step

__all__ = ["TEMPERATURES", "TemperedStep", "tempered_step"]

logger = logging.getLogger(__name__)

#: The temperatures tried first, as multiples of the number of features ``D``.
TEMPERATURES = (1 / 4, 1.0, 4.0)


@dataclass(frozen=True)
class TemperedStep:
    """What :func:`tempered_step` chose: the temperature ``T``, the noise prior variance
    ``s₀`` of the M-step and the validation log-likelihood (mean per row) it reached, against
    ``before``, the fit's own; ``standard_error`` of the paired per-row gain (``nan`` when
    the step did not score above ``before``); ``applied`` when the model was replaced."""

    temperature: float
    noise_prior_variance: float
    val_log_likelihood: float
    before: float
    standard_error: float
    applied: bool


def tempered_step(
    model: MixtureOfFactorAnalyzers,
    e_step: Callable[[float], SufficientStatistics],
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
        e_step: ``T`` → the statistics of one pass over the training rows with
            responsibilities tempered by ``T``.
        validation: the held-out rows.
        prior: the fit's prior (its ``noise_variance`` is replaced by each candidate).
        before: the mean validation log-likelihood of ``model``.
        lower, per_decade: the ``s₀`` grid (:func:`mfa.prior_search.choose_noise_variance`).
        variance_floor: the hard floor of the M-step.
        start: the fit's own ``s₀``, where the first temperature's search starts (each
            later one starts from the ``s₀`` of the nearest temperature tried); ``None``
            searches the whole grid coarse to fine for each.

    Returns:
        The best candidate (``applied`` if the model now holds it); ``None`` when no candidate
        had a finite score.
    """
    best: tuple[float, float, float, SufficientStatistics] | None = None
    tried: dict[float, tuple[float, float]] = {}  # T → (its best score, its s₀)

    def consider(temperature: float) -> None:
        nonlocal best
        stats = e_step(temperature)
        near = start if not tried else tried[min(
            tried, key=lambda t: abs(math.log(t / temperature)))][1]
        s0, scored = choose_noise_variance(model, stats, validation, prior, lower=lower,
                                           per_decade=per_decade,
                                           variance_floor=variance_floor, near=near)
        score = max((value for _, value in scored), default=-math.inf)
        logger.debug("tempered step T=%.4g: s0 %.3g, validation %.6g", temperature, s0, score)
        tried[temperature] = (score, s0)
        if best is None or score > best[0]:
            best = (score, temperature, s0, stats)

    for temperature in (t * model.n_features for t in TEMPERATURES):
        consider(temperature)
    # Halfway to the best tempered one's neighbours (a factor 4 apart), unless none of the
    # three beat the fit (then the step would not be applied from there).
    if best is not None and best[0] > before:
        top = max(tried, key=lambda t: tried[t][0])
        consider(top / 2)
        consider(top * 2)
    if best is None or not math.isfinite(best[0]):
        return None
    score, temperature, s0, stats = best
    applied, error = False, math.nan
    if score > before:
        step_prior = replace(prior, noise_variance=s0)
        with torch.no_grad():
            params = m_step(stats, model, variance_floor=variance_floor, prior=step_prior)
            params["weights"] = floored_weights(step_prior.weight_counts(stats.mass),
                                                params["weights"].dtype)
        saved = training.clone_params(model)
        old = _row_log_probs(model, validation)
        model.set_parameters(**params)
        gain, error = _paired_gain(_row_log_probs(model, validation), old, validation.sharded)
        applied = gain > MARGIN * error
        if not applied:
            model.load_state_dict(saved)
    logger.info("tempered step: T=%.4g, s0 %.3g, validation %.6g against %.6g, standard "
                "error %.3g (%s)", temperature, s0, score, before, error,
                "applied" if applied else "not applied")
    return TemperedStep(temperature, s0, score, before, error, applied)


#: Standard errors by which the step's mean gain over the validation rows must exceed 0.
MARGIN = 2.0


def _row_log_probs(model: MixtureOfFactorAnalyzers, validation: DataSource) -> list[Tensor]:
    """``log p(x)`` of every validation row, per batch (float64, on the CPU)."""
    with torch.no_grad():
        terms = model.component_terms()
        return [linalg.logsumexp(component_log_prob_from_terms(batch, terms)).double().cpu()
                for batch in validation]


def _paired_gain(new: list[Tensor], old: list[Tensor], sharded: bool) -> tuple[float, float]:
    """The mean per-row gain ``log p_new − log p_old`` over the validation rows and its
    standard error (a paired comparison: the same rows under both models; every process's
    rows when ``sharded``)."""
    diff = torch.cat(new) - torch.cat(old)
    total, squares, count = diff.sum(), diff.square().sum(), diff.numel()
    if sharded:
        total, squares, count = distributed.sum_across_processes(total, squares, count)
    count = max(float(count), 1.0)
    mean = float(total) / count
    variance = max(float(squares) / count - mean * mean, 0.0)
    return mean, math.sqrt(variance / count)
