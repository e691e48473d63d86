"""The Mixture of Factor Analyzers: parameters, exact log-densities, sampling.

A mixture of ``K`` Gaussians over ``D`` features whose covariances are low rank plus
diagonal::

    p(x) = Σ_k w_k N(x; μ_k, Σ_k),     Σ_k = A_k A_kᵀ + diag(d_k)

with loadings ``A_k`` of shape ``[D, L]`` and noise variances ``d_k > 0``. Equivalently
``z ~ N(0, I_L)``, ``x = μ_k + A_k z + ε``, ``ε ~ N(0, diag(d_k))`` given component ``k``.

Inference never forms a ``D × D`` matrix: see :mod:`mfa.linalg`. The per-component terms and
log-densities of rows are in :mod:`mfa._terms`, the parameterisation in :mod:`mfa.parameters`,
the formulas of marginals and conditionals in :mod:`mfa.conditioning` (exposed here as
methods, and as functions with inpainting in :mod:`mfa.inference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfa import conditioning, linalg, parameters, sampling
from mfa._terms import (
    ComponentTerms,
    build_component_terms,
    check_log_densities,
    component_log_prob_from_terms,
)
from mfa._validation import check_data, check_generator, check_positive_int, feature_index

# Re-exported: defined in mfa.linalg and mfa.parameters, importable from here as before.
from mfa.linalg import diagonal_quadratic, needs_float64_quadratic  # noqa: F401
from mfa.parameters import NOISE_TYPES  # noqa: F401  (re-exported)

NoiseType = Literal["diagonal", "isotropic"]

#: Default bound on the number of elements of the per-chunk intermediate tensors.
DEFAULT_CHUNK_ELEMENTS = 2**24


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
    :attr:`weights`, :attr:`means`, :attr:`factor_loadings` and :attr:`noise_variance`;
    build a model from either set with :meth:`from_parameters` or :meth:`from_raw_parameters`.
    Only float32 and float64 are supported (refused otherwise, also by ``.to()``/``.half()``).
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
        dtype = dtype or torch.get_default_dtype()
        parameters.check_config(n_components, n_features, n_factors, noise, min_noise, dtype)
        check_positive_int(chunk_elements, "chunk_elements")
        check_generator(generator)  # (an int failed with "'int' object has no attribute")
        self.register_load_state_dict_pre_hook(parameters.check_assigned_state)
        factory = {"dtype": dtype, "device": device}
        # (ints, also from numpy integers: the checkpoint's metadata must load as primitives)
        self.n_components, self.n_features = int(n_components), int(n_features)
        self.n_factors = int(n_factors)
        self.noise = noise
        self.min_noise = float(min_noise)
        self.chunk_elements = int(chunk_elements)

        noise_width = n_features if noise == "diagonal" else 1
        self.logits = nn.Parameter(torch.zeros(n_components, **factory))
        draw_on = generator.device if generator is not None else "cpu"
        loadings = torch.randn(  # (moved where the others are: .to(None) left a CUDA
            # generator's draw on the GPU and the rest on the CPU)
            n_components, n_features, n_factors, generator=generator, dtype=dtype, device=draw_on
        ).to(self.logits.device)
        self.loc = nn.Parameter(torch.zeros(n_components, n_features, **factory))
        self.loadings = nn.Parameter(loadings * (0.1 / max(1, n_factors) ** 0.5))
        self.raw_noise = nn.Parameter(
            torch.full((n_components, noise_width),
                       parameters.softplus_inverse(torch.tensor(1.0)).item(), **factory)
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
        model = cls._empty_like(means, "means", factor_loadings, "factor_loadings", noise,
                                min_noise, chunk_elements)
        model.set_parameters(weights=weights, means=means, factor_loadings=factor_loadings,
                             noise_variance=noise_variance)
        return model

    @classmethod
    def from_raw_parameters(
        cls,
        logits: Tensor,
        loc: Tensor,
        loadings: Tensor,
        raw_noise: Tensor,
        noise: NoiseType = "diagonal",
        *,
        min_noise: float = 1e-6,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> MixtureOfFactorAnalyzers:
        """Build a model from unconstrained parameters (see the class docstring).

        Args:
            logits: ``[K]``; ``−inf`` marks a component of weight 0 (at least one finite).
            loc: ``[K, D]``.
            loadings: ``[K, D, L]``.
            raw_noise: ``[K, D]`` (diagonal) or ``[K, 1]`` (isotropic), with
                ``d = min_noise + softplus(raw_noise)``; a variance at the floor ``min_noise``
                stays representable, unlike in :meth:`from_parameters`.

        The dtype and device are those of ``loc``; the other tensors must match them.
        """
        model = cls._empty_like(loc, "loc", loadings, "loadings", noise, min_noise,
                                chunk_elements)
        new = parameters.check_unconstrained(
            {"logits": logits, "loc": loc, "loadings": loadings, "raw_noise": raw_noise},
            {name: tuple(p.shape) for name, p in model.named_parameters()},
            model.dtype, model.device,
        )
        with torch.no_grad():
            for name, value in new.items():
                getattr(model, name).copy_(value)
        return model

    @classmethod
    def _empty_like(
        cls, means: object, means_name: str, loadings: object, loadings_name: str,
        noise: NoiseType, min_noise: float, chunk_elements: int,
    ) -> MixtureOfFactorAnalyzers:
        """A model with the sizes, dtype and device of ``means`` and ``loadings``."""
        means, loadings = parameters.check_sizes(means, means_name, loadings, loadings_name)
        k, d, lat = loadings.shape
        # placeholder loadings from a private generator: the global one must not advance
        return cls(k, d, lat, noise, min_noise=min_noise, dtype=means.dtype, device=means.device,
                   chunk_elements=chunk_elements, generator=torch.Generator())

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
        new = parameters.unconstrained(
            self.config(), self.dtype, self.device, weights=weights, means=means,
            factor_loadings=factor_loadings, noise_variance=noise_variance,
        )
        with torch.no_grad():
            for name, value in new.items():
                getattr(self, name).copy_(value)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), ... all come here: refuse a dtype before any parameter changes
        parameters.check_dtype(fn(torch.zeros((), dtype=self.dtype, device=self.device)).dtype,
                               self.min_noise)
        return super()._apply(fn, recurse)

    def config(self) -> dict:
        """Constructor arguments to rebuild it for ``load_state_dict`` (not ``chunk_elements``)."""
        names = ("n_components", "n_features", "n_factors", "noise", "min_noise")
        return {name: getattr(self, name) for name in names}

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
        """Per-component quantities shared by every row, computed in ``O(K·D·L²)``.

        Raises ``ValueError`` when a noise variance underflowed to 0 in the model's dtype.
        """
        parameters.check_device(self.device)  # (the trainers' passes come here too)
        return build_component_terms(
            self.log_weights, self.means, self.factor_loadings, self.noise_variance
        )

    def chunk_size(self, extra_per_row: int = 0) -> int:
        """Rows per chunk so that one chunk's intermediates hold ≲ ``chunk_elements`` values."""
        per_row = self.n_features + self.n_components * (self.n_factors + 2) + extra_per_row
        return max(1, self.chunk_elements // per_row)

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; μ_k, Σ_k)`` for every row and component.

        Args: x: ``[..., D]``. Returns: ``[..., K]``.

        Cost and memory: ``O(N·K·D·L)`` time in three matrix products per chunk
        (``x² @ (1/d)ᵀ``, ``x @ (μ/d)ᵀ`` and ``x @ Bᵀ`` with ``B`` of shape ``[K·L, D]``);
        rows are processed in chunks of :meth:`chunk_size` rows so that the intermediates of
        one chunk hold about ``chunk_elements`` values (``[n, D]`` for ``x²``, ``[n, K·L]``
        and ``[n, K]``), plus the ``O(K·D·L)`` derived parameters. No ``[N, K, D]`` tensor and
        no ``D × D`` matrix is formed. Entries within 30 nats of each row's top whose Woodbury
        subtraction loses over 1e-4 nats are recomputed in a residual form keeping the dtype's
        precision (:func:`mfa.residual_form.residual_mahalanobis`; ~one ``[n, D]`` pass more).
        """
        parameters.check_device(self.device)
        x = check_data(x, "x", self.n_features, self.dtype, self.device)
        batch_shape = x.shape[:-1]
        terms = self.component_terms()
        out = self._component_log_prob(x.reshape(-1, self.n_features), terms)
        check_log_densities(out.detach(), terms.log_weights.detach(), x, terms.inv_noise,
                            self.means)
        return out.reshape(*batch_shape, self.n_components)

    def _component_log_prob(self, x: Tensor, terms: ComponentTerms | None = None,
                            exact: bool = True, near_rows_only: bool = False) -> Tensor:
        """Unchecked :meth:`component_log_prob` for ``x`` ``[N, D]`` (``exact``,
        ``near_rows_only``: see :func:`mfa._terms.component_log_prob_from_terms`)."""
        terms, size = terms or self.component_terms(), self.chunk_size()
        parts = [component_log_prob_from_terms(x[i : i + size], terms, exact, near_rows_only)
                 for i in range(0, max(x.shape[0], 1), size)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = logsumexp_k(log w_k + log N(x; μ_k, Σ_k))``.

        Args:
            x: ``[..., D]``.

        Returns:
            ``[...]``. Memory as in :meth:`component_log_prob`.
        """
        return linalg.logsumexp(self.component_log_prob(x), dim=-1)

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
        sampling.check_options(generator, with_noise, self.device)
        if n == 0:
            empty = self.loc.new_zeros(0, self.n_features).detach()
            return empty, torch.zeros(0, dtype=torch.long, device=self.device)
        with torch.no_grad():
            parameters.check_usable(self, "cannot sample")
            components = torch.multinomial(self.weights, n, replacement=True,
                                           generator=generator)
            size = self.chunk_size(extra_per_row=self.n_features * self.n_factors)
            x = sampling.ancestral_sample(self.means, self.factor_loadings, self.noise_variance,
                                          components, size, generator, with_noise)
        return x, components

    # ------------------------------------------------------------------ inference (formulas:
    # mfa.conditioning; the same as functions: mfa.inference)

    def marginal(self, features: Sequence[int] | Tensor) -> MixtureOfFactorAnalyzers:
        """The marginal over ``features`` (indices, or a bool mask of shape ``[D]``).

        A mixture's marginal is the mixture of the component marginals: keep the selected
        rows of ``μ_k``, ``A_k`` and ``d_k``. Returns a model over ``len(features)`` features
        in the given order.
        """
        parameters.check_device(self.device, "cannot take a marginal")
        idx = feature_index(features, self.n_features).to(self.device)
        with torch.no_grad():
            return self._derived(self.logits, self.means[:, idx], self.factor_loadings[:, idx],
                                 idx)

    def condition(
        self, observed_features: Sequence[int] | Tensor, observed_values: Tensor
    ) -> MixtureOfFactorAnalyzers:
        """The exact conditional ``p(x_h | x_o = observed_values)``, again an MFA.

        Args:
            observed_features: indices (or a bool mask ``[D]``) of the observed features;
                at least one feature must remain hidden.
            observed_values: ``[O]``, O observed features (a mask's ``True`` count), in the
                order of the indices given (a mask's: increasing).

        Returns:
            A model over the hidden features, in increasing index order.
        """
        parameters.check_device(self.device, "cannot condition the model")
        obs, hid = conditioning.split_features(observed_features, self.n_features, self.device)
        if isinstance(observed_values, Tensor) and observed_values.shape != obs.shape:  # (the
            raise ValueError(f"observed_values must have shape [{obs.numel()}] (observed "  # error
                             f"features), got {tuple(observed_values.shape)}")  # said [..., O])
        values = check_data(observed_values, "observed_values", obs.numel(), self.dtype,
                            self.device, what="observed features")
        with torch.no_grad():
            log_evidence = self.marginal(obs).component_log_prob(values)  # [K]
            cond_means, cond_loadings = conditioning.conditional_components(
                self.means, self.factor_loadings, self.noise_variance, obs, hid, values
            )
            logits = torch.log_softmax(log_evidence, dim=-1)
            return self._derived(logits, cond_means, cond_loadings, hid)

    def _derived(
        self, logits: Tensor, means: Tensor, loadings: Tensor, features: Tensor
    ) -> MixtureOfFactorAnalyzers:
        """A model like this one over ``features`` with these parameters (a marginal or a
        conditional): the noise is copied in its unconstrained form, so a variance sitting at
        the floor ``min_noise`` stays representable."""
        raw_noise = self.raw_noise if self.noise == "isotropic" else self.raw_noise[:, features]
        return type(self).from_raw_parameters(
            logits, means, conditioning.reduce_rank(loadings), raw_noise, self.noise,
            min_noise=self.min_noise, chunk_elements=self.chunk_elements,
        )

    def conditional_mean(self, x: Tensor, observed: Tensor) -> Tensor:
        """``E[x_h | x_o]`` per row with per-row masks; observed entries are copied through.

        Args:
            x: ``[N, D]``; the hidden entries are ignored (they may be NaN).
            observed: bool ``[N, D]``, ``True`` where ``x`` is observed.

        Returns:
            ``[N, D]``.
        """
        parameters.check_device(self.device)
        x = conditioning.check_masked(x, observed, self.n_features, self.dtype, self.device)
        return conditioning.conditional_mean(
            self._masked_terms(), x, observed, self.chunk_elements
        )

    def conditional_sample(
        self, x: Tensor, observed: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One exact sample of ``x_h ~ p(x_h | x_o)`` per row; observed entries copied through.

        Args:
            x: ``[N, D]``; observed: bool ``[N, D]``; generator: on the model's device
                (the same seed gives the same samples for the same ``chunk_elements`` and
                library version: the draws are made chunk by chunk, whose size changed in
                2026-12 to count the gathered loadings).

        Returns:
            ``[N, D]``.
        """
        parameters.check_device(self.device)
        x = conditioning.check_masked(x, observed, self.n_features, self.dtype, self.device)
        check_generator(generator, device=self.device)
        with torch.no_grad():
            terms = self._masked_terms()
        return conditioning.conditional_sample(terms, x, observed, self.chunk_elements,
                                               generator)

    def observed_log_prob(self, x: Tensor, observed: Tensor) -> Tensor:
        """``log p(x_o)`` of the observed entries of each row (per-row masks); ``[N]``.

        A row with nothing observed has ``log p = 0``.
        """
        parameters.check_device(self.device)
        x = conditioning.check_masked(x, observed, self.n_features, self.dtype, self.device)
        return conditioning.observed_log_prob(
            self._masked_terms(), x, observed, self.chunk_elements
        )

    def _masked_terms(self) -> conditioning.MaskedTerms:
        return conditioning.masked_terms(
            self.log_weights, self.means, self.factor_loadings, self.noise_variance
        )

    def to_distribution(self) -> torch.distributions.MixtureSameFamily:
        """The same distribution as a ``torch.distributions.MixtureSameFamily`` of a
        ``Categorical`` and a ``LowRankMultivariateNormal``."""
        from torch import distributions as td

        parameters.check_usable(self, "cannot build the distribution")  # (NaN log_probs)
        loadings = self.factor_loadings
        if self.n_factors == 0:  # LowRankMultivariateNormal needs a rank of at least one.
            loadings = loadings.new_zeros(self.n_components, self.n_features, 1)
        component = td.LowRankMultivariateNormal(self.means, loadings, self.noise_variance)
        return td.MixtureSameFamily(td.Categorical(logits=self.log_weights), component)

