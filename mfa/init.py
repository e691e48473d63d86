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
from mfa.statistics import accumulate_statistics, m_step

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
    _, closest = nearest_center(x, x[first])
    for _ in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:  # every row coincides with a centre: fall back to uniform draws
            probs = torch.ones_like(closest)
        else:
            probs = closest / total
        candidates = torch.multinomial(probs, n_trials, replacement=True, generator=generator)
        cand_d2 = squared_distances(x, x[candidates])  # [N, T]
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
    threshold = tol * x.var(dim=0, unbiased=False).mean().item()
    labels, d2 = nearest_center(x, centers)
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
        labels, d2 = nearest_center(x, centers)
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
) -> MixtureOfFactorAnalyzers:
    """Maximum likelihood when the component of every row is known.

    Weights are the label frequencies and means the cluster means. Each cluster's covariance
    is fitted in closed form as probabilistic PCA (Tipping & Bishop, 1999) from the SVD of the
    centred cluster: ``σ² = mean of the discarded eigenvalues``, ``A = U_L (Λ_L − σ²)^½``.
    With ``noise="diagonal"`` this starts ``n_iter`` factor-analysis EM iterations
    (one-hot responsibilities, so each cluster is fitted on its own rows only), which never
    lower the complete-data likelihood.

    Args:
        x: ``[N, D]``; labels: ``[N]`` int64 in ``[0, n_components)``.
        n_components, n_factors, noise: the model to build.
        n_iter: factor-analysis iterations (diagonal noise only).
        variance_floor: lower bound of the noise variances (``> min_noise``).
        min_noise: the built model's ``min_noise``.

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
    start = 0
    # One SVD per cluster: clusters differ in size, and this runs once per fit.
    for c in range(k):
        rows = x[order[start : bounds[c]]]
        start = bounds[c]
        if rows.shape[0] == 0:
            means[c] = x.mean(0)
            continue
        means[c] = rows.mean(0)
        if rows.shape[0] < 2:
            continue
        centred = rows - means[c]
        total_var = (centred * centred).mean(0)  # [D]
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        eig = s * s / rows.shape[0]  # eigenvalues of the cluster covariance
        top = eig[:lat]
        if lat < d:
            sigma2 = ((total_var.sum() - top.sum()) / (d - lat)).clamp_min(floor)
        else:
            sigma2 = torch.tensor(floor, dtype=dtype, device=x.device)
        n_top = top.shape[0]
        scale = (top - sigma2).clamp_min(0.0).sqrt()
        loadings[c, :, :n_top] = vh[:n_top].T * scale
        if noise == "isotropic":
            noise_var[c] = sigma2
        else:
            fa_noise = total_var - (loadings[c] ** 2).sum(-1)
            noise_var[c] = fa_noise.clamp_min(floor) if lat else total_var.clamp_min(floor)
    if noise == "isotropic":
        noise_var = noise_var.mean(-1, keepdim=True).expand(k, d)
    model = MixtureOfFactorAnalyzers.from_parameters(
        weights, means, loadings, noise_var.contiguous(), noise=noise, min_noise=min_noise
    )
    if noise == "diagonal" and lat and n_iter:
        resp_all = torch.nn.functional.one_hot(labels, k).to(dtype)
        for _ in range(n_iter):
            stats = None
            terms = model.component_terms()
            for i in range(0, n, batch_size):
                batch = accumulate_statistics(
                    model, x[i : i + batch_size], terms, resp=resp_all[i : i + batch_size]
                )
                stats = batch if stats is None else stats + batch
            params = m_step(stats, model, variance_floor=floor)
            # Keep the label frequencies and the labelled clusters' own estimates only.
            params["weights"] = weights
            empty = counts < 2
            params["means"][empty] = means[empty]
            params["factor_loadings"][empty] = loadings[empty]
            params["noise_variance"][empty] = noise_var[empty]
            model.set_parameters(**params)
    return model


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
    Rows with NaN (a trainer with ``missing="allow"``) are first filled with their columns'
    observed means; EM on the observed entries then corrects the imputed start.
    """
    if method == "none":
        return
    rows = impute_column_means(rows)
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    k, lat = model.n_components, model.n_factors
    if method == "kmeans":
        result = kmeans(rows, k, n_iter=kmeans_iter, generator=gen)
        init = fit_complete(
            rows, result.labels, k, lat, model.noise, n_iter=complete_iter,
            variance_floor=variance_floor, min_noise=model.min_noise,
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
