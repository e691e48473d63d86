"""The start of an Adam fit (:class:`mfa.sgd.SGDTrainer`): one E-step's statistics choose the
noise prior and take one MAP EM step.

After the initialisation (K-means++ and a factor analysis per cluster), one streamed E-step
over the training rows gives the statistics for both:

- with ``noise_prior_variance="auto"``, ``s₀`` is chosen on the validation data as EM's
  first search chooses it (:func:`mfa.prior_search.choose_noise_variance`: the MAP M-step of
  each candidate on a log grid from the quantisation variance up, scored on validation);
- with ``em_start``, the MAP M-step of the chosen prior is applied, so Adam starts from one
  EM iteration instead of the initialisation.

Adam then runs on the MAP objective with that ``s₀``. Both matter on 8-bit images: without
a noise prior Adam drove the variances of near-constant pixels to the floor and held-out
bits/dim rose from the start (embedded digits, K=50: 7.44); without the EM step Adam spent
its epochs recovering what one EM iteration gives.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from mfa._data_stream import DataSource
from mfa.e_step import streamed_e_step
from mfa.init import floored_weights
from mfa.m_step import m_step
from mfa.model import MixtureOfFactorAnalyzers
from mfa.prior_search import choose_noise_variance, warn_if_floored
from mfa.priors import Prior

__all__ = ["em_start"]

logger = logging.getLogger(__name__)


def em_start(model: MixtureOfFactorAnalyzers, source: DataSource,
             validation: DataSource | None, prior: Prior, *, auto: bool, step: bool,
             lower: float, per_decade: int,
             variance_floor: float) -> tuple[float, float | None]:
    """Choose ``s₀`` (``auto``) and take one MAP EM step (``step``) in place; returns the
    ``s₀`` Adam's penalty uses and the training rows the pass read (every process's; ``None``
    without a pass).

    Args:
        model: the initialised model (changed in place when ``step``).
        source: the training rows (sums added across processes when sharded).
        validation: held-out rows scoring the ``s₀`` candidates (``None``: ``lower`` is used).
        prior: the trainer's priors; its ``noise_variance`` is the fixed ``s₀`` when not
            ``auto``.
        auto: choose ``s₀`` on ``validation``.
        step: apply the MAP M-step of the chosen prior.
        lower: the grid's lower end (the quantisation variance of the data).
        per_decade: grid points per decade.
        variance_floor: the M-step's hard floor (above the model's ``min_noise``).
    """
    if not auto and not step:
        return prior.noise_variance, None
    stats = streamed_e_step(model, source)
    warn_if_floored(stats, variance_floor, 4, model.dtype)
    s0 = prior.noise_variance
    if auto:
        s0 = lower
        if validation is not None:
            s0, _ = choose_noise_variance(model, stats, validation, prior, lower=lower,
                                          per_decade=per_decade, variance_floor=variance_floor)
    if step:
        chosen = replace(prior, noise_variance=s0)
        with torch.no_grad():
            params = m_step(stats, model, variance_floor=variance_floor, prior=chosen)
            params["weights"] = floored_weights(chosen.weight_counts(stats.mass),
                                                params["weights"].dtype)
        if all(bool(torch.isfinite(value).all()) for value in params.values()):
            model.set_parameters(**params)
        else:
            logger.warning("Adam's start: the EM step is not finite; starting from the "
                           "initialisation")
    return s0, float(stats.n_rows)
