"""Per-component quantities of a mixture of factor analyzers and the log-densities of rows.

:class:`ComponentTerms` holds what every row shares (computed once per call in
``O(K·D·L²)``); :func:`component_log_prob_from_terms` evaluates one chunk of rows with three
matrix products and the Woodbury identity (:func:`mfa.linalg.woodbury_mahalanobis`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from mfa import linalg, residual_form

#: The parameter dtypes the model computes in (Cholesky and SVD need float32 or float64).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_supported_dtype(dtype: torch.dtype) -> None:
    """Refuse parameter dtypes the factorisations do not support (float16, bfloat16, ints)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"a MixtureOfFactorAnalyzers cannot use dtype {dtype}: its Cholesky and SVD "
            f"factorisations need one of {[str(t) for t in SUPPORTED_DTYPES]}; "
            "keep the model in float32 and convert the data instead"
        )


def check_parameters(log_weights: Tensor, means: Tensor, loadings: Tensor, noise: Tensor,
                     action: str = "cannot evaluate the model") -> None:
    """Raise when a parameter is NaN or infinite (a diverged run or a bad assignment): the
    densities would be NaN, or fail later with a message about something else. Log-weights
    ``[K]`` may be ``−inf`` (a component of weight 0). ``O(K·D·L)``, one sync (it runs on
    every density call, Adam's steps included). A finite float64 sum of each proves its
    entries finite (an element-wise ``isfinite`` of the four was ~10 % of scoring 500 rows at
    K = 20, D = 784); only where a sum is not finite are the entries tested one by one."""
    log_weights = log_weights.detach()
    named = (("the mixture weights", log_weights.masked_fill(log_weights == -torch.inf, 0.0)),
             ("the means", means.detach()), ("the factor loadings", loadings.detach()),
             ("the noise variances", noise.detach()))
    sums = torch.stack([value.sum(dtype=torch.float64) for _, value in named])
    if bool(torch.isfinite(sums).all()):
        return
    for name, value in named:
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            index = [int(i) for i in bad.nonzero()[0]]
            where = ", ".join(f"{axis} {i}" for axis, i in
                              zip(("component", "feature", "factor"), index, strict=False))
            raise ValueError(
                f"{action}: {name} are not finite ({value[tuple(index)].item()} at {where}): "
                "a training run that diverged, or an assignment to the parameters; load a good "
                "checkpoint or initialise again")


def check_noise(noise: Tensor) -> None:
    """Raise when a noise variance ``[K, D]`` underflowed to 0, or is so small that its
    reciprocal overflows, in its dtype (the densities would silently be NaN). ``O(K·D)``."""
    bad = ~(noise > 0) | ~torch.isfinite(noise.reciprocal())
    if bool(bad.any()):
        k, j = (int(i) for i in bad.nonzero()[0])
        value = noise[k, j].item()
        cause = "underflowed to 0" if value == 0 else "is so small that 1/d overflows"
        raise ValueError(
            f"the noise variance {cause} in {noise.dtype} ({value:.3g} at component {k}, "
            f"feature {j}; the smallest normal {noise.dtype} is "
            f"{torch.finfo(noise.dtype).tiny:.3g}): raise min_noise or use float64"
        )


def check_log_densities(
    log_joint: Tensor, log_weights: Tensor, x: Tensor, inv_noise: Tensor, means: Tensor
) -> None:
    """Raise when finite data ``x`` [n, D] gave non-finite log-densities ``[n, K]``
    (``log_weights`` [K] may be ``−inf`` for a component of weight 0): the quadratic form
    ``Σ_j (x_j − μ_j)²/d_j`` overflowed. ``inv_noise`` [K, D] is ``1/d``, ``means`` [K, D]
    ``μ``; ``O(n·K)``. The message blames the larger of ``|x|`` and ``|μ|`` (a model whose
    means were 3e38 was reported as "input values too large", largest |x| 0)."""
    bad = ~torch.isfinite(log_joint) & torch.isfinite(log_weights)
    if bool(bad.any()):
        finfo = torch.finfo(x.dtype)
        largest = x.abs().max().item() if x.numel() else 0.0
        mean = means.detach().abs().max().item() if means.numel() else 0.0
        what, fix = ((f"the model's means are too large for {x.dtype}", "Rescale the model "
                      "(and the data with it)") if mean > largest else
                     (f"input values too large for {x.dtype}", "Rescale the data"))
        raise ValueError(
            f"{what}: the squared distances (x − μ)²/d overflow (largest |x| is "
            f"{largest:.3g}, largest |μ| {mean:.3g}, smallest noise variance "
            f"{1.0 / inv_noise.max().item():.3g}; squares overflow above "
            f"{finfo.max ** 0.5:.3g}). {fix} or use a float64 model"
        )


#: Above this ``ε·cond(M)`` of any component's capacitance ``M = I + AᵀD⁻¹A`` (``ε`` of the
#: model's dtype) that component's share of a float32 E-step is taken in float64
#: (:mod:`mfa.exact_components`) and Adam's loss uses the exact form (:mod:`mfa.sgd`). The
#: float32 sums err by about ``ε·cond(M)`` relative (measured, one feature's noise far below
#: its loadings': 3e-3 → 3e-4 relative in ``Σ r E[z]E[z]ᵀ``, 3.5e-2 → 7e-3, 0.5 → 240×, the
#: responsibilities' mass 0.9× off); trained image models sit far below (Fashion-MNIST,
#: K = 50, 20 default iterations: 1.5e-4, sums within 2e-4), small image sets do not (the
#: embedded digits, 4,000 rows, K = 200: up to 55 of 200 components during a default fit).
CONDITION_LIMIT = 1e-3


def capacitance_eigenvalues(loadings: Tensor, noise: Tensor) -> Tensor:
    """The eigenvalues of ``M = I + AᵀD⁻¹A`` per component, ascending (all ``≥ 1``), in
    float64: loadings ``A`` ``[K, D, L]``, noise ``d`` ``[K, D]`` → ``[K, L]``. Cost
    ``O(K·D·L² + K·L³)``."""
    a, d = loadings.detach().double(), noise.detach().double()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.eigvalsh(eye + a.mT @ (a / d.unsqueeze(-1)))


def capacitance_condition(loadings: Tensor, noise: Tensor) -> Tensor:
    """``cond(M)`` of ``M = I + AᵀD⁻¹A`` per component, from
    :func:`capacitance_eigenvalues`: ``[K]`` float64 (ones when ``L = 0``)."""
    values = capacitance_eigenvalues(loadings, noise)
    if values.shape[-1] == 0:
        return values.new_ones(values.shape[0])
    return values[..., -1] / values[..., 0]


#: Above this ``ε·max λ(M)`` (``ε`` of the model's dtype, ``M = I + AᵀD⁻¹A``) Adam's loss
#: uses the exact form (:mod:`mfa.sgd`): the Woodbury form loses about ``ε·‖w‖²`` nats a row
#: (``‖w‖² ≲ λ_max(M)·|z|²``), and on pixel-like rows (noise variances at 1e-6 under
#: loadings of 0.3: ``ε·λ_max`` ≈ 0.2, while ``ε·cond`` stayed at 2e-7) its loss was
#: +0.05 nats a row off in every batch (not cancelling) and the noise variances' gradient
#: 0.47 relative off.
SHARP_LOSS_LIMIT = 1e-2


def woodbury_rounding(loadings: Tensor, noise: Tensor) -> float:
    """``ε·max_k λ_max(I + A_kᵀD_k⁻¹A_k)`` in the parameters' dtype (0 without factors): the
    scale of the Woodbury form's rounding, nats a row. In float64 too: with noise variances
    10¹³–10¹⁴ below squared loadings of 1 (``ε·λ_max`` 0.04–0.4) the Woodbury loss was
    0.04–0.07 nats a row off and the noise variances' gradient 0.4–4 relative off."""
    if loadings.shape[-1] == 0:
        return 0.0
    largest = capacitance_eigenvalues(loadings, noise)[..., -1].max()
    return torch.finfo(loadings.dtype).eps * float(largest)


def ill_conditioned(loadings: Tensor, noise: Tensor) -> Tensor:
    """``[K]`` bool: components whose ``ε·cond(M)`` in the parameters' dtype exceeds
    :data:`CONDITION_LIMIT` (never in float64, nor without factors)."""
    if loadings.dtype == torch.float64 or loadings.shape[-1] == 0:
        return torch.zeros(loadings.shape[0], dtype=torch.bool, device=loadings.device)
    eps = torch.finfo(loadings.dtype).eps
    return eps * capacitance_condition(loadings, noise) > CONDITION_LIMIT


@dataclass(frozen=True)
class ComponentTerms:
    """Quantities derived once per call from the parameters (all centred on ``reference``).

    Shapes: ``log_weights`` [K], ``reference`` [D], ``means`` [K, D] (centred),
    ``inv_noise`` [K, D], ``whitened`` [K, L, D] (``C⁻¹ Aᵀ D⁻¹``), ``log_norm`` [K]
    (``−½(D log 2π + log|Σ_k|)``), ``whitened_means`` [K, L]; ``rounding``: the worst-case
    rounding error (nats) of the expanded diagonal quadratic form in the terms' dtype
    (:func:`mfa.linalg.quadratic_rounding`). Up to :data:`mfa.linalg.QUADRATIC_TOLERANCE` it
    is ignored; up to :data:`mfa.linalg.REFINE_LIMIT` (``refine``) the entries near each
    row's top are recomputed directly (:func:`mfa.linalg.refine_near_top`); above it
    (``precise``) the form is evaluated in float64, or in float64 terms refined as below the
    limit. ``factors`` (``A`` [K, D, L]) and
    ``capacitance_chol`` (``C`` [K, L, L]) serve the residual form of the near-top entries
    (:func:`mfa.residual_form.refine_woodbury_near_top`); without them it is skipped.
    """

    log_weights: Tensor
    reference: Tensor
    means: Tensor
    inv_noise: Tensor
    whitened: Tensor
    log_norm: Tensor
    whitened_means: Tensor
    rounding: float = 0.0
    factors: Tensor | None = None
    capacitance_chol: Tensor | None = None
    parameters: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @cached_property
    def in_float64(self) -> ComponentTerms:
        """These terms built in float64 from the uncentred ``parameters`` (log-weights,
        means, loadings, noise variances) they came from, once."""
        return build_component_terms(*(t.double() for t in self.parameters))

    @property
    def precise(self) -> bool:
        """Evaluate the diagonal quadratic form in float64 (below float64)."""
        return self.rounding > linalg.REFINE_LIMIT and self.means.dtype != torch.float64

    @property
    def refine(self) -> bool:
        """Recompute the near-top entries of the expanded form directly (in float64 at any
        rounding above the tolerance: there is no wider dtype to evaluate it in)."""
        return self.rounding > linalg.QUADRATIC_TOLERANCE and not self.precise

    def to(self, dtype: torch.dtype) -> ComponentTerms:
        """The same terms in another floating dtype (``rounding`` recomputed in it)."""
        fields = {name: getattr(self, name).to(dtype) for name in (
            "log_weights", "reference", "means", "inv_noise", "whitened", "log_norm",
            "whitened_means")}
        for name in ("factors", "capacitance_chol"):
            value = getattr(self, name)
            fields[name] = None if value is None else value.to(dtype)
        return ComponentTerms(**fields, rounding=linalg.quadratic_rounding(
            fields["means"], fields["inv_noise"]))


def precision_weighted_reference(log_weights: Tensor, means: Tensor, inv_noise: Tensor) -> Tensor:
    """The point ``c`` [D] every quadratic form is expanded around: per feature, the means
    averaged with weights ``w_k / d_kj``, ``c_j = Σ_k w_k μ_kj/d_kj / Σ_k w_k/d_kj``
    (detached; the densities do not depend on it).

    The expansion ``Σ_j (x_j−c_j)²/d_kj − 2 (x−c)·(μ_k−c)/d_k + Σ_j (μ_kj−c_j)²/d_kj`` loses
    about ``ε·Σ_j (μ_kj−c_j)²/d_kj`` to rounding (:func:`mfa.linalg.quadratic_rounding`), and
    the M-step's moment sums about ``c`` cancel in proportion to the same terms; this ``c``
    minimises their weighted sum over components. The plain weighted mean of the means lets
    a feature where a component is sharp (``d_kj`` at the floor) but the mean lies elsewhere
    dominate: on Fashion-MNIST (K=50, L=6, 8 EM iterations) it gave ``ε·κ`` = 3.8 nats and an
    error of 27 nats in the top component's log-density, against 0.12 and 0.04 here.

    Args:
        log_weights: [K]; means: [K, D]; inv_noise: ``1/d`` [K, D].
    """
    # In float64: K precisions near the largest float32 could overflow their sum.
    precision = log_weights.detach().double().exp().unsqueeze(-1) * inv_noise.detach().double()
    reference = (precision * means.detach().double()).sum(0) / precision.sum(0)  # [D]
    return reference.to(means.dtype)


def build_component_terms(
    log_weights: Tensor, means: Tensor, loadings: Tensor, noise: Tensor
) -> ComponentTerms:
    """:class:`ComponentTerms` of log-weights [K], means [K, D], loadings [K, D, L] and
    noise variances [K, D] (checked with :func:`check_parameters` and :func:`check_noise`)."""
    check_parameters(log_weights, means, loadings, noise)
    check_noise(noise)
    inv_noise = noise.reciprocal()  # [K, D]
    reference = precision_weighted_reference(log_weights, means, inv_noise)  # [D]
    centred = means - reference  # [K, D]
    chol, whitened = linalg.whitening(loadings, noise)  # [K, L, L], [K, L, D]
    whitened = linalg.flush_subnormal(whitened)  # subnormal entries: 10× slower products
    logdet = linalg.lowrank_logdet(chol, noise)  # [K]
    log_norm = linalg.gaussian_log_normaliser(means.shape[-1], logdet)
    whitened_means = (whitened @ centred.unsqueeze(-1)).squeeze(-1)  # [K, L]
    return ComponentTerms(
        log_weights=log_weights,
        reference=reference,
        means=centred,
        inv_noise=inv_noise,
        whitened=whitened,
        log_norm=log_norm,
        whitened_means=whitened_means,
        rounding=linalg.quadratic_rounding(centred, inv_noise),
        factors=loadings,
        capacitance_chol=chol,
        parameters=(log_weights, means, loadings, noise),
    )


def component_log_prob_from_terms(
    x: Tensor, terms: ComponentTerms, exact: bool = True, near_rows_only: bool = False
) -> Tensor:
    """``log w_k + log N(x; μ_k, Σ_k)`` for a chunk ``x`` of shape ``[n, D]`` → ``[n, K]``.

    ``(x−μ)ᵀΣ⁻¹(x−μ) = Σ_j (x_j−μ_j)²/d_j − ‖B(x−μ)‖²`` with ``B = C⁻¹AᵀD⁻¹``; the first
    term is expanded into two matrix products, the second is one product ``x @ Bᵀ``. With
    ``exact`` and factors, the entries near each row's top are then recomputed in the
    residual form (:func:`mfa.residual_form.refine_woodbury_near_top`), which keeps the
    dtype's relative precision where the Woodbury subtraction loses up to tens of nats on a
    row its component explains well (float32: 34 nats on Fashion-MNIST, K = 50, noise at
    1e-6; 0.017 nats a row on average; float64 with noise variances 10¹⁴ below squared
    loadings of 1: 6.6 nats, 4 nats apart on one row scored alone and in a batch); only
    entries whose ``ε·‖B(x−μ)‖²`` exceeds :data:`mfa.residual_form.CANCELLATION_TOLERANCE`
    (none on ordinary float64 models: one comparison). That costs about four passes over the
    ``[n, D]`` rows it recomputes (+18 % on a 2-core CPU at K = 50, D = 784 for that sharply fitted
    model, +3 % where no component explains a row sharply); Adam's loss passes
    ``exact=False`` unless a component is ill-conditioned or sharp (:data:`SHARP_LOSS_LIMIT`:
    then its errors do not cancel). Before that, the diagonal form's near-top
    entries are recomputed when its expansion loses more than
    :data:`mfa.linalg.QUADRATIC_TOLERANCE` (``terms.refine``). ``near_rows_only``: an
    ill-conditioned component's float64 entries only where they can move a row's log-density
    or responsibilities (see :func:`~mfa.residual_form.refine_woodbury_near_top`).
    """
    if terms.rounding > linalg.FLOAT64_LIMIT and terms.precise and terms.parameters is not None:
        # Below float64 at this spread x − c and μ − c themselves round away the rows'
        # differences (with one component 1e10 from the rest every row near the others
        # scored alike): every term in float64, from the uncentred parameters.
        return component_log_prob_from_terms(x.double(), terms.in_float64, exact,
                                             near_rows_only).to(x.dtype)
    xc = x - terms.reference  # [n, D]
    k, n_lat, d = terms.whitened.shape
    diag_quad = linalg.diagonal_quadratic(xc, terms.means, terms.inv_noise, terms.precise)
    proj = None
    if n_lat:
        proj = (xc @ terms.whitened.reshape(k * n_lat, d).T).view(-1, k, n_lat)  # [n, K, L]
        proj = proj - terms.whitened_means
    scale = terms.log_weights + terms.log_norm  # [K]

    def log_joint(quad: Tensor) -> Tensor:
        maha = quad if proj is None else linalg.woodbury_mahalanobis(quad, proj)  # [n, K]
        # Rounding can push a tiny Mahalanobis distance below zero.
        return scale - 0.5 * maha.clamp_min(0.0)

    # (float64 too: its Woodbury subtraction loses ε·‖w‖² as float32's does, up to 15 nats
    # with noise variances 10¹⁵ below squared loadings of 1 (the near-top filter leaves an
    # ordinary model's entries as they are); and where its expansion loses precision,
    # x @ Bᵀ − B μ cancels as the diagonal form does, while the residual form, stationary
    # in the latent mean, does not inherit it)
    residual = exact and proj is not None and terms.factors is not None
    if terms.refine and not residual:
        diag_quad = linalg.refine_near_top(diag_quad, log_joint(diag_quad), xc, terms.means,
                                           terms.inv_noise, terms.rounding)
    out = log_joint(diag_quad)
    if residual:  # the residual form also recomputes the diagonal form: one pass for both
        out = residual_form.refine_woodbury_near_top(
            out, scale, xc, terms.means, terms.inv_noise, terms.factors,
            terms.capacitance_chol, proj, diag_quad, slack=8.0 * terms.rounding,
            every=terms.refine, near_rows_only=near_rows_only)
    return out
