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
        torch.linalg.cholesky(capacitance)  # raises, naming the failing matrix
    return chol


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


def quadratic_rounding(centred_means: Tensor, inv_noise: Tensor) -> float:
    """``ε·κ``, the worst-case rounding error (nats) of ``Σ_j (x_j − μ_kj)²/d_kj`` expanded
    around the reference point in the parameters' dtype, with
    ``κ = max_k Σ_j (μ_kj − c_j)²/d_kj`` (0 for float64). See
    :func:`needs_float64_quadratic`."""
    if centred_means.dtype == torch.float64:
        return 0.0
    kappa = (centred_means.detach() ** 2 * inv_noise.detach()).sum(-1).max().item()
    return kappa * torch.finfo(centred_means.dtype).eps


def refine_near_top(
    diag_quad: Tensor, log_joint: Tensor, xc: Tensor, means: Tensor, inv_noise: Tensor,
    rounding: float,
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
        exact.append((y * y * inv_noise.index_select(0, k)).sum(-1))
    if not exact:
        return diag_quad
    return diag_quad.index_put((rows, comps), torch.cat(exact).to(diag_quad.dtype))


def residual_mahalanobis(
    rows: Tensor, comps: Tensor, means: Tensor, factors: Tensor, inv_noise: Tensor,
    posterior: Tensor, mask: Tensor | None = None, grouped: bool | None = None,
) -> Tensor:
    """``(x−μ_k)ᵀ Σ_k⁻¹ (x−μ_k)`` of row–component pairs as a sum of two non-negative terms,
    without the cancellation of :func:`woodbury_mahalanobis`::

        (x−μ)ᵀ Σ⁻¹ (x−μ) = Σ_j (x_j − μ_j − (A m)_j)²/d_j + ‖m‖²,   m = M⁻¹ Aᵀ D⁻¹ (x−μ)

    (``m`` is the posterior mean of the factors; the identity follows from ``M m = AᵀD⁻¹(x−μ)``;
    with a ``mask`` the sum and ``A``, ``D`` run over the observed features). The Woodbury
    form subtracts two terms of size ``Σ_j (x_j−μ_j)²/d_j``, which with noise variances near
    the quantisation level reaches 10⁷ for a row its component explains well, and float32
    then loses tens of nats; it also inherits the rounding of ``C`` where the capacitance is
    ill-conditioned. Here both terms keep the dtype's relative precision, and an error ``δ``
    in ``m`` moves the sum by ``δᵀ M δ`` only (the sum is stationary in ``m``).
    On the CPU (``grouped``) one product per component present in ``comps``; elsewhere,
    where each small operation costs a kernel launch, each pair's loadings are gathered
    (``[s, D, L]``, :data:`GATHER_ELEMENTS` at a time) and the pairs handled in a few batched
    products: at K = 300 a loop over components would cost ~10× the chunk's matrix products.

    Args:
        rows: ``x`` of each pair ``[P, D]`` (overwritten when no gradient is recorded);
        comps: each pair's component ``[P]``, sorted; means: ``[K, D]``; factors: ``A``
        ``[K, D, L]``; inv_noise: ``1/d`` ``[K, D]``; posterior: ``m`` of each pair
        ``[P, L]``; mask: optional float ``[P, D]``, 1 where observed; grouped: the CPU
        strategy (``None``: by ``rows``' device).

    Returns:
        Shape ``[P]``.
    """
    if grouped is None:
        grouped = rows.device.type == "cpu"
    inplace = not torch.is_grad_enabled()  # rows is the caller's copy
    left = []
    if grouped:  # one product per component: few, large operations (CPUs)
        coefficients = torch.cat([posterior, torch.ones_like(posterior[:, :1])], 1)  # [m, 1]
        bounds = comps.unique_consecutive(return_counts=True)
        start = 0
        for k, count in zip(*(t.tolist() for t in bounds), strict=True):
            part = slice(start, start + count)
            start += count
            # x − μ − A m as one product: [m, 1] @ [A, μ]ᵀ subtracted from x.
            basis = torch.cat([factors[k], means[k].unsqueeze(-1)], 1).T  # [L+1, D]
            if inplace:
                diff = rows[part].addmm_(coefficients[part], basis, alpha=-1.0).square_()
            else:
                diff = torch.addmm(rows[part], coefficients[part], basis, alpha=-1.0).square()
            if mask is not None:
                diff = diff * mask[part]
            left.append(diff @ inv_noise[k])
    else:  # each pair's loadings gathered, a slice of pairs at a time (no per-component loop)
        n_feat, n_lat = factors.shape[-2:]
        step = max(1, GATHER_ELEMENTS // max(1, n_feat * n_lat))
        for start in range(0, rows.shape[0], step):
            part = slice(start, start + step)
            k = comps[part]
            explained = (factors.index_select(0, k) @ posterior[part].unsqueeze(-1)).squeeze(-1)
            diff = rows[part] - means.index_select(0, k) - explained  # [s, D]
            weight = inv_noise.index_select(0, k)
            if mask is not None:
                weight = weight * mask[part]
            left.append((diff * diff * weight).sum(-1))
    return torch.cat(left) + (posterior * posterior).sum(-1)


#: Loadings gathered per pair at a time by :func:`residual_mahalanobis` off the CPU (elements).
GATHER_ELEMENTS = 1 << 24

#: Woodbury terms ``‖C⁻¹AᵀD⁻¹(x−μ)‖²`` below this many units of the dtype's ``ε`` leave an
#: entry as it is (float32: 840): its rounding stays below ~0.03 nats (measured on
#: Fashion-MNIST, K = 50, L = 6, noise at 1e-6: at most 0.024 nats a row).
CANCELLATION_TOLERANCE = 1e-4

#: Components whose capacitance factor ``C`` has ``ε·(max diag C / min diag C)²`` above this
#: are recomputed near the top in float64 (neither their posterior means nor their log
#: determinant are accurate enough in the dtype: one feature's noise of 1e-7 under loadings of
#: size 1 left float32 log-densities 11 nats off).
CONDITION_TOLERANCE = 1e-5


def near_top_pairs(
    log_joint: Tensor, diag_quad: Tensor, cancelled: Tensor, slack: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The entries of ``log_joint`` [n, K] whose Woodbury rounding can matter, as
    ``(rows, comps)`` sorted by component.

    The Woodbury form subtracts ``cancelled`` = ``‖C⁻¹AᵀD⁻¹(x−μ)‖²`` [n, K] from the
    diagonal form ``diag_quad`` [n, K] and loses about ``ε·cancelled`` (``ε`` of the dtype),
    more where the capacitance is ill-conditioned. An entry qualifies when its estimate lies
    within ``30 + slack + 2⁸·ε·diag_quad`` nats of its row's top (``slack`` covers the
    rounding of the expanded ``diag_quad``) and ``ε·cancelled`` exceeds
    :data:`CANCELLATION_TOLERANCE` (every such entry: keeping only the largest estimates
    left others off by tens of nats where components are alike). On image data that is about one
    entry per row of a well-fitted model, none for rows no component explains sharply.
    Entries more than 30 nats below the top move no log-density or responsibility.
    """
    estimate = log_joint.detach()
    eps = torch.finfo(estimate.dtype).eps
    window = (30.0 + slack) + (256.0 * eps) * diag_quad.detach()
    near = estimate >= estimate.amax(-1, keepdim=True) - window  # [n, K]
    near &= cancelled.detach() * eps > CANCELLATION_TOLERANCE
    comps, rows = near.T.nonzero(as_tuple=True)  # sorted by component
    return rows, comps


def refine_woodbury_near_top(
    log_joint: Tensor, log_scale: Tensor, xc: Tensor, means: Tensor, inv_noise: Tensor,
    factors: Tensor, capacitance_chol: Tensor, whitened_residual: Tensor, diag_quad: Tensor,
    slack: float = 0.0,
) -> Tensor:
    """``log_joint`` [n, K] with the entries of :func:`near_top_pairs` recomputed from
    :func:`residual_mahalanobis` as ``log_scale − ½ (x−μ)ᵀ Σ⁻¹ (x−μ)``. Differentiable.

    Args:
        log_joint: the Woodbury estimate ``[n, K]``; log_scale: ``log w + log_norm`` ``[K]``;
        xc: centred rows ``[n, D]``; means: centred means ``[K, D]``; inv_noise: ``[K, D]``;
        factors: ``A`` ``[K, D, L]``; capacitance_chol: ``C`` ``[K, L, L]``;
        whitened_residual: ``w = C⁻¹AᵀD⁻¹(x−μ)`` ``[n, K, L]``; diag_quad: ``[n, K]``;
        slack: nats.
    """
    # ‖w‖² = diag_quad − (x−μ)ᵀΣ⁻¹(x−μ), the latter read back from the estimate; 0 for a
    # component of weight 0 (its NaN, −inf − −inf, poisoned every row's window)
    cancelled = diag_quad.detach() - 2.0 * (log_scale.detach() - log_joint.detach())
    cancelled = cancelled.nan_to_num(0.0)
    rows, comps = near_top_pairs(log_joint, diag_quad, cancelled, slack)
    # Where C is ill-conditioned in this dtype, m = C⁻ᵀw errs along M's small directions
    # by more than the Woodbury form loses (δᵀMδ), and log|C| errs too: every entry of
    # those components is recomputed in float64 instead.
    diag_c = capacitance_chol.detach().diagonal(dim1=-2, dim2=-1)  # [K, L]
    spread = (diag_c.amax(-1) / diag_c.amin(-1)) ** 2  # ≤ cond(M)
    sound = spread * torch.finfo(xc.dtype).eps < CONDITION_TOLERANCE  # [K]
    keep = sound[comps]
    rows, comps = rows[keep], comps[keep]
    if not bool(sound.all()):
        log_joint = _ill_conditioned_in_float64(log_joint, log_scale, xc, means, inv_noise,
                                                factors, capacitance_chol, ~sound)
    if rows.numel() == 0:
        return log_joint
    # m = C⁻ᵀ w, as rows: wᵀ C⁻¹ (C⁻¹ of the K small factors, gathered per pair).
    eye = torch.eye(capacitance_chol.shape[-1], dtype=xc.dtype, device=xc.device)
    inverse = torch.linalg.solve_triangular(capacitance_chol, eye, upper=False)  # [K, L, L]
    posterior = torch.einsum("pl,plm->pm", whitened_residual[rows, comps], inverse[comps])
    maha = residual_mahalanobis(xc.index_select(0, rows), comps, means, factors, inv_noise,
                                posterior)
    exact = log_scale.index_select(0, comps) - 0.5 * maha
    return log_joint.index_put((rows, comps), exact.to(log_joint.dtype))


def _ill_conditioned_in_float64(
    log_joint: Tensor, log_scale: Tensor, xc: Tensor, means: Tensor, inv_noise: Tensor,
    factors: Tensor, capacitance_chol: Tensor, ill: Tensor,
) -> Tensor:
    """``log_joint`` [n, K] with every entry of the ``ill`` components ``[K]`` (bool)
    recomputed in float64: the Woodbury form with ``C`` and ``B`` (and so the log-determinant)
    derived in float64, in a few dense products over all rows (``O(n·K'·D·L)`` for ``K'``
    such components). Differentiable. A residual form of their near-top entries alone, one
    gathered pair at a time, took 15 s against 0.3 s for the E-step of the same model (the
    embedded digits, 4,000 rows, K = 200 with 48 such components)."""
    which = ill.nonzero().squeeze(-1)  # [K']
    f64, inv64, mu64 = factors[which].double(), inv_noise[which].double(), means[which].double()
    chol64, whitened64 = whitening(f64, inv64.reciprocal())  # [K', L, L], [K', L, D]
    # log_scale holds −log|C| of the dtype's C: swap it for float64's.
    log_det = lambda c: c.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # noqa: E731
    scale64 = (log_scale[which].double() + log_det(capacitance_chol[which].double())
               - log_det(chol64))  # [K']
    xc64 = xc.double()
    k, n_lat, d = whitened64.shape
    proj = (xc64 @ whitened64.reshape(k * n_lat, d).T).view(-1, k, n_lat)  # [n, K', L]
    proj = proj - (whitened64 @ mu64.unsqueeze(-1)).squeeze(-1)
    maha = woodbury_mahalanobis(diagonal_quadratic(xc64, mu64, inv64, False), proj)
    exact = scale64 - 0.5 * maha.clamp_min(0.0)  # [n, K']
    return log_joint.index_copy(1, which, exact.to(log_joint.dtype))


def needs_float64_quadratic(centred_means: Tensor, inv_noise: Tensor) -> bool:
    """Whether ``Σ_j (x_j − μ_kj)²/d_kj``, expanded around the reference point, would lose
    more than :data:`QUADRATIC_TOLERANCE` nats to rounding in the parameters' dtype.

    The expansion subtracts terms of size ``κ = max_k Σ_j (μ_kj − c_j)²/d_kj``, so its
    rounding error is about ``ε·κ``: negligible for images in ``[0, 1]``, but hundreds of nats
    in float32 for components far apart relative to their noise.

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
