"""Batched linear-algebra identities for covariances of the form ``Σ = A Aᵀ + diag(d)``.

Every function here is pure and batched over leading dimensions. ``A`` has shape
``[..., D, L]`` and ``d`` shape ``[..., D]``. None of them forms a ``D × D`` matrix or calls a
matrix inverse: the work is a Cholesky factorisation of the ``L × L`` *capacitance* matrix
``M = I + Aᵀ diag(d)⁻¹ A`` and triangular solves against it.

Identities used (Woodbury and the matrix determinant lemma)::

    Σ⁻¹    = D⁻¹ − D⁻¹ A M⁻¹ Aᵀ D⁻¹              (D = diag(d))
    log|Σ| = log|M| + Σ_j log d_j
    (x−μ)ᵀ Σ⁻¹ (x−μ) = Σ_j (x_j−μ_j)²/d_j − ‖C⁻¹ Aᵀ D⁻¹ (x−μ)‖²,   M = C Cᵀ

The last one is :func:`woodbury_mahalanobis`; its first term, expanded into matrix products
over many rows and components at once, is :func:`diagonal_quadratic`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the incoming gradient contiguous. The Cholesky
    backward hands ``M``'s gradient on as a transposed view, and a CPU ``bmm`` of two
    transposed operands (that gradient and ``Aᵀ``, ``[50, 6, 6] @ [50, 6, 784]``) takes a
    slow path: 2 ms against 0.05 ms, a tenth of an Adam step at K=50, D=784, L=6."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


def capacitance_cholesky(factors: Tensor, noise: Tensor) -> Tensor:
    """Lower Cholesky factor ``C`` of the capacitance ``M = I + Aᵀ diag(d)⁻¹ A``.

    Args:
        factors: ``A``, shape ``[..., D, L]``.
        noise: ``d > 0``, shape ``[..., D]``.

    Returns:
        ``C`` with ``C Cᵀ = M``, shape ``[..., L, L]``.

    ``M`` is positive definite, but with noise variances near the quantisation level its
    condition number can pass float32's precision; where the float32 factorisation fails,
    ``M`` is formed and factored in float64 (``O(D·L²)`` per component) and ``C`` returned in
    the input's dtype.
    """
    return _capacitance_cholesky(factors, noise, factors * noise.reciprocal().unsqueeze(-1))


def _capacitance_cholesky(factors: Tensor, noise: Tensor, scaled: Tensor) -> Tensor:
    """:func:`capacitance_cholesky` given ``scaled = D⁻¹A`` [..., D, L]."""
    n_factors = factors.shape[-1]
    capacitance = _ContiguousGrad.apply(scaled.mT @ factors)  # [..., L, L]
    capacitance = capacitance + torch.eye(n_factors, dtype=factors.dtype, device=factors.device)
    if n_factors == 0:
        return capacitance
    chol, info = torch.linalg.cholesky_ex(capacitance)
    if factors.dtype != torch.float64 and bool((info != 0).any()):
        return capacitance_cholesky(factors.double(), noise.double()).to(factors.dtype)
    if bool((info != 0).any()):
        raise capacitance_error(factors, noise, info != 0)
    return chol


def capacitance_error(factors: Tensor, noise: Tensor, failed: Tensor) -> Exception:
    """The error of a float64 capacitance ``I + AᵀD⁻¹A`` that is not positive definite to
    rounding: its eigenvalues (1 and up to ``‖a_j‖²/d_j`` summed) span more than float64
    resolves, so no answer in float64 is trustworthy. ``factors`` ``[..., D, L]``, ``noise``
    ``[..., D]``, ``failed`` ``[...]`` bool (the leading index of the first names it)."""
    first = tuple(int(i) for i in failed.nonzero()[0]) if failed.ndim else ()
    a, d = factors.detach()[first].double(), noise.detach()[first].double()
    ratio = float((a.square().sum(-1) / d).max()) if a.numel() else math.nan
    where = f" (component {first[-1]})" if first else ""
    return torch.linalg.LinAlgError(
        f"the capacitance I + AᵀD⁻¹A{where} is not positive definite in float64: squared "
        f"loadings reach {ratio:.3g} times the noise variance, beyond float64's resolution "
        "(about 1e15); raise the noise variance (min_noise, variance_floor) or rescale the "
        "data")


def lowrank_logdet(capacitance_chol: Tensor, noise: Tensor) -> Tensor:
    """``log|A Aᵀ + diag(d)| = 2 Σ log diag(C) + Σ log d`` (matrix determinant lemma).

    Args:
        capacitance_chol: ``C``, shape ``[..., L, L]``.
        noise: ``d``, shape ``[..., D]``.

    Returns:
        Shape ``[...]``.
    """
    logdet_c = 2.0 * capacitance_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return logdet_c + noise.log().sum(-1)


def whitened_factors(factors: Tensor, noise: Tensor, capacitance_chol: Tensor) -> Tensor:
    """``B = C⁻¹ Aᵀ diag(d)⁻¹``, so that ``‖B (x−μ)‖²`` is the Woodbury correction.

    Args:
        factors: ``A``, shape ``[..., D, L]``.
        noise: ``d``, shape ``[..., D]``.
        capacitance_chol: ``C``, shape ``[..., L, L]``.

    Returns:
        ``B``, shape ``[..., L, D]``.
    """
    scaled = factors * noise.reciprocal().unsqueeze(-1)  # D⁻¹A  [..., D, L]
    if factors.shape[-1] == 0:
        return scaled.mT
    # Bᵀ = D⁻¹A C⁻ᵀ solved from the right: the same values as C⁻¹(D⁻¹A)ᵀ, and its backward
    # avoids the slow CPU bmm of two transposed operands (see capacitance_cholesky).
    return torch.linalg.solve_triangular(capacitance_chol.mT, scaled, upper=True,
                                         left=False).mT


def whitening(factors: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`capacitance_cholesky` and :func:`whitened_factors` in one call, with ``D⁻¹A``
    formed once: ``(C [..., L, L], B [..., L, D])``, the same values as the two calls. An
    elementwise op over ``[K, D, L]`` with ``L`` last is slow on CPUs, forward and backward
    (0.13 ms at K=50, D=784, L=6 against 0.04 ms with ``D`` last): with it shared and a fused
    Adam, an :class:`~mfa.sgd.SGDTrainer` step at that size and the default batch of 256
    went from 9.7 to 8.4 ms on one CPU thread, 6.7 to 5.8 ms on two.

    Args:
        factors: ``A``, shape ``[..., D, L]``.
        noise: ``d > 0``, shape ``[..., D]``.
    """
    scaled = factors * noise.reciprocal().unsqueeze(-1)  # D⁻¹A  [..., D, L]
    chol = _capacitance_cholesky(factors, noise, scaled)
    if factors.shape[-1] == 0:
        return chol, scaled.mT
    # Bᵀ = D⁻¹A C⁻ᵀ, as whitened_factors
    return chol, torch.linalg.solve_triangular(chol.mT, scaled, upper=True, left=False).mT


def flush_subnormal(values: Tensor) -> Tensor:
    """``values`` with its subnormal entries (``0 < |v| <`` the dtype's smallest normal
    number) set to 0, when no gradient is being recorded (else ``values`` as they are).

    Loadings of pixels that are constant within a component shrink towards 0 over EM
    iterations, and their whitened factors ``B`` end up subnormal: on the embedded digits
    (K = 200, L = 6) 14,000 of B's 940,000 float32 entries were, and every product with B
    (the log-densities of a 500-row validation pass) ran 10× slower on an Intel Xeon with
    MKL (55 ms against 5 ms). A subnormal entry's share of any density is below the dtype's
    precision (``|v·x| < 1.2e-38·|x|``), so flushing it changes no result."""
    if values.requires_grad and torch.is_grad_enabled():
        return values
    return values.masked_fill(values.abs() < torch.finfo(values.dtype).tiny, 0.0)


def capacitance_inverse_factor(capacitance_chol: Tensor) -> Tensor:
    """``C⁻ᵀ``: a square root of ``M⁻¹`` (``M⁻¹ = C⁻ᵀ C⁻¹``), shape ``[..., L, L]``.

    ``M⁻¹`` is the posterior covariance of the latent factors, so ``A C⁻ᵀ`` factors the
    low-rank part of a conditional covariance ``A M⁻¹ Aᵀ``."""
    n = capacitance_chol.shape[-1]
    eye = capacitance_chol.new_ones(n).diag().expand_as(capacitance_chol)
    if n == 0:
        return eye
    return torch.linalg.solve_triangular(capacitance_chol, eye, upper=False).mT


def gaussian_log_normaliser(n_dims: Tensor | float, logdet: Tensor) -> Tensor:
    """``−½ (n log 2π + log|Σ|)``: the log-density of a Gaussian at its mean."""
    return -0.5 * (n_dims * LOG_2PI + logdet)


def woodbury_mahalanobis(diagonal_quad: Tensor, whitened_residual: Tensor) -> Tensor:
    """``(x−μ)ᵀ Σ⁻¹ (x−μ)`` for ``Σ = A Aᵀ + diag(d)`` by the Woodbury identity::

        (x−μ)ᵀ Σ⁻¹ (x−μ) = Σ_j (x_j−μ_j)²/d_j − ‖C⁻¹ Aᵀ D⁻¹ (x−μ)‖²,   M = C Cᵀ

    (as torch's ``_batch_lowrank_mahalanobis``, with the two terms computed by the caller,
    which batches them over rows and components as matrix products).

    Args:
        diagonal_quad: ``Σ_j (x_j−μ_j)²/d_j``, shape ``[...]`` (e.g. ``[n, K]``); see
            :func:`diagonal_quadratic`.
        whitened_residual: ``C⁻¹ Aᵀ D⁻¹ (x−μ)``, shape ``[..., L]`` (e.g. ``[n, K, L]``).

    Returns:
        Shape ``[...]``. Not clamped: rounding can leave a tiny negative value.
    """
    return diagonal_quad - (whitened_residual * whitened_residual).sum(-1)


#: Largest estimated rounding error (nats, ε·κ; the rows' own terms left out) of the expanded
#: quadratic form left as it is. At 1.0 (before 2026-12) float32 rows drawn from far-mean models
#: were 1.4 nats off; at 0.01 at most 0.004 (96 models). The embedded digits (K = 20): 2e-4.
QUADRATIC_TOLERANCE = 0.01

#: Above this worst-case rounding error (nats) the expanded quadratic form is evaluated in
#: float64; between :data:`QUADRATIC_TOLERANCE` and it, the entries near each row's top are
#: recomputed directly in the data's dtype instead (:func:`refine_near_top`).
REFINE_LIMIT = 20.0

#: Above this worst-case rounding error (nats, below float64) the rows' own centring
#: ``x − c`` and ``μ − c`` lose what the float64 form cannot recover, and every term of the
#: densities is taken in float64 from the uncentred parameters
#: (:func:`mfa._terms.component_log_prob_from_terms`).
#: Measured (D = 50 and 784, sharp components 10 to 10⁵ apart, the float64 form of the
#: centred terms against a float64 model): 0.005 nats off at 265, 0.07–0.09 at 4e3–3e4, 0.8 at
#: 3e6, 123 at 3e10; the float64 terms from the parameters within 0.006 everywhere. Between
#: :data:`REFINE_LIMIT` and this (a default Fashion-MNIST fit at K = 200 reached 20) the
#: cheaper form stays: it cost Adam's steps 1.8× there.
FLOAT64_LIMIT = 200.0


def quadratic_rounding(centred_means: Tensor, inv_noise: Tensor) -> float:
    """``ε·κ``, the worst-case rounding error (nats) of ``Σ_j (x_j − μ_kj)²/d_kj`` expanded
    around the reference point in the parameters' dtype, with
    ``κ = max_k Σ_j (μ_kj − c_j)²/d_kj``. See :func:`needs_float64_quadratic`. In float64
    too: with components 10⁷ noise standard deviations apart (κ ≈ 10¹⁵) the expansion lost
    0.25 nats, 35 at 10⁸, and gave a row's responsibility to the wrong component."""
    kappa = (centred_means.detach() ** 2 * inv_noise.detach()).sum(-1).max().item()
    return kappa * torch.finfo(centred_means.dtype).eps


def refine_near_top(
    diag_quad: Tensor, log_joint: Tensor, xc: Tensor, means: Tensor, inv_noise: Tensor,
    rounding: float, mask: Tensor | None = None,
) -> Tensor:
    """The expanded ``diag_quad`` with the entries that can matter recomputed directly.

    The expansion loses up to ``rounding`` (``ε·κ``, :func:`quadratic_rounding`) nats; a
    direct sum ``Σ_j (xc_j − μ_j)²/d_j`` of positive terms loses ``ε`` relatively. Entries
    whose estimated log-joint lies within ``30 + 8·rounding`` nats of their row's top are
    recomputed directly (on image data about one per row): every other entry stays more than
    ``30`` nats below the top whatever its rounding, so its posterior weight is below
    ``e⁻³⁰`` and its error moves no log-density or responsibility. Differentiable.

    Args:
        diag_quad: the expanded form ``[n, K]`` (any strides).
        log_joint: its estimated ``log w + log N`` ``[n, K]`` (only compared).
        xc: centred rows ``[n, D]``; means: centred means ``[K, D]``; inv_noise: ``[K, D]``.
        rounding: ``ε·κ`` of these parameters.
        mask: optional float mask ``[n, D]`` (1 where observed; ``xc`` zero where hidden):
            the sums then run over each row's observed features only.

    Returns:
        ``[n, K]``.
    """
    estimate = log_joint.detach()
    top = estimate.amax(-1, keepdim=True)
    rows, comps = (estimate >= top - (30.0 + 8.0 * rounding)).nonzero(as_tuple=True)
    step = 4 * max(1, xc.shape[0])  # pairs per slice: a few [n, D] intermediates at most
    exact = []
    for start in range(0, rows.shape[0], step):
        r, k = rows[start : start + step], comps[start : start + step]
        y = xc.index_select(0, r) - means.index_select(0, k)  # [m, D]
        if mask is not None:
            y = y * mask.index_select(0, r)
        exact.append((y * y * inv_noise.index_select(0, k)).sum(-1))
    if not exact:
        return diag_quad
    return diag_quad.index_put((rows, comps), torch.cat(exact).to(diag_quad.dtype))


def needs_float64_quadratic(centred_means: Tensor, inv_noise: Tensor) -> bool:
    """Whether ``Σ_j (x_j − μ_kj)²/d_kj``, expanded around the reference point, would lose
    more than :data:`QUADRATIC_TOLERANCE` nats to rounding in the parameters' dtype.

    The expansion subtracts terms of size ``κ = max_k Σ_j (μ_kj − c_j)²/d_kj``, so its
    rounding error is about ``ε·κ``: negligible for images in ``[0, 1]``, but hundreds of nats
    in float32 for components far apart relative to their noise. Below float64 the form is
    then evaluated in float64; in float64 (no wider dtype) each row's near-top entries are
    recomputed directly instead (:func:`refine_near_top`).

    Args:
        centred_means: ``μ − c``, shape ``[K, D]``.
        inv_noise: ``1/d``, shape ``[K, D]``.
    """
    return quadratic_rounding(centred_means, inv_noise) > QUADRATIC_TOLERANCE


def diagonal_quadratic(
    xc: Tensor, means: Tensor, inv_noise: Tensor, precise: bool, mask: Tensor | None = None
) -> Tensor:
    """``Σ_j (x_j − μ_kj)² / d_kj`` for every row and component, as matrix products.

    Expanded as ``x² @ (1/d)ᵀ − 2 x @ (μ/d)ᵀ + Σ_j μ_kj²/d_kj`` (in float64 when
    ``precise``, see :func:`needs_float64_quadratic`).

    Args:
        xc: centred rows ``[n, D]``; with ``mask``, zero where a row's feature is hidden.
        means: centred means ``[K, D]``.
        inv_noise: ``1/d``, shape ``[K, D]``.
        precise: evaluate in float64.
        mask: optional float mask ``[n, D]`` (1 where observed): the sum then runs over each
            row's observed features only.

    Returns:
        ``[n, K]`` in ``xc``'s dtype.
    """
    if precise:
        out = diagonal_quadratic(
            xc.double(), means.double(), inv_noise.double(), False,
            None if mask is None else mask.double(),
        )
        return out.to(xc.dtype)
    if mask is None:
        constant = (means * means * inv_noise).sum(-1)  # [K]
    else:
        constant = mask @ (means * means * inv_noise).T  # [n, K]
    return (xc * xc) @ inv_noise.T - 2.0 * (xc @ (means * inv_noise).T) + constant


def exp_floor(dtype: torch.dtype) -> float:
    """The smallest argument worth passing to ``exp`` in ``dtype``: ``log`` of the smallest
    normal number plus 20 (``exp`` of it ≈ 5e8 × that number: 6e-30 in float32). ``exp`` of
    anything lower is subnormal or 0, which CPUs compute on a slow path (~10× slower; 5× for
    a whole ``logsumexp``); and the E-step multiplies these values by data and projections
    in its matrix products, whose subnormal results cost far more on some CPUs (an Intel
    Xeon with MKL took 195 ms for a ``[350, 1024] @ [1024, 784]`` float32 product of
    responsibilities floored at 3e-38, against 2 ms at this floor). The value changes no sum
    it enters at the dtype's precision (K such terms beside a total of at least 1)."""
    return math.log(torch.finfo(dtype).tiny) + 20.0


def logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``log Σ exp(x)`` over ``dim``, as :func:`torch.logsumexp` (rows of ``-inf`` give
    ``-inf``), with the shifted arguments clamped at :func:`exp_floor`: the same value and
    gradient to the dtype's precision (terms below ~1e-38 in float32 count as ~1e-38, not
    0) at a fraction of the time on CPUs, where mixture log-joints span thousands of nats.

    Args:
        x: ``[..., K, ...]`` floating point.

    Returns:
        ``x`` with ``dim`` removed.
    """
    peak = x.detach().amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    summed = (x - top).clamp_min(exp_floor(x.dtype)).exp().sum(dim)
    # A row of -inf (its maximum is -inf): every term sits at the floor; its log-sum is -inf,
    # as torch's.
    out = summed.log() + top.squeeze(dim)
    return torch.where(torch.isneginf(peak.squeeze(dim)), torch.full_like(out, -math.inf), out)


def latent_posterior_means(proj: Tensor, chol: Tensor) -> Tensor:
    """``E[z | x, k] = M⁻¹ Aᵀ D⁻¹ (x − μ) = C⁻ᵀ (B (x − μ))`` from ``proj = B(x − μ)``.

    Args:
        proj: ``[n, K, L]``; chol: ``C`` ``[K, L, L]``.

    Returns:
        ``[n, K, L]``.
    """
    # Solve Cᵀ e = proj for every row: move rows last so each component is one solve.
    rhs = proj.permute(1, 2, 0)  # [K, L, n]
    sol = torch.linalg.solve_triangular(chol.mT, rhs, upper=True)
    return sol.permute(2, 0, 1)
