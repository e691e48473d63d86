"""The per-cluster fit behind :func:`mfa.init.fit_complete`, batched over clusters.

A group of ``G`` clusters is held as one zero-padded ``[G, n, D]`` tensor (``n`` its largest
cluster's rows; each cluster's rows first, zeros after them). Zero rows add nothing to the
products a cluster's fit is made of (``XᵀX``, ``Xᵀ(XB)``, the range finder's ``X(XᵀY)``), so
every cluster's result is the one its own rows give, while the group costs one batched
call where the clusters cost ``G`` small ones (each ~50 of them, two waiting on the device
for a number). On the CPU that gains little: the products of a few columns are bound by
memory, not calls (50 clusters of ~400 rows × 784 features: 0.28 s against 0.33 s one at a
time, 2-core Xeon); on CUDA each call is a kernel launch.

Shapes: ``G`` clusters, ``n`` padded rows, ``D`` features, ``L`` factors, ``q`` singular
pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Bound on ``G·n·D``, the elements of one group's padded rows, by device type: a group
#: never holds more than this beside a single cluster too large for it alone. A group's fit
#: peaks at about 12 bytes an element (its float64 copy beside the rows it is made from,
#: then beside the float32 range finder's): about 0.75 GiB at CUDA's 2²⁶. On the CPU small
#: groups win: fitting 50 clusters of 125–800 rows × 784 features took 0.28 s in groups of
#: 2²⁰ elements (19 groups), 0.29 s at 2²¹, 0.45 s at 2²² and 0.62 s at 2²³ (3 groups), where
#: every large temporary paid for fresh pages (2-core Xeon; one cluster at a time: 0.33 s).
#: With the temporaries since cut to the 12 bytes above, the same order in a slower hour:
#: 0.39–0.42 s at 2²⁰, 0.44–0.56 at 2²¹, 0.48–0.61 at 2²², 0.57–0.71 at 2²³ (a 12.5M-element
#: group's peak fell from 22 to 11.4 bytes an element). On CUDA a group is a few kernel
#: launches whatever its size (not yet measured).
GROUP_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}


def group_clusters(sizes: list[int], n_features: int, budget: int) -> list[list[int]]:
    """Indices into ``sizes`` (rows per cluster) packed into groups, largest clusters first,
    each group's ``G·max(n)·D`` within ``budget`` (a cluster over it alone: a group of one).
    Clusters of similar size share a group, so little of a group is padding."""
    order = sorted(range(len(sizes)), key=lambda c: -sizes[c])
    groups: list[list[int]] = []
    for c in order:
        if groups and (len(groups[-1]) + 1) * sizes[groups[-1][0]] * n_features <= budget:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


def group_budget(device: torch.device) -> int:
    """The :data:`GROUP_ELEMENTS` of ``device``'s type (another type: the CPU's)."""
    return GROUP_ELEMENTS.get(device.type, GROUP_ELEMENTS["cpu"])


def padded_rows(x: Tensor, order: Tensor, starts: list[int], sizes: list[int],
                members: list[int]) -> tuple[Tensor, Tensor | None]:
    """The rows of clusters ``members``, ``x[order[starts[c] : starts[c] + sizes[c]]]`` each
    (every size ``>= 1``), zero-padded to ``[G, n, D]``, and the mask ``[G, n]`` of real rows
    (``None`` when every cluster has ``n`` rows)."""
    size = torch.tensor([sizes[c] for c in members], device=x.device)  # [G]
    start = torch.tensor([starts[c] for c in members], device=x.device)
    step = torch.arange(max(sizes[c] for c in members), device=x.device)  # [n]
    # padding rows repeat each cluster's last row, then are zeroed
    index = start.unsqueeze(-1) + torch.minimum(step, size.unsqueeze(-1) - 1)  # [G, n]
    rows = x[order[index]]  # [G, n, D]
    if min(sizes[c] for c in members) == step.shape[0]:
        return rows, None
    real = step < size.unsqueeze(-1)  # [G, n]
    return rows.masked_fill_(~real.unsqueeze(-1), 0.0), real


def top_singular(centred: Tensor, n_top: int, gen: torch.Generator,
                 exact: bool) -> tuple[Tensor, Tensor]:
    """The leading singular values ``[G, q]`` and right singular vectors ``[G, q, D]``
    (``q ≥ n_top``) of each cluster's zero-padded centred rows ``centred`` ``[G, n, D]``.

    ``exact``: a full SVD. Otherwise a seeded randomised SVD (Halko, Martinsson & Tropp,
    2011) with ``n_top + 10`` columns and two power iterations, ``O(n·D·(n_top + 10))`` a
    cluster instead of ``O(n·D·min(n, D))``. Its range finder runs in float32 (its basis only
    has to span the leading directions) on each cluster scaled by a power of two to a largest
    entry in ``[0.5, 1)`` (exact, and the basis does not change with scale: float64 rows
    beyond ~1e17 overflowed float32's products, rows below ~1e-17 underflowed them); the
    singular pairs come from the projection of ``centred`` onto its basis, in ``centred``'s
    dtype. On a flat spectrum σ² came within 0.3–1.4 % and ``AAᵀ`` 7–76 % of the dense
    result, for a complete-data log-likelihood 0.16 nats a row lower (0.02 after the
    factor-analysis passes that follow). Padding rows stay zero in every product and so in
    the orthonormal bases (Householder reflections leave zero rows zero).
    """
    if exact:
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        return s, vh
    g, _, d = centred.shape
    q = n_top + 10
    top = torch.linalg.vector_norm(centred, ord=math.inf, dim=(-2, -1))  # [G], max |entry|
    shift = torch.frexp(top)[1].clamp(-1000, 1000)  # (frexp(0) = (0, 0): no shift)
    scale = torch.ldexp(torch.ones_like(top), -shift)  # 2^-shift, exact
    low = torch.empty(centred.shape, dtype=torch.float32, device=centred.device)  # [G, n, D]
    for c in range(g):  # (into float32 through a float64 temporary of one cluster at a time)
        torch.mul(centred[c], scale[c], out=low[c])
    omega = torch.randn(g, d, q, generator=gen, dtype=torch.float32, device=centred.device)
    y = low @ omega  # [G, n, q]
    for _ in range(2):
        y = torch.linalg.qr(y).Q
        y = low @ (low.mT @ y)
    # orthonormal in centred's dtype (a float32 basis cast up is not: the eigenvalues moved
    # by 1e-7 relative, σ² — what they leave of the total variance — by 3e-5)
    basis = torch.linalg.qr(y.to(centred.dtype)).Q  # [G, n, q]
    _, s, vh = torch.linalg.svd(basis.mT @ centred, full_matrices=False)  # [G, q, D]
    return s, vh


def factor_analysis(
    centred: Tensor, counts: Tensor, total_var: Tensor, loadings: Tensor, noise: Tensor,
    n_iter: int, floor: float,
) -> tuple[Tensor, Tensor]:
    """``n_iter`` factor-analysis EM iterations (Rubin & Thayer, 1982) on each cluster's
    zero-padded rows centred at their mean, ``centred`` ``[G, n, D]`` (``counts`` ``[G]``
    their real rows, ``total_var`` ``[G, D]`` their mean squares), from ``loadings``
    ``[G, D, L]`` and ``noise`` ``[G, D]``: the update of :func:`mfa.m_step.m_step` with
    one-hot responsibilities, on each cluster's rows only (``O(n·D·L)`` each). The means stay
    the cluster means (the rows' ``E[z]`` sum to zero). Returns the new pair."""
    lat = loadings.shape[-1]
    eye = torch.eye(lat, dtype=centred.dtype, device=centred.device)
    n = counts.to(centred.dtype)[:, None, None]  # [G, 1, 1]
    for _ in range(n_iter):
        scaled = loadings / noise.unsqueeze(-1)  # D⁻¹A  [G, D, L]
        chol = torch.linalg.cholesky(eye + loadings.mT @ scaled)  # M = C Cᵀ
        beta = torch.cholesky_solve(scaled.mT, chol).mT  # D⁻¹ A M⁻¹  [G, D, L]
        ez = centred @ beta  # E[z] of every row (0 on padding)  [G, n, L]
        sum_xz = centred.mT @ ez / n  # [G, D, L]
        sum_zz = ez.mT @ ez / n + torch.cholesky_inverse(chol)  # [G, L, L]
        ridge = 1e-10 * sum_zz.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-30)
        loadings = torch.cholesky_solve(
            sum_xz.mT, torch.linalg.cholesky(sum_zz + ridge[:, None, None] * eye)
        ).mT  # [G, D, L]
        noise = (total_var - (loadings * sum_xz).sum(-1)).clamp_min(floor)
    return loadings, noise
