"""Marginals, conditionals and inpainting of a Mixture of Factor Analyzers, as functions.

A conditional of a mixture is a reweighted mixture of the component conditionals::

    p(x_h | x_o) = Σ_k w̃_k N(x_h; μ_k,h|o, Σ_k,h|o),   w̃_k ∝ w_k N(x_o; μ_k,o, Σ_k,oo)

and each component conditional is again a factor analyzer, so every result is exact and
only ``L × L`` matrices are factorised. The formulas are in :mod:`mfa.conditioning`; these
functions are the methods of :class:`~mfa.model.MixtureOfFactorAnalyzers` of the same names
(``mfa.condition(model, ...)`` is ``model.condition(...)``), plus :func:`inpaint`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from mfa._validation import check_generator
from mfa.model import MixtureOfFactorAnalyzers


def marginal(
    model: MixtureOfFactorAnalyzers, features: Sequence[int] | Tensor
) -> MixtureOfFactorAnalyzers:
    """The marginal over ``features`` (indices, or a bool mask ``[D]``), as a model over
    ``len(features)`` features in the given order. See
    :meth:`MixtureOfFactorAnalyzers.marginal`."""
    return model.marginal(features)


def condition(
    model: MixtureOfFactorAnalyzers,
    observed_features: Sequence[int] | Tensor,
    observed_values: Tensor,
) -> MixtureOfFactorAnalyzers:
    """``p(x_h | x_o = observed_values)`` as a :class:`MixtureOfFactorAnalyzers` over the
    hidden features in increasing index order.

    Args:
        observed_features: indices or a bool mask ``[D]``; at least one feature must remain
            hidden.
        observed_values: ``[|o|]``, in the order of ``observed_features``.
    """
    return model.condition(observed_features, observed_values)


def observed_log_prob(model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor) -> Tensor:
    """``log p(x_o)`` per row under per-row masks; ``[N, D]``, bool ``[N, D]`` → ``[N]``.

    A row with nothing observed has ``log p = 0``.
    """
    return model.observed_log_prob(x, observed)


def conditional_mean(model: MixtureOfFactorAnalyzers, x: Tensor, observed: Tensor) -> Tensor:
    """``E[x_h | x_o]`` per row: ``Σ_k w̃_k (μ_k,h + A_k,h E[z | x_o, k])``.

    Args:
        x: ``[N, D]`` (hidden entries ignored, may be NaN); observed: bool ``[N, D]``.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    return model.conditional_mean(x, observed)


def conditional_sample(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    observed: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One exact sample per row from ``p(x_h | x_o)``.

    Draw ``k ~ w̃``, ``z ~ N(E[z | x_o, k], M_o⁻¹)``, ``x_h = μ_k,h + A_k,h z + √d_k,h ε``.

    Args:
        x: ``[N, D]``; observed: bool ``[N, D]``; generator: on the model's device.

    Returns:
        ``[N, D]``, equal to ``x`` where observed.
    """
    return model.conditional_sample(x, observed, generator=generator)


def inpaint(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    observed: Tensor,
    n_samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Fill the hidden entries of ``x`` with the conditional mean and ``n_samples`` samples.

    Returns:
        ``(mean [N, D], samples [n_samples, N, D])``, without an autograd graph (inpainting
        is inference: a graph through the masked terms would hold ``O(N·K·L²)`` memory).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or \
            n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
    n_samples = int(n_samples)
    check_generator(generator, device=model.device)  # (before the mean: an int failed inside
    # torch after it)
    with torch.no_grad():
        mean = conditional_mean(model, x, observed)
    samples = [conditional_sample(model, x, observed, generator) for _ in range(n_samples)]
    stacked = torch.stack(samples) if samples else x.new_zeros(0, *x.shape)
    return mean, stacked


__all__ = [
    "marginal",
    "condition",
    "conditional_mean",
    "conditional_sample",
    "observed_log_prob",
    "inpaint",
]
