"""Initialisation: K-means (:mod:`mfa.kmeans`), random samples, and the complete-data
maximum-likelihood fit that turns cluster labels into an MFA.

Everything runs on the data's device and every random choice takes a seed or a
``torch.Generator``.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import Tensor

from mfa import cluster_fit
from mfa._validation import check_generator, check_positive_int, check_tensor
from mfa.kmeans import (  # noqa: F401  (K-means names re-exported from their former home)
    KMeansResult,
    _check_rows,
    _generator,
    kmeans,
    kmeans_plus_plus,
    nearest_center,
    squared_distances,
)
from mfa.missing import impute_column_means
from mfa.model import MixtureOfFactorAnalyzers

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- complete data

#: Responsibility mass (in rows) below which a component's mass is raised to this value when
#: its weight is computed: a component with no rows keeps a tiny weight rather than
#: ``log 0 = −inf``, which would leave it dead for gradient training (and NaN under weight
#: decay).
MIN_WEIGHT_MASS = 1e-3


def floored_weights(mass: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Mixture weights ``w_k ∝ max(mass_k, MIN_WEIGHT_MASS)``, ``mass`` ``[K]`` (rows or
    responsibility sums) → ``[K]``, every weight positive.

    ``dtype`` (default ``mass.dtype``): the weights are cast to it, then renormalised.
    """
    weights = mass.clamp_min(MIN_WEIGHT_MASS)
    weights = weights / weights.sum()
    if dtype is not None and dtype != weights.dtype:
        weights = weights.to(dtype)
        weights = weights / weights.sum()
    return weights



def _floor(variance_floor: float, min_noise: float) -> float:
    """The noise variances' lower bound: ``variance_floor``, raised just above ``min_noise``
    (every noise variance of the model lies above it). A negative or non-finite floor is
    refused (NaN failed later in a Cholesky factorisation, a negative one passed silently)."""
    floor = float(variance_floor)
    if not math.isfinite(floor) or floor < 0:
        raise ValueError(f"variance_floor must be a finite number >= 0, got {variance_floor!r}")
    return max(floor, min_noise * (1 + 1e-6) + 1e-30)

def fit_complete(
    x: Tensor,
    labels: Tensor,
    n_components: int,
    n_factors: int,
    noise: str = "diagonal",
    *,
    n_iter: int = 5,
    variance_floor: float = 1e-6,
    min_noise: float = 0.0,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
) -> MixtureOfFactorAnalyzers:
    """Maximum likelihood when the component of every row is known.

    Weights are the label frequencies and means the cluster means. Each cluster's covariance
    is fitted in closed form as probabilistic PCA (Tipping & Bishop, 1999) from the SVD of the
    centred cluster: ``σ² = mean of the discarded eigenvalues``, ``A = U_L (Λ_L − σ²)^½``
    (the leading singular pairs from a seeded randomised SVD when the cluster is large, see
    :func:`mfa.cluster_fit.top_singular`). With ``noise="diagonal"`` this starts ``n_iter``
    factor-analysis EM iterations (one-hot responsibilities, so each cluster is fitted on its
    own rows only, at ``O(n_k·D·L)`` each), which never lower the complete-data likelihood.
    Per-cluster arithmetic runs in float64, the large clusters batched in groups of bounded
    memory (:mod:`mfa.cluster_fit`).

    Args:
        x: ``[N, D]``; labels: ``[N]`` int64 in ``[0, n_components)``.
        n_components, n_factors, noise: the model to build.
        n_iter: factor-analysis iterations (diagonal noise only).
        variance_floor: lower bound of the noise variances (finite, ``>= 0``; raised just
            above ``min_noise`` when below it).
        min_noise: the built model's ``min_noise``.
        batch_size: unused (kept for callers of the earlier streamed version).
        generator: the randomised SVD's randomness (default: seed 0, so the fit is
            deterministic either way).

    Clusters of at most ``L + 1`` rows (fewer than two when ``L = 0``) or of identical rows,
    whose centred rows leave no variance beside the top ``L``, get the pooled per-feature
    variance and zero loadings (their own fit would collapse to the floor).
    """
    x = _check_rows(x)
    n_components = check_positive_int(n_components, "n_components")  # (2.0: a bincount error)
    n_factors = check_positive_int(n_factors, "n_factors", minimum=0)
    n_iter = check_positive_int(n_iter, "n_iter", minimum=0)  # (-1 was taken)
    labels = check_tensor(labels, "labels")
    if labels.shape != (x.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be an int64 tensor of shape [{x.shape[0]}], got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= n_components:
        raise ValueError(
            f"labels must lie in [0, {n_components}), got range [{int(labels.min())}, "
            f"{int(labels.max())}]"
        )
    floor = _floor(variance_floor, min_noise)
    labels = labels.long()
    n, d = x.shape
    k, lat = n_components, n_factors
    dtype = x.dtype
    counts = torch.bincount(labels, minlength=k).to(dtype)
    weights = floored_weights(counts)
    means = torch.zeros(k, d, dtype=dtype, device=x.device)
    loadings = torch.zeros(k, d, lat, dtype=dtype, device=x.device)
    noise_var = torch.empty(k, d, dtype=dtype, device=x.device)
    # Σ over the clusters' rows of (x − their mean)², for the pooled variance (x.var over all
    # rows cost another pass over [N, D]: 55 ms of a 0.85 s initialisation on a 2-core CPU).
    within = torch.zeros(d, dtype=torch.float64, device=x.device)
    unfit = []  # clusters too small (or flat) to fit: they get the pooled variance
    order = torch.argsort(labels)
    sizes = torch.bincount(labels, minlength=k).tolist()
    starts = [0] + list(itertools.accumulate(sizes))[:-1]
    gen = _generator(0, generator, x.device)
    fa_iter = n_iter if noise == "diagonal" and lat else 0
    # A cluster of at most max(EXACT_SVD_LIMIT, 2q) rows or features is factorised alone by
    # a full SVD; the larger ones in groups, by the randomised SVD (mfa.cluster_fit).
    exact_limit = max(EXACT_SVD_LIMIT, 2 * (lat + 10))
    large = [c for c in range(k) if min(sizes[c], d) > exact_limit]
    groups = [([c], True) for c in range(k) if 0 < sizes[c] and min(sizes[c], d) <= exact_limit]
    budget = cluster_fit.group_budget(x.device)
    for group in cluster_fit.group_clusters([sizes[c] for c in large], d, budget):
        groups.append(([large[i] for i in group], False))
    empty = [c for c in range(k) if not sizes[c]]
    if empty:  # at the data's mean, with the pooled variance below
        means[empty] = x.mean(0)
        unfit += empty
    for members, exact in groups:  # (exact: one cluster, a full SVD)
        rows, real = cluster_fit.padded_rows(x, order, starts, sizes, members)  # [G, n, D]
        n_c = counts[members]  # [G]
        group_means = rows.sum(1) / n_c.unsqueeze(-1)  # [G, D]
        means[members] = group_means
        # Each cluster's fit in float64 (the rows of one group are few), padding kept at 0;
        # no [G, n, D] temporary beside the rows and their float64 copy (mfa.cluster_fit).
        centred = rows.double().sub_(group_means.double().unsqueeze(1))
        del rows
        if real is not None:
            centred.masked_fill_(~real.unsqueeze(-1), 0.0)
        n64 = n_c.double().unsqueeze(-1)  # [G, 1]
        total_var = torch.linalg.vector_norm(centred, dim=1).square_() / n64  # [G, D]
        within += (total_var * n64).sum(0)
        # rank(centred) <= n_c - 1: with n_c <= L + 1 rows (or identical rows) no variance
        # is left beside the top L and the fit below is a component collapsed to the floor
        # (log p +23 a row against -8), which EM kept and the restarts' ranking preferred.
        fit = (n_c >= 2 + lat) & (total_var.sum(-1) > 0)  # [G]
        unfit += [c for c, ok in zip(members, fit.tolist(), strict=True) if not ok]
        if not bool(fit.any()):
            continue
        if not bool(fit.all()):
            members = [c for c, ok in zip(members, fit.tolist(), strict=True) if ok]
            centred, total_var, n_c = centred[fit], total_var[fit], n_c[fit]
        fitted = _ppca_fa(centred, n_c, total_var, lat, noise, fa_iter, floor, gen,
                          exact=exact)
        loadings[members] = fitted[0].to(dtype)
        noise_var[members] = fitted[1].to(dtype)
    if unfit:  # the pooled per-feature variance: within the clusters plus between them
        m64, n_c = means.double(), counts.double().unsqueeze(-1)  # [K, D], [K, 1]
        spread = m64 - (n_c * m64).sum(0) / n
        pooled_var = ((within + (n_c * spread * spread).sum(0)) / n).clamp_min(floor)
        noise_var[unfit] = pooled_var.to(dtype)
    if noise == "isotropic":
        noise_var = noise_var.mean(-1, keepdim=True).expand(k, d)
    return MixtureOfFactorAnalyzers.from_parameters(
        weights, means, loadings, noise_var.contiguous(), noise=noise, min_noise=min_noise
    )


#: A cluster whose centred rows have at most this many rows or features is factorised by a
#: full SVD; larger ones by a randomised range finder (Halko, Martinsson & Tropp, 2011), in
#: groups (:func:`mfa.cluster_fit.top_singular`).
EXACT_SVD_LIMIT = 64


def _ppca_fa(
    centred: Tensor, counts: Tensor, total_var: Tensor, lat: int, noise: str, fa_iter: int,
    floor: float, gen: torch.Generator, *, exact: bool,
) -> tuple[Tensor, Tensor]:
    """Loadings ``[G, D, L]`` and noise variances ``[G, D]`` (float64) of ``G`` clusters from
    their zero-padded centred rows ``centred`` ``[G, n, D]`` (``counts`` ``[G]`` real rows,
    ``total_var`` ``[G, D]`` their mean squares, every cluster with variance to fit):
    probabilistic PCA in closed form, then ``fa_iter`` factor-analysis iterations
    (``noise="diagonal"``); isotropic noise is σ² on every feature."""
    g, _, d = centred.shape
    if not lat:
        if noise == "isotropic":
            total_var = total_var.mean(-1, keepdim=True).expand(g, d)
        return centred.new_zeros(g, d, 0), total_var.clamp_min(floor)
    s, vh = cluster_fit.top_singular(centred, lat, gen, exact)  # [G, q], [G, q, D]
    top = (s * s / counts.double().unsqueeze(-1))[:, :lat]  # the clusters' top eigenvalues
    if lat < d:
        sigma2 = ((total_var.sum(-1) - top.sum(-1)) / (d - lat)).clamp_min(floor)  # [G]
    else:
        # No variance is left beside the top L = D: half the smallest eigenvalue goes to
        # the noise, so A Aᵀ + σ²I is still the cluster's covariance. At the floor, with A
        # of full rank, E[z] reproduced x exactly and EM's regression returned the same A
        # and μ: it stopped after 2 iterations, "converged", at the initial fit.
        sigma2 = (top[:, -1] / 2).clamp_min(floor)
    n_top = top.shape[-1]
    scale = (top - sigma2.unsqueeze(-1)).clamp_min(0.0).sqrt()  # [G, n_top]
    loadings = centred.new_zeros(g, d, lat)
    loadings[:, :, :n_top] = vh[:, :n_top].mT * scale.unsqueeze(1)
    if noise == "isotropic":
        return loadings, sigma2.unsqueeze(-1).expand(g, d)
    fa_noise = (total_var - (loadings**2).sum(-1)).clamp_min(floor)
    return cluster_fit.factor_analysis(  # (L = D: any noise fits exactly)
        centred, counts, total_var, loadings, fa_noise, fa_iter if lat < d else 0, floor)


def random_init(
    x: Tensor,
    n_components: int,
    n_factors: int,
    noise: str = "diagonal",
    *,
    generator: torch.Generator,
    variance_floor: float = 1e-6,
    min_noise: float = 0.0,
) -> MixtureOfFactorAnalyzers:
    """Means at ``K`` distinct random rows, uniform weights, the pooled per-feature variance
    as noise, and small random loadings (a tenth of the data scale)."""
    x = _check_rows(x)
    # (0 divided by zero, 2.0 failed a slice, -1 and 1.0 in torch.randn)
    n_components = check_positive_int(n_components, "n_components")
    n_factors = check_positive_int(n_factors, "n_factors", minimum=0)
    check_generator(generator, optional=False)  # (None drew from torch's global generator)
    n, d = x.shape
    if n < n_components:
        raise ValueError(f"random initialisation needs >= {n_components} rows, got {n}")
    idx = torch.randperm(n, generator=generator, device=x.device)[:n_components]
    floor = _floor(variance_floor, min_noise)
    var = x.var(dim=0, unbiased=False).clamp_min(floor)
    scale = 0.1 * var.mean().sqrt() / max(1, n_factors) ** 0.5
    loadings = scale * torch.randn(
        n_components, d, n_factors, generator=generator, dtype=x.dtype, device=x.device
    )
    noise_var = var.expand(n_components, d)
    if noise == "isotropic":
        noise_var = noise_var.mean(-1, keepdim=True).expand(n_components, d)
    weights = torch.full((n_components,), 1.0 / n_components, dtype=x.dtype, device=x.device)
    return MixtureOfFactorAnalyzers.from_parameters(
        weights, x[idx].clone(), loadings, noise_var.contiguous(), noise=noise,
        min_noise=min_noise,
    )


# ---------------------------------------------------------------------------- trainers' entry

#: Rows per component that K-means runs on (a seeded subsample of the initialisation rows).
KMEANS_ROWS_PER_COMPONENT = 200
#: Rows per component of the K-means++ seeding (a seeded subsample of the K-means rows): its
#: K sequential steps each read every row they are given.
SEED_ROWS_PER_COMPONENT = 20
#: Rows per component of the complete-data fit (PPCA and factor analysis per cluster).
FIT_ROWS_PER_COMPONENT = 400


def initialise(
    model: MixtureOfFactorAnalyzers,
    rows: Tensor,
    method: str,
    *,
    seed: int,
    variance_floor: float,
    kmeans_iter: int = 20,
    complete_iter: int = 5,
) -> None:
    """Set ``model``'s parameters from ``rows`` ``[n, D]``: K-means then the complete-data
    fit (``method="kmeans"``), or random rows (``"random"``); ``"none"`` leaves it unchanged.

    The initialisation of both trainers (:mod:`mfa.em`, :mod:`mfa.sgd`); ``seed`` seeds it.
    With ``"kmeans"``, K-means runs on a seeded subsample of
    ``KMEANS_ROWS_PER_COMPONENT·K`` rows and the complete-data fit on
    ``FIT_ROWS_PER_COMPONENT·K`` (a superset, labelled by the nearest centre), its
    K-means++ seeding on ``SEED_ROWS_PER_COMPONENT·K`` of them: under two EM iterations'
    time on 50,000 × 784 rows with K = 50 (docs/benchmarks.md), and an initial model as good
    as K-means on every row with exact SVDs (train bits/dim before any EM on the embedded
    digits, K = 10, L = 4, mean of seeds 0–7: 4.953 against 4.965; 5.131 from random labels;
    tests/test_init.py).
    Rows with NaN (a trainer with ``missing="allow"``) are first filled with their columns'
    observed means; EM on the observed entries then corrects the imputed start.
    """
    if method == "none":
        return
    k, lat = model.n_components, model.n_factors
    rows = check_tensor(rows, "rows")  # (named here: it failed in the M-step's parameters)
    if rows.dim() != 2 or rows.shape[1] != model.n_features or rows.dtype != model.dtype:
        raise ValueError(f"rows must be a {model.dtype} tensor [n, {model.n_features}] (the "
                         f"model's), got {rows.dtype} {tuple(rows.shape)}")
    if method in ("kmeans", "random") and rows.shape[0] < k:
        raise ValueError(
            f"the {method} initialisation of K={k} components needs at least {k} rows, got "
            f"{rows.shape[0]}: the trainer's training rows (after any validation hold-out, "
            "val_fraction) or its init_samples, whichever is fewer; use fewer components, "
            "more rows or a larger init_samples"
        )
    rows = impute_column_means(rows)
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    if method == "kmeans":
        # Seeded subsamples sized from K: K-means on KMEANS_ROWS_PER_COMPONENT·K rows, the
        # complete-data fit on FIT_ROWS_PER_COMPONENT·K (a superset), labelled by the centres.
        n = rows.shape[0]
        order = torch.randperm(n, generator=gen, device=rows.device)
        n_fit = min(n, max(k, FIT_ROWS_PER_COMPONENT * k))
        n_kmeans = min(n_fit, max(k, KMEANS_ROWS_PER_COMPONENT * k))
        # Both random subsets of the rows (the K-means rows the first of the fit rows): rows
        # in file order (sorted by class, say) would otherwise leave K-means some classes only.
        fit_rows = rows[order[:n_fit]] if n_fit < n else rows
        km_rows = (fit_rows[:n_kmeans] if n_fit < n  # (a view: the same rows, no copy)
                   else rows[order[:n_kmeans]] if n_kmeans < n else rows)
        result = kmeans(km_rows, k, n_iter=kmeans_iter, generator=gen,
                        seed_rows=SEED_ROWS_PER_COMPONENT * k)
        # The K-means rows keep their last labels (their nearest final centres); only the
        # other fit rows are labelled here (every fit row used to be labelled again).
        labels = result.labels
        if n_kmeans < n_fit and n_fit < n:  # the K-means rows are fit_rows[:n_kmeans]
            rest = nearest_center(fit_rows[n_kmeans:], result.centers)[0]
            labels = torch.cat([labels, rest])
        elif n_kmeans < n_fit:  # the fit takes every row in file order; K-means some of them
            labels = torch.empty(n, dtype=torch.long, device=rows.device)
            labels[order[:n_kmeans]] = result.labels
            labels[order[n_kmeans:]] = nearest_center(rows[order[n_kmeans:]], result.centers)[0]
        init = fit_complete(
            fit_rows, labels, k, lat, model.noise, n_iter=complete_iter,
            variance_floor=variance_floor, min_noise=model.min_noise, generator=gen,
        )
    elif method == "random":
        init = random_init(
            rows, k, lat, model.noise, generator=gen, variance_floor=variance_floor,
            min_noise=model.min_noise,
        )
    else:
        raise ValueError(f"unknown init method {method!r}")
    model.set_parameters(
        weights=init.weights.detach(),
        means=init.means.detach(),
        factor_loadings=init.factor_loadings.detach(),
        noise_variance=init.noise_variance.detach(),
    )


def split_heaviest(params: dict[str, Tensor], dead: list[int], gen: torch.Generator) -> None:
    """Re-seed the components ``dead`` of an M-step's ``params`` (``weights``, ``means``,
    ``factor_loadings``, ``noise_variance``; changed in place) by splitting the heaviest
    component into itself and each dead one: copy its parameters, shift the two means by
    ``± ½·σ_j·z_j`` per feature (``σ_j`` its noise standard deviation, ``z ~ N(0, I)`` drawn
    from ``gen``, a generator on any device: half a standard deviation per feature, so about
    ``√D`` of them apart along ``z``), and share its weight. Used by :class:`mfa.em.EMTrainer` with
    ``min_component_mass > 0`` and by :mod:`mfa.pruning`."""
    weights = params["weights"].clone()
    waiting = set(dead)  # not yet re-seeded: never the one split (it may be the heaviest)
    for k in dead:
        alive = weights.clone()
        if len(waiting) < alive.shape[0]:
            alive[list(waiting)] = -math.inf
        j = int(alive.argmax())
        waiting.discard(k)
        std = params["noise_variance"][j].sqrt()
        direction = torch.randn(std.shape, generator=gen, dtype=std.dtype,
                                device=gen.device).to(std.device)  # drawn where gen is
        params["means"][k] = params["means"][j] + 0.5 * std * direction
        params["means"][j] = params["means"][j] - 0.5 * std * direction
        params["factor_loadings"][k] = params["factor_loadings"][j]
        params["noise_variance"][k] = params["noise_variance"][j]
        weights[j] = weights[j] / 2
        weights[k] = weights[j]
    params["weights"] = weights / weights.sum()
