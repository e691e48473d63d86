"""The Mixture of Factor Analyzers: parameters, exact log-densities, sampling.

A mixture of ``K`` Gaussians over ``D`` features whose covariances are low rank plus
diagonal::

    p(x) = Σ_k w_k N(x; μ_k, Σ_k),     Σ_k = A_k A_kᵀ + diag(d_k)

with loadings ``A_k`` of shape ``[D, L]`` and noise variances ``d_k > 0``. Equivalently
``z ~ N(0, I_L)``, ``x = μ_k + A_k z + ε``, ``ε ~ N(0, diag(d_k))`` given component ``k``.

Inference never forms a ``D × D`` matrix: see :mod:`mfa.linalg`. Marginals, conditionals and
inpainting live in :mod:`mfa.inference` and are exposed here as methods.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfa import linalg
from mfa._validation import (
    check_data,
    check_finite,
    check_floating,
    check_positive_int,
    check_tensor,
)

NoiseType = Literal["diagonal", "isotropic"]
NOISE_TYPES = ("diagonal", "isotropic")

#: Default bound on the number of elements of the per-chunk intermediate tensors.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _softplus_inverse(y: Tensor) -> Tensor:
    """``log(exp(y) − 1)`` computed stably for ``y > 0``."""
    return y + torch.log(-torch.expm1(-y))


@dataclass(frozen=True)
class ComponentTerms:
    """Quantities derived once per call from the parameters (all centred on ``reference``).

    Shapes: ``log_weights`` [K], ``reference`` [D], ``means`` [K, D] (centred),
    ``inv_noise`` [K, D], ``whitened`` [K, L, D] (``C⁻¹ Aᵀ D⁻¹``), ``log_norm`` [K]
    (``−½(D log 2π + log|Σ_k|)``), ``whitened_means`` [K, L]; ``precise``: evaluate the
    diagonal quadratic form in float64 (see :func:`needs_float64_quadratic`).
    """

    log_weights: Tensor
    reference: Tensor
    means: Tensor
    inv_noise: Tensor
    whitened: Tensor
    log_norm: Tensor
    whitened_means: Tensor
    precise: bool = False

    def to(self, dtype: torch.dtype) -> ComponentTerms:
        """The same terms in another floating dtype (``precise`` is dropped for float64)."""
        fields = {name: getattr(self, name).to(dtype) for name in (
            "log_weights", "reference", "means", "inv_noise", "whitened", "log_norm",
            "whitened_means")}
        return ComponentTerms(**fields, precise=self.precise and dtype != torch.float64)


#: Largest worst-case rounding error (nats, ε·κ) of the expanded quadratic form before it is
#: evaluated in float64 instead.
QUADRATIC_TOLERANCE = 1.0


def needs_float64_quadratic(centred_means: Tensor, inv_noise: Tensor) -> bool:
    """Whether ``Σ_j (x_j − μ_kj)²/d_kj``, expanded around the reference point, would lose
    more than :data:`QUADRATIC_TOLERANCE` nats to rounding in the parameters' dtype.

    The expansion subtracts terms of size ``κ = max_k Σ_j (μ_kj − c_j)²/d_kj``, so its
    rounding error is about ``ε·κ``: negligible for images in ``[0, 1]``, but hundreds of nats
    in float32 for components far apart relative to their noise.
    """
    if centred_means.dtype == torch.float64:
        return False
    kappa = (centred_means.detach() ** 2 * inv_noise.detach()).sum(-1).max().item()
    return kappa * torch.finfo(centred_means.dtype).eps > QUADRATIC_TOLERANCE


def diagonal_quadratic(xc: Tensor, means: Tensor, inv_noise: Tensor, precise: bool) -> Tensor:
    """``Σ_j (x_j − μ_kj)² / d_kj`` for centred rows ``xc`` [n, D] and centred means [K, D],
    as two matrix products (in float64 when ``precise``); returns ``[n, K]`` in ``xc``'s dtype.
    """
    if precise:
        out = diagonal_quadratic(xc.double(), means.double(), inv_noise.double(), False)
        return out.to(xc.dtype)
    return (
        (xc * xc) @ inv_noise.T
        - 2.0 * (xc @ (means * inv_noise).T)
        + (means * means * inv_noise).sum(-1)
    )


class MixtureOfFactorAnalyzers(nn.Module):
    """A mixture of ``K`` factor analyzers over ``D`` features with ``L`` latent factors.

    Args:
        n_components: ``K``, the number of mixture components.
        n_features: ``D``, the dimension of the data.
        n_factors: ``L``, the rank of each low-rank covariance term (``0 <= L <= D``).
            ``L = 0`` is a diagonal (or spherical) GMM; ``L = D`` can represent any full
            covariance.
        noise: ``"diagonal"`` (factor analysis, one variance per feature and component) or
            ``"isotropic"`` (probabilistic PCA, ``d_k = σ_k² · 1``).
        min_noise: floor added to every noise variance, so ``d_k > min_noise >= 0``.
        generator: seeds the random initial factor loadings.
        dtype, device: of the parameters.
        chunk_elements: bound on the elements of the intermediate tensors of one chunk of
            rows; see :meth:`component_log_prob` for the memory model.

    The free parameters are unconstrained: mixture ``logits`` [K] (``w = softmax``), ``loc``
    [K, D], ``loadings`` [K, D, L] and ``raw_noise`` ([K, D], or [K, 1] when isotropic) with
    ``d = min_noise + softplus(raw_noise)``. Read the constrained values through
    :attr:`weights`, :attr:`means`, :attr:`factor_loadings` and :attr:`noise_variance`.
    """

    def __init__(
        self,
        n_components: int,
        n_features: int,
        n_factors: int,
        noise: NoiseType = "diagonal",
        *,
        min_noise: float = 1e-6,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        check_positive_int(n_components, "n_components")
        check_positive_int(n_features, "n_features")
        check_positive_int(n_factors, "n_factors", minimum=0)
        if n_factors > n_features:
            raise ValueError(
                f"n_factors must be <= n_features ({n_features}), got {n_factors}"
            )
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
        if not (
            isinstance(min_noise, (int, float)) and math.isfinite(min_noise) and min_noise >= 0
        ):
            raise ValueError(f"min_noise must be a finite float >= 0, got {min_noise!r}")
        check_positive_int(chunk_elements, "chunk_elements")
        dtype = dtype or torch.get_default_dtype()
        factory = {"dtype": dtype, "device": device}
        self.n_components = n_components
        self.n_features = n_features
        self.n_factors = n_factors
        self.noise = noise
        self.min_noise = float(min_noise)
        self.chunk_elements = chunk_elements

        noise_width = n_features if noise == "diagonal" else 1
        draw_on = generator.device if generator is not None else "cpu"
        loadings = torch.randn(
            n_components, n_features, n_factors, generator=generator, dtype=dtype, device=draw_on
        ).to(device)
        self.logits = nn.Parameter(torch.zeros(n_components, **factory))
        self.loc = nn.Parameter(torch.zeros(n_components, n_features, **factory))
        self.loadings = nn.Parameter(loadings * (0.1 / max(1, n_factors) ** 0.5))
        self.raw_noise = nn.Parameter(
            torch.full((n_components, noise_width), _softplus_inverse(torch.tensor(1.0)).item(),
                       **factory)
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parameters(
        cls,
        weights: Tensor,
        means: Tensor,
        factor_loadings: Tensor,
        noise_variance: Tensor,
        noise: NoiseType = "diagonal",
        *,
        min_noise: float = 0.0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> MixtureOfFactorAnalyzers:
        """Build a model with the given constrained parameters.

        Args:
            weights: ``[K]``, non-negative, summing to one.
            means: ``[K, D]``.
            factor_loadings: ``[K, D, L]``.
            noise_variance: ``[K, D]`` (diagonal); ``[K]``, ``[K, 1]`` or constant rows of
                ``[K, D]`` (isotropic). Every entry ``> min_noise``.
            noise: ``"diagonal"`` or ``"isotropic"``.
            min_noise: the floor of the noise variances (0 by default here).

        The dtype and device are those of ``means``; the other tensors must match them.
        """
        means = check_tensor(means, "means")
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        n_components, n_features = means.shape
        factor_loadings = check_tensor(factor_loadings, "factor_loadings")
        if factor_loadings.dim() != 3 or tuple(factor_loadings.shape[:2]) != (
            n_components,
            n_features,
        ):
            raise ValueError(
                f"factor_loadings must have shape [K, D, L] = [{n_components}, {n_features}, L], "
                f"got {tuple(factor_loadings.shape)}"
            )
        model = cls(
            n_components,
            n_features,
            factor_loadings.shape[-1],
            noise,
            min_noise=min_noise,
            dtype=means.dtype if means.is_floating_point() else None,
            device=means.device,
            chunk_elements=chunk_elements,
        )
        model.set_parameters(
            weights=weights,
            means=means,
            factor_loadings=factor_loadings,
            noise_variance=noise_variance,
        )
        return model

    @classmethod
    def kde(
        cls,
        data: Tensor,
        bandwidth: float | None = None,
        *,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> MixtureOfFactorAnalyzers:
        """A Gaussian kernel density estimate: one isotropic component per data point.

        ``p(x) = (1/N) Σ_i N(x; x_i, σ² I)``, a mixture with ``K = N``, ``L = 0``.

        Args:
            data: ``[N, D]``, the kernel centres.
            bandwidth: ``σ``. When ``None``, Scott's rule
                ``σ = s · N^(−1/(D+4))`` with ``s`` the mean per-feature standard deviation
                (for ``D = 1`` this is the ``N^(−1/5)`` rate). In high dimensions this rule
                is far too wide; pick ``σ`` on held-out data with :func:`select_kde_bandwidth`.
        """
        data = check_tensor(data, "data")
        if data.dim() != 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [N, D] with N >= 1, got {tuple(data.shape)}")
        if not data.is_floating_point():
            raise TypeError(f"data must be floating point, got {data.dtype}")
        check_finite(data, "data")
        n, d = data.shape
        if bandwidth is None:
            bandwidth = scott_bandwidth(data)
        if isinstance(bandwidth, Tensor) and bandwidth.numel() == 1:
            bandwidth = bandwidth.item()
        if isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool):
            bandwidth = float(bandwidth)
        if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a finite float > 0, got {bandwidth!r}")
        weights = torch.full((n,), 1.0 / n, dtype=data.dtype, device=data.device)
        variance = torch.full((n,), float(bandwidth) ** 2, dtype=data.dtype, device=data.device)
        loadings = data.new_zeros(n, d, 0)
        return cls.from_parameters(
            weights, data, loadings, variance, noise="isotropic", chunk_elements=chunk_elements
        )

    def set_parameters(
        self,
        *,
        weights: Tensor | None = None,
        means: Tensor | None = None,
        factor_loadings: Tensor | None = None,
        noise_variance: Tensor | None = None,
    ) -> None:
        """Overwrite some constrained parameters in place (no gradient is recorded).

        Shapes as in :meth:`from_parameters`; every tensor must match the module's dtype and
        device. All are validated before any is written, so a failure changes nothing.
        """
        k, d, lat = self.n_components, self.n_features, self.n_factors
        dtype, device = self.dtype, self.device
        new: dict[str, Tensor] = {}
        if weights is not None:
            weights = self._check_param(weights, "weights", (k,))
            if bool((weights < 0).any()):
                raise ValueError(
                    f"weights must be non-negative, got minimum {weights.min().item()}"
                )
            total = weights.sum().item()
            tol = 1e-4 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
            if abs(total - 1.0) > tol * max(1, k) ** 0.5:
                raise ValueError(f"weights must sum to one, got sum {total}")
            new["logits"] = torch.log(weights)
        if means is not None:
            new["loc"] = self._check_param(means, "means", (k, d))
        if factor_loadings is not None:
            new["loadings"] = self._check_param(factor_loadings, "factor_loadings", (k, d, lat))
        if noise_variance is not None:
            noise_variance = check_tensor(noise_variance, "noise_variance")
            check_floating(noise_variance, "noise_variance", dtype, device)
            check_finite(noise_variance, "noise_variance")
            if self.noise == "isotropic":
                if noise_variance.shape in ((k,), (k, 1)):
                    nv = noise_variance.reshape(k, 1)
                elif tuple(noise_variance.shape) == (k, d):
                    spread = (noise_variance - noise_variance[:, :1]).abs().max().item()
                    if spread > 1e-6 * noise_variance.abs().max().item():
                        raise ValueError(
                            "noise_variance of shape [K, D] must be constant along D for "
                            f"isotropic noise; rows vary by up to {spread}"
                        )
                    nv = noise_variance[:, :1]
                else:
                    raise ValueError(
                        f"noise_variance for isotropic noise must have shape [{k}], [{k}, 1] "
                        f"or [{k}, {d}], got {tuple(noise_variance.shape)}"
                    )
            else:
                if tuple(noise_variance.shape) != (k, d):
                    raise ValueError(
                        f"noise_variance must have shape [K, D] = [{k}, {d}], "
                        f"got {tuple(noise_variance.shape)}"
                    )
                nv = noise_variance
            if bool((nv <= self.min_noise).any()):
                raise ValueError(
                    f"noise_variance must be > min_noise={self.min_noise} (and > 0), "
                    f"got minimum {nv.min().item()}"
                )
            excess = nv - self.min_noise
            new["raw_noise"] = _softplus_inverse(excess)
            if not bool(torch.isfinite(new["raw_noise"]).all()):
                raise ValueError(
                    "noise_variance is too close to min_noise to be represented "
                    f"(min_noise={self.min_noise}, minimum {nv.min().item()})"
                )
        with torch.no_grad():
            for name, value in new.items():
                getattr(self, name).copy_(value)

    def _check_param(self, value: object, name: str, shape: tuple[int, ...]) -> Tensor:
        value = check_tensor(value, name)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(value.shape)}")
        check_floating(value, name, self.dtype, self.device)
        check_finite(value, name)
        return value

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the module before ``load_state_dict``."""
        return {
            "n_components": self.n_components,
            "n_features": self.n_features,
            "n_factors": self.n_factors,
            "noise": self.noise,
            "min_noise": self.min_noise,
        }

    # ------------------------------------------------------------------ parameters

    @property
    def dtype(self) -> torch.dtype:
        return self.loc.dtype

    @property
    def device(self) -> torch.device:
        return self.loc.device

    @property
    def log_weights(self) -> Tensor:
        """``log w``, shape ``[K]``."""
        return torch.log_softmax(self.logits, dim=-1)

    @property
    def weights(self) -> Tensor:
        """Mixture weights ``w``, shape ``[K]``, summing to one."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def means(self) -> Tensor:
        """Component means ``μ``, shape ``[K, D]``."""
        return self.loc

    @property
    def factor_loadings(self) -> Tensor:
        """Factor loadings ``A``, shape ``[K, D, L]``."""
        return self.loadings

    @property
    def noise_variance(self) -> Tensor:
        """Noise variances ``d``, shape ``[K, D]`` (rows constant when isotropic)."""
        noise = self.min_noise + F.softplus(self.raw_noise)
        return noise.expand(self.n_components, self.n_features)

    def covariance(self) -> Tensor:
        """Dense covariances ``A_k A_kᵀ + diag(d_k)``, shape ``[K, D, D]``. For small ``D`` only."""
        a = self.factor_loadings
        return a @ a.mT + torch.diag_embed(self.noise_variance)

    def extra_repr(self) -> str:
        return (
            f"n_components={self.n_components}, n_features={self.n_features}, "
            f"n_factors={self.n_factors}, noise={self.noise!r}, min_noise={self.min_noise}"
        )

    # ------------------------------------------------------------------ densities

    def component_terms(self) -> ComponentTerms:
        """Per-component quantities shared by every row, computed in ``O(K·D·L²)``."""
        log_weights = self.log_weights
        means = self.means
        noise = self.noise_variance
        loadings = self.factor_loadings
        # Centre everything on the weighted mean of the means: the densities are unchanged,
        # and the expanded quadratic forms below keep float32 accuracy for data far from 0.
        reference = (log_weights.exp() @ means).detach()  # [D]
        centred = means - reference  # [K, D]
        chol = linalg.capacitance_cholesky(loadings, noise)  # [K, L, L]
        whitened = linalg.whitened_factors(loadings, noise, chol)  # [K, L, D]
        logdet = linalg.lowrank_logdet(chol, noise)  # [K]
        log_norm = linalg.gaussian_log_normaliser(self.n_features, logdet)
        whitened_means = (whitened @ centred.unsqueeze(-1)).squeeze(-1)  # [K, L]
        inv_noise = noise.reciprocal()  # [K, D]
        return ComponentTerms(
            log_weights=log_weights,
            reference=reference,
            means=centred,
            inv_noise=inv_noise,
            whitened=whitened,
            log_norm=log_norm,
            whitened_means=whitened_means,
            precise=needs_float64_quadratic(centred, inv_noise),
        )

    def chunk_size(self, extra_per_row: int = 0) -> int:
        """Rows per chunk so that one chunk's intermediates hold ≲ ``chunk_elements`` values."""
        per_row = self.n_features + self.n_components * (self.n_factors + 2) + extra_per_row
        return max(1, self.chunk_elements // per_row)

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; μ_k, Σ_k)`` for every row and component.

        Args:
            x: ``[..., D]``.

        Returns:
            ``[..., K]``.

        Cost and memory: ``O(N·K·D·L)`` time in three matrix products per chunk
        (``x² @ (1/d)ᵀ``, ``x @ (μ/d)ᵀ`` and ``x @ Bᵀ`` with ``B`` of shape ``[K·L, D]``);
        rows are processed in chunks of :meth:`chunk_size` rows so that the intermediates of
        one chunk hold about ``chunk_elements`` values (``[n, D]`` for ``x²``, ``[n, K·L]``
        and ``[n, K]``), plus the ``O(K·D·L)`` derived parameters. No ``[N, K, D]`` tensor and
        no ``D × D`` matrix is formed.
        """
        x = check_data(x, "x", self.n_features, self.dtype, self.device)
        batch_shape = x.shape[:-1]
        out = self._component_log_prob(x.reshape(-1, self.n_features))
        return out.reshape(*batch_shape, self.n_components)

    def _component_log_prob(self, x: Tensor, terms: ComponentTerms | None = None) -> Tensor:
        """Unchecked :meth:`component_log_prob` for ``x`` of shape ``[N, D]``."""
        terms = terms or self.component_terms()
        size = self.chunk_size()
        parts = [
            component_log_prob_from_terms(x[i : i + size], terms)
            for i in range(0, max(x.shape[0], 1), size)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = logsumexp_k(log w_k + log N(x; μ_k, Σ_k))``.

        Args:
            x: ``[..., D]``.

        Returns:
            ``[...]``. Memory as in :meth:`component_log_prob`.
        """
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``log p(x)``, the same as :meth:`log_prob`; ``[..., D]`` → ``[...]``."""
        return self.log_prob(x)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities ``p(k | x)``; ``[..., D]`` → ``[..., K]``."""
        return torch.softmax(self.component_log_prob(x), dim=-1)

    def predict(self, x: Tensor) -> Tensor:
        """Most probable component of each row; ``[..., D]`` → ``[...]`` (int64)."""
        return self.component_log_prob(x).argmax(dim=-1)

    def score_outliers(self, x: Tensor) -> Tensor:
        """Outlier scores ``−log p(x)``: larger is less likely. ``[..., D]`` → ``[...]``."""
        return -self.log_prob(x)

    # ------------------------------------------------------------------ sampling

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, with_noise: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Ancestral samples: ``k ~ Cat(w)``, ``z ~ N(0, I)``, ``x = μ_k + A_k z + √d_k ε``.

        Args:
            n: number of samples.
            generator: a ``torch.Generator`` on the model's device; same seed, same samples
                (for the same ``chunk_elements``, since draws are made chunk by chunk).
            with_noise: ``False`` returns ``E[x | k, z] = μ_k + A_k z`` instead: not a sample
                of the model, but the smoother images that are often displayed.

        Returns:
            ``(x, components)`` of shapes ``[n, D]`` and ``[n]`` (int64).
        """
        check_positive_int(n, "n", minimum=0)
        if n == 0:
            empty = self.loc.new_zeros(0, self.n_features).detach()
            return empty, torch.zeros(0, dtype=torch.long, device=self.device)
        with torch.no_grad():
            weights = self.weights
            components = torch.multinomial(weights, n, replacement=True, generator=generator)
            size = self.chunk_size(extra_per_row=self.n_features * self.n_factors)
            parts = []
            for i in range(0, n, size):
                comp = components[i : i + size]
                m = comp.shape[0]
                z = torch.randn(m, self.n_factors, 1, generator=generator,
                                dtype=self.dtype, device=self.device)
                eps = torch.randn(m, self.n_features, generator=generator,
                                  dtype=self.dtype, device=self.device)
                x = self.means[comp]
                if with_noise:
                    x = x + eps * self.noise_variance[comp].sqrt()
                if self.n_factors:
                    x = x + (self.factor_loadings[comp] @ z).squeeze(-1)
                parts.append(x)
            x = torch.cat(parts) if parts else weights.new_zeros(0, self.n_features)
        return x, components

    # ------------------------------------------------------------------ inference

    def marginal(self, features: Sequence[int] | Tensor) -> MixtureOfFactorAnalyzers:
        """The marginal over ``features`` (indices, or a bool mask of shape ``[D]``).

        A mixture's marginal is the mixture of the component marginals: keep the selected
        rows of ``μ_k``, ``A_k`` and ``d_k``. Returns a model over ``len(features)`` features
        in the given order.
        """
        from mfa.inference import marginal

        return marginal(self, features)

    def condition(
        self, observed_features: Sequence[int] | Tensor, observed_values: Tensor
    ) -> MixtureOfFactorAnalyzers:
        """The exact conditional ``p(x_h | x_o = observed_values)``, again an MFA.

        Args:
            observed_features: indices (or a bool mask ``[D]``) of the observed features.
            observed_values: ``[len(observed_features)]``.

        Returns:
            A model over the hidden features, in increasing index order. See
            :func:`mfa.inference.condition` for the formulas.
        """
        from mfa.inference import condition

        return condition(self, observed_features, observed_values)

    def conditional_mean(self, x: Tensor, observed: Tensor) -> Tensor:
        """``E[x_h | x_o]`` per row with per-row masks; observed entries are copied through.

        Args:
            x: ``[N, D]``; the hidden entries are ignored (they may be NaN).
            observed: bool ``[N, D]``, ``True`` where ``x`` is observed.

        Returns:
            ``[N, D]``.
        """
        from mfa.inference import conditional_mean

        return conditional_mean(self, x, observed)

    def conditional_sample(
        self, x: Tensor, observed: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One exact sample of ``x_h ~ p(x_h | x_o)`` per row; observed entries copied through.

        Args:
            x: ``[N, D]``; observed: bool ``[N, D]``; generator: on the model's device.

        Returns:
            ``[N, D]``.
        """
        from mfa.inference import conditional_sample

        return conditional_sample(self, x, observed, generator=generator)

    def observed_log_prob(self, x: Tensor, observed: Tensor) -> Tensor:
        """``log p(x_o)`` of the observed entries of each row (per-row masks); ``[N]``."""
        from mfa.inference import observed_log_prob

        return observed_log_prob(self, x, observed)

    def to_distribution(self) -> torch.distributions.MixtureSameFamily:
        """The same distribution as a ``torch.distributions.MixtureSameFamily`` of a
        ``Categorical`` and a ``LowRankMultivariateNormal``."""
        from torch import distributions as td

        loadings = self.factor_loadings
        if self.n_factors == 0:  # LowRankMultivariateNormal needs a rank of at least one.
            loadings = loadings.new_zeros(self.n_components, self.n_features, 1)
        component = td.LowRankMultivariateNormal(self.means, loadings, self.noise_variance)
        return td.MixtureSameFamily(td.Categorical(logits=self.log_weights), component)


def component_log_prob_from_terms(x: Tensor, terms: ComponentTerms) -> Tensor:
    """``log w_k + log N(x; μ_k, Σ_k)`` for a chunk ``x`` of shape ``[n, D]`` → ``[n, K]``.

    ``(x−μ)ᵀΣ⁻¹(x−μ) = Σ_j (x_j−μ_j)²/d_j − ‖B(x−μ)‖²`` with ``B = C⁻¹AᵀD⁻¹``; the first
    term is expanded into two matrix products, the second is one product ``x @ Bᵀ``.
    """
    xc = x - terms.reference  # [n, D]
    k, n_lat, d = terms.whitened.shape
    diag_quad = diagonal_quadratic(xc, terms.means, terms.inv_noise, terms.precise)  # [n, K]
    if n_lat:
        proj = (xc @ terms.whitened.reshape(k * n_lat, d).T).view(-1, k, n_lat)  # [n, K, L]
        proj = proj - terms.whitened_means
        maha = diag_quad - (proj * proj).sum(-1)
    else:
        maha = diag_quad
    # Rounding can push a tiny Mahalanobis distance below zero.
    maha = maha.clamp_min(0.0)
    return terms.log_weights + terms.log_norm - 0.5 * maha


def scott_bandwidth(data: Tensor) -> float:
    """Scott's rule ``σ = s · N^(−1/(D+4))``, ``s`` the mean per-feature standard deviation."""
    n, d = data.shape
    if n < 2:
        return 1.0
    std = data.std(dim=0).mean().item()
    std = std if std > 0 else 1.0
    return std * n ** (-1.0 / (d + 4))


def select_kde_bandwidth(
    train: Tensor,
    validation: Tensor,
    candidates: Sequence[float] | Tensor | None = None,
) -> tuple[float, Tensor]:
    """Pick the KDE bandwidth that maximises the mean held-out log-likelihood.

    Args:
        train: ``[N, D]``, the kernel centres.
        validation: ``[M, D]``, held-out rows.
        candidates: bandwidths to try; by default 25 values log-spaced from 1/100 to 2 times
            Scott's bandwidth.

    Returns:
        ``(best_bandwidth, scores)``, ``scores[i]`` the mean held-out log-likelihood of
        ``candidates[i]``.
    """
    if candidates is None:
        base = scott_bandwidth(train)
        candidates = torch.logspace(math.log10(base / 100), math.log10(base * 2), 25).tolist()
    candidates = [float(c) for c in candidates]
    if not candidates:
        raise ValueError("candidates must not be empty")
    scores = []
    with torch.no_grad():
        for bandwidth in candidates:
            model = MixtureOfFactorAnalyzers.kde(train, bandwidth)
            scores.append(model.log_prob(validation).mean().item())
    scores_t = torch.tensor(scores, dtype=torch.float64)
    return candidates[int(scores_t.argmax())], scores_t
