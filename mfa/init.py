"""Initialisation: K-means (K-means++ seeding, Lloyd's algorithm), random samples, and the
complete-data maximum-likelihood fit that turns cluster labels into an MFA.

Everything runs on the data's device and every random choice takes a seed or a
``torch.Generator``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from mfa._validation import check_finite, check_positive_int, check_tensor
from mfa.missing import impute_column_means
from mfa.model import MixtureOfFactorAnalyzers

logger = logging.getLogger(__name__)

_DIST_CHUNK_ELEMENTS = 2**24


def _generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator:
    if generator is not None:
        return generator
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def _check_rows(x: object, name: str = "x") -> Tensor:
    x = check_tensor(x, name)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    check_finite(x, name)
    return x


# ---------------------------------------------------------------------------- K-means


@dataclass
class KMeansResult:
    """``centers`` [K, D], ``labels`` [N] (int64), ``inertia`` (sum of squared distances to
    the assigned centre), ``n_iter`` (Lloyd iterations run)."""

    centers: Tensor
    labels: Tensor
    inertia: float
    n_iter: int


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """``‖x − c‖²`` of every row and centre: ``x`` ``[n, D]``, ``centers`` ``[K, D]`` →
    ``[n, K]``, clamped at 0.

    Expanded as ``‖x‖² − 2 x·c + ‖c‖²`` (one matrix product), so no ``[n, K, D]`` tensor is
    formed; the expansion loses precision for rows far from the origin, so callers centre
    the data first (as :func:`kmeans` does).
    """
    c_norm = (centers * centers).sum(-1)  # [K]
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ centers.T) + c_norm  # [n, K]
    return d2.clamp_min(0.0)


def _distances_to(x: Tensor, x_norm: Tensor, centers: Tensor) -> Tensor:
    """:func:`squared_distances` with the rows' squared norms ``x_norm`` [N] given."""
    d2 = torch.addmm((centers * centers).sum(-1), x, centers.T, alpha=-2.0)  # [N, K]
    return d2.add_(x_norm.unsqueeze(-1)).clamp_min_(0.0)


def nearest_center(
    x: Tensor,
    centers: Tensor,
    chunk_elements: int = _DIST_CHUNK_ELEMENTS,
    *,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centre, chunked over rows.

    The one nearest-centre rule of the package: K-means, K-means++ and the NDB bins
    (:mod:`mfa.ndb`) all assign rows with it. Each chunk costs one ``[n, K]`` matrix product
    (:func:`squared_distances`).

    Args:
        x: ``[N, D]``; centers: ``[K, D]`` (same dtype and device).
        chunk_elements: bound on the elements of one chunk's ``[n, K]`` distance matrix.
        batch_size: rows per chunk; overrides ``chunk_elements`` when given.

    Returns:
        ``(labels [N] int64, squared_distance [N])``.
    """
    if batch_size is None:
        batch_size = max(1, chunk_elements // max(1, centers.shape[0] + x.shape[1]))
    labels, dists = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            best, idx = squared_distances(x[i : i + batch_size], centers).min(dim=-1)
            labels.append(idx)
            dists.append(best)
    if not labels:
        empty = x.new_zeros(0)
        return empty.long(), empty
    return torch.cat(labels), torch.cat(dists)


def _nearest(x: Tensor, x_norm: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`nearest_center` with the rows' squared norms ``x_norm`` [N] given."""
    size = max(1, _DIST_CHUNK_ELEMENTS // max(1, centers.shape[0] + x.shape[1]))
    labels, dists = [], []
    for i in range(0, x.shape[0], size):
        best, idx = _distances_to(x[i : i + size], x_norm[i : i + size], centers).min(-1)
        labels.append(idx)
        dists.append(best)
    return torch.cat(labels), torch.cat(dists)


def kmeans_plus_plus(
    x: Tensor, n_clusters: int, generator: torch.Generator, n_trials: int | None = None
) -> Tensor:
    """K-means++ seeding (Arthur & Vassilvitskii, 2007), greedy variant.

    The first centre is a uniformly drawn row; each next one is drawn with probability
    proportional to the squared distance to the nearest chosen centre, keeping the best of
    ``n_trials`` (default ``2 + ln K``) candidates by the resulting potential.

    Returns:
        ``[K, D]`` centres (rows of ``x``).
    """
    n = x.shape[0]
    if n_trials is None:
        n_trials = 2 + int(torch.log(torch.tensor(float(n_clusters))).item())
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    chosen = [first]
    x_norm = (x * x).sum(-1)  # [N], computed once for every distance below
    closest = _distances_to(x, x_norm, x[first])[:, 0]
    for _ in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:  # every row coincides with a centre: fall back to uniform draws
            probs = torch.ones_like(closest)
        else:
            probs = closest / total
        candidates = torch.multinomial(probs, n_trials, replacement=True, generator=generator)
        cand_d2 = _distances_to(x, x_norm, x[candidates])  # [N, T]
        potentials = torch.minimum(cand_d2, closest.unsqueeze(-1)).sum(0)  # [T]
        best = int(potentials.argmin())
        chosen.append(candidates[best : best + 1])
        closest = torch.minimum(closest, cand_d2[:, best])
    return x[torch.cat(chosen)]


def kmeans(
    x: Tensor,
    n_clusters: int,
    *,
    n_iter: int = 50,
    tol: float = 1e-4,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    init: str = "k-means++",
) -> KMeansResult:
    """Lloyd's algorithm from K-means++ (or uniformly drawn) seeds, on ``x``'s device.

    Args:
        x: ``[N, D]`` with ``N >= n_clusters``.
        n_clusters: ``K``.
        n_iter: maximum Lloyd iterations.
        tol: stop when the centres move by less than ``tol`` times the mean feature
            variance (squared Frobenius norm of the shift, as scikit-learn does).
        seed, generator: the seeding's randomness (``generator`` wins when given).
        init: ``"k-means++"`` or ``"random"`` (K distinct rows drawn uniformly).

    An empty cluster is re-seeded at the row farthest from its centre, so every one of the
    ``K`` centres is a mean of at least one row.
    """
    x = _check_rows(x)
    check_positive_int(n_clusters, "n_clusters")
    check_positive_int(n_iter, "n_iter", minimum=0)
    n = x.shape[0]
    if n < n_clusters:
        raise ValueError(f"kmeans needs at least n_clusters={n_clusters} rows, got {n}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    gen = _generator(seed, generator, x.device)
    # Distances are expanded as ‖x‖² − 2x·c + ‖c‖²: centre the data first so that float32
    # rows far from the origin keep their spread.
    offset = x.mean(0)
    x = x - offset
    if init == "k-means++":
        centers = kmeans_plus_plus(x, n_clusters, gen)
    else:
        centers = x[torch.randperm(n, generator=gen, device=x.device)[:n_clusters]]
    x_norm = (x * x).sum(-1)  # [N]
    threshold = tol * x.var(dim=0, unbiased=False).mean().item()
    labels, d2 = _nearest(x, x_norm, centers)
    it = 0
    while it < n_iter:
        it += 1
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)
        new = sums / counts.clamp_min(1.0).unsqueeze(-1)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = d2.argsort(descending=True)[: empty.numel()]
            new[empty] = x[far]
        shift = ((new - centers) ** 2).sum().item()
        centers = new
        labels, d2 = _nearest(x, x_norm, centers)
        if shift <= threshold:
            break
    return KMeansResult(centers + offset, labels, float(d2.sum()), it)


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
    :func:`_top_singular`). With ``noise="diagonal"`` this starts ``n_iter`` factor-analysis
    EM iterations (one-hot responsibilities, so each cluster is fitted on its own rows only,
    at ``O(n_k·D·L)`` each), which never lower the complete-data likelihood. Per-cluster
    arithmetic runs in float64.

    Args:
        x: ``[N, D]``; labels: ``[N]`` int64 in ``[0, n_components)``.
        n_components, n_factors, noise: the model to build.
        n_iter: factor-analysis iterations (diagonal noise only).
        variance_floor: lower bound of the noise variances (``> min_noise``).
        min_noise: the built model's ``min_noise``.
        batch_size: unused (kept for callers of the earlier streamed version).
        generator: the randomised SVD's randomness (default: seed 0, so the fit is
            deterministic either way).

    Clusters with fewer than two rows get the pooled per-feature variance and zero loadings.
    """
    x = _check_rows(x)
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
    floor = max(float(variance_floor), min_noise * (1 + 1e-6) + 1e-30)
    labels = labels.long()
    n, d = x.shape
    k, lat = n_components, n_factors
    dtype = x.dtype
    counts = torch.bincount(labels, minlength=k).to(dtype)
    weights = floored_weights(counts)
    pooled_var = x.var(dim=0, unbiased=False).clamp_min(floor)  # [D]
    means = torch.zeros(k, d, dtype=dtype, device=x.device)
    loadings = torch.zeros(k, d, lat, dtype=dtype, device=x.device)
    noise_var = pooled_var.expand(k, d).clone()
    order = torch.argsort(labels)
    bounds = torch.cumsum(torch.bincount(labels, minlength=k), 0).tolist()
    gen = _generator(0, generator, x.device)
    fa_iter = n_iter if noise == "diagonal" and lat else 0
    start = 0
    for c in range(k):
        rows = x[order[start : bounds[c]]]
        start = bounds[c]
        if rows.shape[0] == 0:
            means[c] = x.mean(0)
            continue
        means[c] = rows.mean(0)
        if rows.shape[0] < 2:
            continue
        # Each cluster's fit in float64 (the rows of one cluster are few).
        centred = (rows - means[c]).double()  # [n_c, D]
        total_var = (centred * centred).mean(0)  # [D]
        s, vh = _top_singular(centred, lat, gen)
        eig = s * s / rows.shape[0]  # the top eigenvalues of the cluster covariance
        top = eig[:lat]
        if lat < d:
            sigma2 = ((total_var.sum() - top.sum()) / (d - lat)).clamp_min(floor)
        else:
            sigma2 = torch.tensor(floor, dtype=torch.float64, device=x.device)
        n_top = top.shape[0]
        scale = (top - sigma2).clamp_min(0.0).sqrt()
        cluster_loadings = torch.zeros(d, lat, dtype=torch.float64, device=x.device)
        cluster_loadings[:, :n_top] = vh[:n_top].T * scale
        if noise == "isotropic":
            noise_var[c] = sigma2
            loadings[c] = cluster_loadings.to(dtype)
            continue
        if not lat:
            noise_var[c] = total_var.clamp_min(floor).to(dtype)
            continue
        fa_noise = (total_var - (cluster_loadings**2).sum(-1)).clamp_min(floor)
        cluster_loadings, fa_noise = _factor_analysis(
            centred, total_var, cluster_loadings, fa_noise, fa_iter, floor
        )
        loadings[c] = cluster_loadings.to(dtype)
        noise_var[c] = fa_noise.to(dtype)
    if noise == "isotropic":
        noise_var = noise_var.mean(-1, keepdim=True).expand(k, d)
    return MixtureOfFactorAnalyzers.from_parameters(
        weights, means, loadings, noise_var.contiguous(), noise=noise, min_noise=min_noise
    )


#: A cluster whose centred rows have at most this many rows or features is factorised by a
#: full SVD; larger ones by a randomised range finder (Halko, Martinsson & Tropp, 2011).
EXACT_SVD_LIMIT = 64


def _top_singular(centred: Tensor, n_top: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The leading singular values ``[q]`` and right singular vectors ``[q, D]`` (``q ≥
    n_top``) of ``centred`` ``[n, D]``: a full SVD when the matrix is small, else a seeded
    randomised SVD with ``n_top + 10`` columns and two power iterations, which costs
    ``O(n·D·(n_top + 10))`` instead of ``O(n·D·min(n, D))``."""
    n, d = centred.shape
    q = n_top + 10
    if min(n, d) <= max(EXACT_SVD_LIMIT, 2 * q):
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        return s, vh
    omega = torch.randn(d, q, generator=gen, dtype=torch.float32, device=centred.device)
    y = centred @ omega.to(centred.dtype)  # [n, q]
    for _ in range(2):
        y = torch.linalg.qr(y).Q
        y = centred @ (centred.T @ y)
    basis = torch.linalg.qr(y).Q  # [n, q]
    _, s, vh = torch.linalg.svd(basis.T @ centred, full_matrices=False)  # [q, D]
    return s, vh


def _factor_analysis(
    centred: Tensor, total_var: Tensor, loadings: Tensor, noise: Tensor, n_iter: int,
    floor: float,
) -> tuple[Tensor, Tensor]:
    """``n_iter`` factor-analysis EM iterations (Rubin & Thayer, 1982) on one cluster's rows
    centred at their mean, ``centred`` ``[n, D]`` (``total_var`` [D] their mean squares),
    from ``loadings`` [D, L] and ``noise`` [D]: the update of :func:`mfa.statistics.m_step`
    with one-hot responsibilities, on this cluster's rows only (``O(n·D·L)`` each). The mean
    stays the cluster mean (the rows' ``E[z]`` sum to zero). Returns the new pair."""
    n, lat = centred.shape[0], loadings.shape[1]
    eye = torch.eye(lat, dtype=centred.dtype, device=centred.device)
    for _ in range(n_iter):
        scaled = loadings / noise.unsqueeze(-1)  # D⁻¹A  [D, L]
        chol = torch.linalg.cholesky(eye + loadings.T @ scaled)  # M = C Cᵀ
        beta = torch.cholesky_solve(scaled.T, chol).T  # D⁻¹ A M⁻¹  [D, L]
        ez = centred @ beta  # E[z] of every row  [n, L]
        sum_xz = centred.T @ ez / n  # [D, L]
        sum_zz = ez.T @ ez / n + torch.cholesky_inverse(chol)  # [L, L]
        ridge = 1e-10 * sum_zz.diagonal().abs().max().clamp_min(1e-30)
        loadings = torch.cholesky_solve(
            sum_xz.T, torch.linalg.cholesky(sum_zz + ridge * eye)
        ).T  # [D, L]
        noise = (total_var - (loadings * sum_xz).sum(-1)).clamp_min(floor)
    return loadings, noise


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
    n, d = x.shape
    if n < n_components:
        raise ValueError(f"random initialisation needs >= {n_components} rows, got {n}")
    idx = torch.randperm(n, generator=generator, device=x.device)[:n_components]
    floor = max(float(variance_floor), min_noise * (1 + 1e-6) + 1e-30)
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
    ``FIT_ROWS_PER_COMPONENT·K`` (a superset, labelled by the nearest centre): one to two EM
    iterations' time on 50,000 × 784 rows with K = 50, and the same held-out bits/dim after
    20 iterations as K-means on every row (docs/benchmarks.md).
    Rows with NaN (a trainer with ``missing="allow"``) are first filled with their columns'
    observed means; EM on the observed entries then corrects the imputed start.
    """
    if method == "none":
        return
    rows = impute_column_means(rows)
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    k, lat = model.n_components, model.n_factors
    if method == "kmeans":
        # Seeded subsamples sized from K: K-means on KMEANS_ROWS_PER_COMPONENT·K rows, the
        # complete-data fit on FIT_ROWS_PER_COMPONENT·K (a superset), labelled by the centres.
        n = rows.shape[0]
        order = torch.randperm(n, generator=gen, device=rows.device)
        n_fit = min(n, max(k, FIT_ROWS_PER_COMPONENT * k))
        n_kmeans = min(n_fit, max(k, KMEANS_ROWS_PER_COMPONENT * k))
        fit_rows = rows[order[:n_fit]] if n_fit < n else rows
        km_rows = fit_rows[:n_kmeans] if n_kmeans < n_fit else fit_rows
        result = kmeans(km_rows, k, n_iter=kmeans_iter, generator=gen)
        if n_kmeans == n_fit:
            labels = result.labels
        else:  # centred first, as in kmeans: the distances are expanded
            offset = km_rows.mean(0)
            labels = nearest_center(fit_rows - offset, result.centers - offset)[0]
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
