"""Conjugate priors of an MFA and the pieces of the MAP (regularised) M-step.

EM with these priors maximises the log-posterior instead of the log-likelihood::

    J(θ) = Σ_n log p(x_n | θ) + log p(θ)                       (the MAP objective)

    log p(θ) = Σ_k Σ_j −(ν/2) (log d_kj + s₀ / d_kj)             noise: inverse-gamma
             + (α − 1) Σ_k log π_k                               weights: symmetric Dirichlet
             + Σ_k Σ_j [−(L/2) log d_kj − λ ‖a_kj‖² / (2 d_kj)]  loadings (only when λ > 0)

up to constants, with ``d_kj`` the noise variances, ``a_kj`` the ``j``-th row of ``A_k``
(``[L]``) and:

* **noise** ``d_kj ~ InverseGamma(shape ν/2 − 1, scale ν s₀/2)``: ``ν ≥ 0`` pseudo-rows of
  variance ``s₀ > 0`` (a proper density when ``ν > 2``; ``ν = 0`` is no prior). With isotropic
  noise the one variance ``d_k`` stands for its ``D`` tied copies, each with this prior.
* **weights** ``π ~ Dirichlet(α, …, α)``, ``α ≥ 1`` (``α = 1`` is flat).
* **loadings** ``a_kj ~ N(0, (d_kj / λ) I_L)``, ``λ ≥ 0`` (ridge; ``λ = 0`` is no prior).
  The means carry no prior.

The MAP M-step (one exact maximisation of the expected complete-data log-posterior, so the
objective never decreases; derivation below) is, with ``Ã = [A, μ]``, ``z̃ = [z; 1]``,
``P = diag(1, …, 1, 0)`` (``[L+1, L+1]``) and ``N_k = Σ_n r_nk``::

    Ã_k = (Σ r x E[z̃]ᵀ) (Σ r E[z̃ z̃ᵀ] + λ P)⁻¹
    d_kj = (Σ r x_j² − ã_kj · Σ r x_j E[z̃] + ν s₀) / (N_k + ν + L·[λ > 0])
    π_k = (N_k + α − 1) / (N + K (α − 1))

Derivation: for fixed ``d_kj`` the terms in ``ã_kj`` are ``−(E Σ r (x_j − ã z̃)² + λ‖a‖²) /
(2 d_kj)``, a ridge regression whose minimiser above does not depend on ``d_kj``. At it,
``E Σ r (x_j − ã z̃)² + λ‖a‖² = Σ r x_j² − ã · Σ r x_j E[z̃]`` (the ridge term cancels against
the quadratic form), and the terms in ``d_kj`` are ``−(N_k + ν + L[λ>0])/2 · log d_kj −
(that + ν s₀) / (2 d_kj)``, maximised at the ratio above. The weights maximise
``Σ_k (N_k + α − 1) log π_k`` on the simplex. Isotropic noise averages the numerators over
features. Strength 0 (``ν = 0, α = 1, λ = 0``) is plain EM; :func:`mfa.m_step.m_step`
then runs the unregularised formulas unchanged. The ridge's ``L`` pseudo-rows in the noise
update come with any ``λ > 0`` (the Normal(0, d/λ) prior's normaliser), however small: as
``λ → 0⁺`` the update does not approach plain EM's (N = 20, L = 3: the noise variances ×
20/23 even at λ = 1e-300).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from mfa._validation import is_real_number

__all__ = ["QUANTIZATION_VARIANCE", "Prior", "check_prior_fields", "quantization_variance"]


def quantization_variance(levels_per_unit: float = 256.0) -> float:
    """``1 / (12 q²)``: the variance of uniform dequantisation noise on a grid of step ``1/q``.

    8-bit pixels dequantised as ``(p + u) / 256`` give ``1/(12·256²) ≈ 1.27e-6``; for pixels
    scaled as ``p / 255`` use ``levels_per_unit=255``. No noise variance of such data can
    usefully fall below it.
    """
    if not (isinstance(levels_per_unit, (int, float)) and levels_per_unit > 0):
        raise ValueError(f"levels_per_unit must be a number > 0, got {levels_per_unit!r}")
    return 1.0 / (12.0 * float(levels_per_unit) ** 2)


#: The quantisation variance of 8-bit pixels dequantised as ``(p + u) / 256``.
QUANTIZATION_VARIANCE = quantization_variance(256.0)


def _finite_positive(value: numbers.Real) -> bool:
    try:  # (an int beyond float's range: OverflowError; a numpy float32 compares as itself)
        value = float(value)
    except OverflowError:
        return False
    return math.isfinite(value) and value > 0


def check_prior_fields(config: object, *, allow_auto: bool) -> None:
    """Check a trainer config's prior fields (``noise_prior_strength ≥ 0``,
    ``noise_prior_variance > 0`` or, when ``allow_auto``, ``"auto"``, ``weight_concentration
    ≥ 1``, ``loading_ridge ≥ 0``); the error names ``<ConfigClass>.<field>`` and the value."""
    from mfa._validation import check_real_field, is_real_number

    check_real_field(config, "noise_prior_strength", minimum=0)
    s0 = config.noise_prior_variance
    if not (allow_auto and s0 == "auto"):
        if allow_auto and not (is_real_number(s0) and _finite_positive(s0)):
            raise ValueError(f"{type(config).__name__}.noise_prior_variance must be 'auto' or "
                             f"a finite number > 0, got {s0!r}")
        check_real_field(config, "noise_prior_variance", minimum=0, strict=True)
    check_real_field(config, "weight_concentration", minimum=1)
    check_real_field(config, "loading_ridge", minimum=0)


@dataclass(frozen=True)
class Prior:
    """The conjugate priors of the module docstring.

    Attributes:
        noise_strength: ``ν ≥ 0``, pseudo-rows behind the noise prior (0: none).
        noise_variance: ``s₀ > 0``, the noise variance those pseudo-rows have.
        weight_concentration: ``α ≥ 1`` of the symmetric Dirichlet on the weights (1: none).
        loading_ridge: ``λ ≥ 0`` of the Gaussian prior on the loading rows (0: none).
    """

    noise_strength: float = 0.0
    noise_variance: float = 1.0
    weight_concentration: float = 1.0
    loading_ridge: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "noise_strength": (self.noise_strength, 0.0, False),
            "noise_variance": (self.noise_variance, 0.0, True),
            "weight_concentration": (self.weight_concentration, 1.0, False),
            "loading_ridge": (self.loading_ridge, 0.0, False),
        }
        for name, (value, low, strict) in checks.items():
            try:  # (numpy's numbers too, stored as Python floats; 10**400: OverflowError)
                number = float(value) if is_real_number(value) else math.nan
            except OverflowError:
                number = math.nan
            if not (math.isfinite(number) and (number > low if strict else number >= low)):
                bound = f"> {low}" if strict else f">= {low}"
                raise ValueError(f"Prior.{name} must be a finite number {bound}, got {value!r}")
            object.__setattr__(self, name, number)
        if not math.isfinite(self.noise_strength * self.noise_variance):  # (ν·s₀ overflowed:
            raise ValueError(  # the M-step's noise variances came out inf, without a word)
                f"Prior.noise_strength × noise_variance must be finite, got "
                f"{self.noise_strength!r} × {self.noise_variance!r}")

    @classmethod
    def from_config(cls, config, noise_variance: float) -> Prior:
        """The prior of a trainer config (:class:`~mfa.em.EMConfig` or
        :class:`~mfa.sgd.SGDConfig`: its ``noise_prior_strength``, ``weight_concentration``
        and ``loading_ridge``) with noise prior variance ``noise_variance``."""
        return cls(config.noise_prior_strength, noise_variance, config.weight_concentration,
                   config.loading_ridge)

    # ------------------------------------------------------------------ which terms are on

    @property
    def has_noise_prior(self) -> bool:
        return self.noise_strength > 0

    @property
    def has_weight_prior(self) -> bool:
        return self.weight_concentration != 1.0

    @property
    def has_loading_prior(self) -> bool:
        return self.loading_ridge > 0

    @property
    def is_flat(self) -> bool:
        """No prior at all: the M-step is plain EM."""
        return not (self.has_noise_prior or self.has_weight_prior or self.has_loading_prior)

    # ------------------------------------------------------------------ the M-step pieces

    def weight_counts(self, mass: Tensor) -> Tensor:
        """``N_k + α − 1`` ``[K]``: the counts the MAP weights are proportional to."""
        return mass + (self.weight_concentration - 1.0) if self.has_weight_prior else mass

    def noise_pseudo_counts(self, n_factors: int) -> tuple[float, float]:
        """``(ν s₀, ν + L·[λ > 0])``: added to the numerator and the denominator of every
        noise-variance update."""
        extra_rows = n_factors if self.has_loading_prior else 0
        return self.noise_strength * self.noise_variance, self.noise_strength + extra_rows

    # ------------------------------------------------------------------ the objective

    def log_prior(self, weights: Tensor, factor_loadings: Tensor, noise_variance: Tensor) -> Tensor:
        """``log p(θ)`` up to constants (the module docstring), a float64 scalar tensor that
        carries gradients.

        Args:
            weights: ``[K]``; factor_loadings: ``[K, D, L]``; noise_variance: ``[K, D]`` (an
                isotropic model's rows repeat its one variance, which counts once per feature).
        """
        total = noise_variance.new_zeros((), dtype=torch.float64)
        if self.has_noise_prior or self.has_loading_prior:
            d = noise_variance.double()  # [K, D]
            log_d = d.log()
        if self.has_noise_prior:
            total = total - 0.5 * self.noise_strength * (log_d + self.noise_variance / d).sum()
        if self.has_weight_prior:
            total = total + (self.weight_concentration - 1.0) * weights.double().log().sum()
        if self.has_loading_prior and factor_loadings.shape[-1]:
            sq = factor_loadings.double().square().sum(-1)  # [K, D]
            n_lat = factor_loadings.shape[-1]
            total = total - (0.5 * n_lat * log_d + 0.5 * self.loading_ridge * sq / d).sum()
        return total

    def log_prior_of(self, model) -> Tensor:
        """:meth:`log_prior` of a :class:`~mfa.model.MixtureOfFactorAnalyzers`'s parameters
        (differentiable through its unconstrained parameters)."""
        return self.log_prior(model.weights, model.factor_loadings, model.noise_variance)
