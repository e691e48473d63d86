"""The ``"centred"`` E-steps' shares (:mod:`mfa.precision`): chosen (row, component) pairs —
each row's most responsible component, and in chunks where every other share is negligible,
every share that is not — summed about the component's own mean (in float64; in float32 for
``"centred32"``) and moved to the pass's reference point by exact algebra in float64."""

from __future__ import annotations

import torch
from torch import Tensor

from mfa import pair_kernel
from mfa._terms import ComponentTerms

#: Rows per slice of one component's pairs (the float64 copy stays small).
SLICE_ROWS = 1024

#: Values per chunk of the scattered form's ``[rows, L+1, D]`` products (256 MB of float64).
SCATTER_ELEMENTS = 2**25

#: One chunk's pairs: ``(component [P], row [P] (in the batch), r [P], p [L, P])``.
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]

#: The ``"centred"`` mode's sparse chunks (:func:`significant_pairs`): responsibilities below
#: this are left out, when their mass is below ``PAIR_TOLERANCE`` × each component's kept
#: mass; a chunk goes sparse while its pairs are at most ``n·(1 + K/PAIR_COST)`` (one float64
#: pair costs about what ``PAIR_COST`` components' float32 shares of a row cost in the
#: products).
PAIR_THRESHOLD = 1e-12
PAIR_TOLERANCE = 1e-9
PAIR_COST = 32.0


def significant_pairs(resp: Tensor, proj: Tensor, row_offset: int) -> Pairs | None:
    """The ``"centred"`` mode's sparse form of a chunk: every (component, row) pair with
    ``r ≥ PAIR_THRESHOLD``, as ``(component [P], row [P], r [P], p [L, P])`` — or ``None``
    when they are too many to beat the dense products (more than ``n·(1 + K/PAIR_COST)``)
    or when what they leave out is not negligible: a component whose left-out mass exceeds
    ``PAIR_TOLERANCE`` × its kept mass (plus ``ε₆₄·n``, below which the M-step keeps a
    component as massless anyway).

    ``resp`` [K, n], ``proj`` [K, L, n]."""
    k, n = resp.shape
    keep = resp >= PAIR_THRESHOLD  # [K, n]
    kept = torch.where(keep, resp, 0.0).sum(-1, dtype=torch.float64)  # [K]
    dropped = torch.where(keep, 0.0, resp).sum(-1, dtype=torch.float64)  # [K]
    count = keep.sum()
    too_many = count > n * (1.0 + k / PAIR_COST)
    lost = (dropped > PAIR_TOLERANCE * kept + torch.finfo(torch.float64).eps * n).any()
    if bool(too_many | lost):  # one synchronisation
        return None
    comp, row = keep.nonzero(as_tuple=True)  # component-major: sorted by component
    return comp, row + row_offset, resp[comp, row], proj[comp, :, row].T


def owner_sums(x: Tensor, terms: ComponentTerms, pairs: list[Pairs], dtype: torch.dtype,
               work_dtype: torch.dtype | None = None) -> list[Tensor]:
    """The ``"centred"`` modes' shares: for every component ``k``, the sums over its
    pairs (rows ``i`` with weights ``r_ik``), taken in ``dtype`` about ``μ_k`` and moved to
    the reference ``c`` by exact algebra (``δ = μ_k − c``)::

        Σ r (x−c) = Σ r y + δ Σ r,   Σ r (x−c)² = Σ r y² + 2δ ⊙ Σ r y + δ² Σ r,
        Σ r (x−c) pᵀ = Σ r y pᵀ + δ (Σ r p)ᵀ          (y = x − μ_k)

    ``2·P·D·(L+2)`` flops for ``P`` pairs: on the CPU in one compiled pass over the pairs'
    rows (:mod:`mfa.pair_kernel`) or one small product per component and slice (torch
    ops), on GPUs scattered (:func:`scattered_owner_sums`).
    ``y`` is the spread of the component's rows, not their distance from ``c``, so ``Σ r y²``
    keeps the variance however far ``μ_k`` lies from ``c``. The products run in
    ``work_dtype`` (default ``dtype``) and their sums are moved to ``c`` in ``dtype``:
    float32 products (the ``"centred32"`` mode) still lose a noise variance that the
    loadings' variance dwarfs (measured 5.8e-4 relative on the tests' high signal-to-noise
    case, against 6e-6 in float64), at about 60 % of the float64 products' time in torch ops
    (about the same time in the CPU's compiled kernel, :mod:`mfa.pair_kernel`); the pairs
    of components sharper than :data:`SHARP_LIMIT` allows are summed in ``dtype``.

    Args:
        x: the batch ``[n, D]``; terms: the pass's terms; pairs: the chunks'
            ``(component [P], row [P], r [P], p [L, P])``; dtype: of the sums;
            work_dtype: of the products (``None``: ``dtype``).

    Returns:
        The seven sums of :func:`mfa.statistics.accumulate_statistics`'s chunks (log-likelihood
        0), in ``dtype``.
    """
    owner = torch.cat([o[0] for o in pairs])  # [P]
    rows = torch.cat([o[1] for o in pairs])  # [P]
    own = torch.cat([o[2] for o in pairs]).to(dtype)  # [P]
    p_own = torch.cat([o[3] for o in pairs], dim=1).to(dtype)  # [L, P]
    work = dtype if work_dtype is None else work_dtype
    sums = scattered_owner_sums if x.device.type != "cpu" else _looped_owner_sums
    risky = _too_sharp_for(work, terms) if work != dtype else None
    if risky is None or not bool(risky.any()):
        return sums(x, terms, owner, own, p_own, dtype, rows, work)
    # The pairs of components too sharp for `work` in dtype, the rest in `work`.
    at_risk = risky.index_select(0, owner)  # [P]
    parts = [sums(x, terms, owner[keep], own[keep], p_own[:, keep], dtype, rows[keep], w)
             for keep, w in ((~at_risk, work), (at_risk, dtype))]
    return [a + b for a, b in zip(*parts, strict=True)]


#: ``ε·max_j |a_kj|²/d_kj`` (``ε`` of the products' dtype) above which a component's pairs
#: are summed in float64 even in ``"centred32"``: the noise update subtracts two sums of
#: size ``|a_j|² + d_j`` to get ``d_j``, and float32 products erred by about
#: ``100·ε·|a|²/d`` relative (1.2e-2 at ``ε·|a|²/d`` = 1e-4; at 1e-2, pixel-like rows with
#: noise 1e-6 under loadings of 0.3, the noise variances ran down to the floor in 20
#: iterations).
SHARP_LIMIT = 1e-5


def _too_sharp_for(work: torch.dtype, terms: ComponentTerms) -> Tensor | None:
    """``[K]`` bool: the components whose pair sums lose more than :data:`SHARP_LIMIT` in
    ``work`` (``None`` without factors)."""
    if terms.factors is None:
        return None
    explained = terms.factors.detach().square().sum(-1)  # [K, D]
    sharpness = (explained * terms.inv_noise.detach()).amax(-1)  # [K]
    return torch.finfo(work).eps * sharpness > SHARP_LIMIT


def _looped_owner_sums(x: Tensor, terms: ComponentTerms, owner: Tensor, own: Tensor,
                       p_own: Tensor, dtype: torch.dtype, rows: Tensor, work: torch.dtype
                       ) -> list[Tensor]:
    """:func:`owner_sums` on the CPU: the compiled kernel of :mod:`mfa.pair_kernel` where it
    is available, else one small product per component and slice of its pairs (arguments as
    :func:`scattered_owner_sums`)."""
    k, n_lat, d = terms.whitened.shape
    x = x.detach()  # (the buffers' out= takes no gradient)
    order = torch.argsort(owner, stable=True)
    rows = rows[order]
    counts = torch.bincount(owner, minlength=k).tolist()
    means, delta = _means_and_shift(terms, dtype, work)
    zeros = x.new_zeros((), dtype=dtype)
    # The [P]- and [L, P]-sized sums in a few vectorised ops; the loop keeps the [m, D] ones.
    rp, mass, sum_p, sum_pp = _weight_sums(owner, own, p_own, k, zeros)
    # [L+1, P]: r, r ⊙ p
    weights = torch.cat([own.unsqueeze(0), rp.T], 0)[:, order].to(work)
    # one compiled pass over the rows (mfa.pair_kernel; None: not available, torch ops)
    compiled = pair_kernel.pair_sums(x, rows, counts, weights.T, means) if (
        pair_kernel.available()) else None
    if compiled is not None:
        sums, sum_y2 = (t.to(dtype) for t in compiled)
        return _about_reference(delta, mass, sums[:, 0], sum_y2, sums[:, 1:], sum_p, sum_pp)
    sums = x.new_zeros((k, n_lat + 1, d), dtype=work)  # [Σ r y ; Σ r y pᵀ]
    sum_y2 = x.new_zeros((k, d), dtype=work)
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    # Every slice's rows in the same two buffers (a fresh [m, D] allocation per slice cost
    # ~5 % of this function: the memory is new to the process each time).
    longest = min(SLICE_ROWS, max(counts, default=0))
    picked = x.new_empty((longest, d)) if work != x.dtype else None
    spread = x.new_empty((longest, d), dtype=work)
    for j in range(k):
        # A component's rows in slices of SLICE_ROWS (the copy in `work` stays small).
        for start in range(bounds[j], bounds[j + 1], SLICE_ROWS):
            stop = min(start + SLICE_ROWS, bounds[j + 1])
            # y = x − μ_j in `work`: the spread of the rows about their component
            if picked is None:
                y = torch.index_select(x, 0, rows[start:stop], out=spread[:stop - start])
            else:
                y = spread[:stop - start].copy_(
                    torch.index_select(x, 0, rows[start:stop], out=picked[:stop - start]))
            y.sub_(means[j])  # [m, D]
            w = weights[:, start:stop]  # [L+1, m]
            sums[j].addmm_(w, y)
            sum_y2[j].addmv_(y.mul_(y).T, w[0])
    sums, sum_y2 = sums.to(dtype), sum_y2.to(dtype)
    sum_y, sum_yp = sums[:, 0], sums[:, 1:]
    return _about_reference(delta, mass, sum_y, sum_y2, sum_yp, sum_p, sum_pp)


def scattered_owner_sums(
    x: Tensor, terms: ComponentTerms, owner: Tensor, own: Tensor, p_own: Tensor,
    dtype: torch.dtype, rows: Tensor, work_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """:func:`owner_sums` without a loop over components, for GPUs: each row's weighted
    ``y = x − μ_owner`` products are added into its owner's sums with ``index_add_`` in
    chunks of rows (no ``.tolist()`` synchronisation, a few kernels per chunk instead of
    ``K``). The loop's one small product per component and batch is launch-bound on a GPU
    (an H200 took 4.2 s for a CelebA-shaped epoch against 0.84 s for the whole float64
    E-step); on a CPU the loop's products are faster than these elementwise ones. The same
    sums up to float64 rounding; on CUDA ``index_add_`` adds in no fixed order.

    Args: the pairs' component ``owner`` [P], weight ``own`` [P], ``p_own`` [L, P] and
    row ``rows`` [P] (indices into ``x``); the rest as :func:`owner_sums`.
    """
    k, n_lat, d = terms.whitened.shape
    n = owner.shape[0]
    work = dtype if work_dtype is None else work_dtype
    own, p_own = own.to(dtype), p_own.to(dtype)
    means, delta = _means_and_shift(terms, dtype, work)
    zeros = x.new_zeros((), dtype=dtype)
    rp, mass, sum_p, sum_pp = _weight_sums(owner, own, p_own, k, zeros)
    own_w, rp_w = own.to(work), rp.to(work)
    sum_y = x.new_zeros((k, d), dtype=work)
    sum_y2 = x.new_zeros((k, d), dtype=work)
    sum_yp = x.new_zeros((k, n_lat, d), dtype=work)
    step = max(1, SCATTER_ELEMENTS // ((n_lat + 1) * d))
    for start in range(0, n, step):
        span = slice(start, min(start + step, n))
        o = owner[span]
        y = x.index_select(0, rows[span]).to(work).sub_(means.index_select(0, o))
        ry = y * own_w[span].unsqueeze(-1)  # [m, D]
        sum_y.index_add_(0, o, ry)
        sum_y2.index_add_(0, o, ry.mul_(y))
        sum_yp.index_add_(0, o, rp_w[span].unsqueeze(-1) * y.unsqueeze(1))  # [m, L, D]
    sum_y, sum_y2, sum_yp = sum_y.to(dtype), sum_y2.to(dtype), sum_yp.to(dtype)
    return _about_reference(delta, mass, sum_y, sum_y2, sum_yp, sum_p, sum_pp)


def _about_reference(delta: Tensor, mass: Tensor, sum_y: Tensor, sum_y2: Tensor,
                     sum_yp: Tensor, sum_p: Tensor, sum_pp: Tensor) -> list[Tensor]:
    """The sums about each ``μ_k`` (``Σ r y`` [K, D], ``Σ r y²`` [K, D], ``Σ r y pᵀ``
    [K, L, D]) moved to the reference ``c`` by the exact algebra of :func:`owner_sums`
    (``δ = μ − c`` [K, D]): the seven sums of a chunk, log-likelihood 0."""
    sum_x = sum_y + delta * mass.unsqueeze(-1)
    sum_x2 = sum_y2 + 2.0 * delta * sum_y + delta * delta * mass.unsqueeze(-1)
    sum_xp = (sum_yp + sum_p.unsqueeze(-1) * delta.unsqueeze(1)).mT  # [K, D, L]
    return [mass, sum_x, sum_x2, sum_xp, sum_p, sum_pp, mass.new_zeros(())]


def _weight_sums(owner: Tensor, own: Tensor, p_own: Tensor, k: int, zeros: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``r ⊙ p`` [P, L] and the pairs' ``Σ r`` [K], ``Σ r p`` [K, L], ``Σ r p pᵀ`` [K, L, L]
    (``own`` [P], ``p_own`` [L, P] in ``zeros``' dtype)."""
    n_lat = p_own.shape[0]
    rp = (p_own * own).T  # [P, L]
    mass = zeros.new_zeros(k).index_add_(0, owner, own)
    sum_p = zeros.new_zeros(k, n_lat).index_add_(0, owner, rp)
    sum_pp = zeros.new_zeros(k, n_lat, n_lat).index_add_(
        0, owner, rp.unsqueeze(-1) * p_own.T.unsqueeze(1))
    return rp, mass, sum_p, sum_pp


def _means_and_shift(terms: ComponentTerms, dtype: torch.dtype, work: torch.dtype | None = None
                     ) -> tuple[Tensor, Tensor]:
    """``μ`` [K, D] in ``work`` (default ``dtype``) and ``δ = μ − c`` [K, D] in ``dtype``, of
    the same ``μ`` (``terms`` holds ``μ − c`` and ``c``)."""
    work = dtype if work is None else work
    means = terms.means.detach().to(work) + terms.reference.detach().to(work)  # [K, D]
    return means, means.to(dtype) - terms.reference.detach().to(dtype)
