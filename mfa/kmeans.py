"""K-means: K-means++ seeding (Arthur & Vassilvitskii, 2007) and Lloyd's algorithm, with
expanded, chunked squared distances; the clustering behind :mod:`mfa.init` and the NDB bins
(:mod:`mfa.ndb`).

Everything runs on the data's device and every random choice takes a seed or a
``torch.Generator``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from mfa._validation import check_finite, check_generator, check_positive_int, check_tensor

#: Bound on the elements of one chunk's rows and distances, ``n·(K + D)``, by device type.
#: On the CPU 2²¹ (8 MB of float32) keeps a chunk in cache; 2²⁴ chunks (64 MB, 20,000 rows
#: of 784 features) each paid fresh pages for their temporaries: labelling 20,000 × 784 rows
#: by 50 centres took 56 ms against 20 ms (2-core Xeon). On CUDA, where a chunk is a few
#: kernel launches, it stays 2²⁴ (166 rows of CelebA's 12,288 features at K = 300 would be
#: 300 chunks for 50,000 rows).
_DIST_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**24}


def _chunk_rows(x: Tensor, centers: Tensor) -> int:
    """Rows of ``x`` ``[N, D]`` per chunk against ``centers`` ``[K, D]`` on their device."""
    bound = _DIST_CHUNK_ELEMENTS.get(x.device.type, _DIST_CHUNK_ELEMENTS["cpu"])
    return max(1, bound // max(1, centers.shape[0] + x.shape[1]))


def _squared_norms(x: Tensor) -> Tensor:
    """``‖x_i‖²`` of every row of ``x`` ``[n, D]`` → ``[n]``, without the ``[n, D]``
    temporary of ``(x * x).sum(-1)`` (3 ms against 22 ms on 20,000 × 784 float32 rows)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def _generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator:
    check_generator(generator)
    if generator is not None:
        return generator
    gen = torch.Generator(device=device)
    if not (seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool))):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")  # (1.9 ran as 1)
    if seed is not None and not -2**63 <= seed < 2**64:  # (torch: "Overflow when unpacking")
        raise ValueError(f"seed must lie in [-2**63, 2**64), the range of torch's generators, "
                         f"got {seed}")
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def _check_rows(x: object, name: str = "x") -> Tensor:
    x = check_tensor(x, name)
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1 and D >= 1, got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    check_finite(x, name)
    return x


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
    the data first (as :func:`kmeans` does). Centring removes a shared offset only: in
    float32, groups far apart beside the distances within them (±1e4 apart, sub-clusters 3
    apart) still round those distances away (54 of 360 rows labelled otherwise than in
    float64; scikit-learn's float32 K-means fails there too): pass float64 rows for such data.
    """
    c_norm = (centers * centers).sum(-1)  # [K]
    d2 = _squared_norms(x).unsqueeze(-1) - 2.0 * (x @ centers.T) + c_norm  # [n, K]
    return d2.clamp_min(0.0)


def _distances_to(x: Tensor, x_norm: Tensor, centers: Tensor) -> Tensor:
    """:func:`squared_distances` with the rows' squared norms ``x_norm`` [N] given."""
    d2 = torch.addmm((centers * centers).sum(-1), x, centers.T, alpha=-2.0)  # [N, K]
    return d2.add_(x_norm.unsqueeze(-1)).clamp_min_(0.0)


def nearest_center(
    x: Tensor,
    centers: Tensor,
    chunk_elements: int | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centre, chunked over rows.

    The one nearest-centre rule of the package: K-means, K-means++ and the NDB bins
    (:mod:`mfa.ndb`) all assign rows with it. Each chunk costs one ``[n, K]`` matrix product
    (:func:`squared_distances`), about the centres' mean: the expansion about a far origin
    cancels (float32 rows 1e4 from it put 282 of 400 rows in one of 4 NDB bins of ~100).

    Args:
        x: ``[N, D]``; centers: ``[K, D]`` (same dtype and device).
        chunk_elements: bound on the elements of one chunk's rows and distances,
            ``n·(K + D)`` (default: :data:`_DIST_CHUNK_ELEMENTS` of ``x``'s device).
        batch_size: rows per chunk; overrides ``chunk_elements`` when given.

    Returns:
        ``(labels [N] int64, squared_distance [N])``.
    """
    if batch_size is None:
        batch_size = (_chunk_rows(x, centers) if chunk_elements is None else
                      max(1, chunk_elements // max(1, centers.shape[0] + x.shape[1])))
    labels, dists = [], []
    with torch.no_grad():
        offset = centers.mean(0)
        centred = centers - offset
        for i in range(0, x.shape[0], batch_size):
            best, idx = squared_distances(x[i : i + batch_size] - offset, centred).min(dim=-1)
            labels.append(idx)
            dists.append(best)
    if not labels:
        empty = x.new_zeros(0)
        return empty.long(), empty
    return torch.cat(labels), torch.cat(dists)


def _nearest(x: Tensor, x_norm: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`nearest_center` with the rows' squared norms ``x_norm`` [N] given."""
    size = _chunk_rows(x, centers)
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
    ``n_trials`` (default ``2 + ln K``) candidates by the resulting potential. The distances
    are taken about the rows' mean (expanded about the origin, float32 rows 3·10⁴ from it
    lost the clusters' spread: seeds covered 4 blobs in 5 of 20 draws, against 20 of 20).

    Returns:
        ``[K, D]`` centres (rows of ``x``).
    """
    x = _check_rows(x)
    check_positive_int(n_clusters, "n_clusters")
    check_generator(generator, optional=False)  # (None drew from torch's global generator)
    if n_trials is not None:
        check_positive_int(n_trials, "n_trials")
    if x.shape[0] < n_clusters:  # (it returned repeated rows)
        raise ValueError(f"kmeans_plus_plus needs at least n_clusters={n_clusters} rows, got "
                         f"{x.shape[0]}")
    index = _seed_indices(x - x.mean(0), n_clusters, generator, n_trials)
    return x[index]


def _seed_indices(
    x: Tensor, n_clusters: int, generator: torch.Generator, n_trials: int | None = None
) -> Tensor:
    """The rows :func:`kmeans_plus_plus` chooses, for rows ``x`` [N, D] already centred."""
    n = x.shape[0]
    if n_trials is None:
        n_trials = 2 + int(torch.log(torch.tensor(float(n_clusters))).item())
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    chosen = [first]
    x_norm = _squared_norms(x)  # [N], computed once for every distance below
    _check_norms(x, x_norm)
    closest = _distances_to(x, x_norm, x[first])[:, 0]
    for _ in range(1, n_clusters):
        weights, total = closest, closest.sum()
        if torch.isinf(total):  # float32 distances whose sum overflows (rows near 1e18): the
            weights = closest / closest.max()  # same draws' odds, over the largest distance
            total = weights.sum()
        if total <= 0:  # every row coincides with a centre: fall back to uniform draws
            probs = torch.ones_like(closest)
        else:
            probs = weights / total
        candidates = torch.multinomial(probs, n_trials, replacement=True, generator=generator)
        cand_d2 = _distances_to(x, x_norm, x[candidates])  # [N, T]
        potentials = torch.minimum(cand_d2, closest.unsqueeze(-1)).sum(0)  # [T]
        if torch.isinf(potentials).any():  # (the same overflow: inf ties picked the first)
            potentials = torch.minimum(cand_d2, closest.unsqueeze(-1)).sum(0, dtype=torch.float64)
        best = int(potentials.argmin())
        chosen.append(candidates[best : best + 1])
        closest = torch.minimum(closest, cand_d2[:, best])
    return torch.cat(chosen)


def kmeans(
    x: Tensor,
    n_clusters: int,
    *,
    n_iter: int = 50,
    tol: float = 1e-4,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    init: str = "k-means++",
    seed_rows: int | None = None,
) -> KMeansResult:
    """Lloyd's algorithm from K-means++ (or uniformly drawn) seeds, on ``x``'s device.

    Args:
        x: ``[N, D]`` with ``N >= n_clusters``.
        n_clusters: ``K``.
        n_iter: maximum Lloyd iterations.
        tol: stop when the centres move by less than ``tol`` times the mean feature
            variance (squared Frobenius norm of the shift, as scikit-learn does).
        seed, generator: the seeding's randomness (``generator`` wins when given; ``seed``
            an int in the range of torch's generators, ``[-2**63, 2**64)``; ``None``: 0).
        init: ``"k-means++"`` or ``"random"`` (K distinct rows drawn uniformly).
        seed_rows: run the K-means++ seeding on this many rows drawn uniformly (seeded)
            instead of all ``N``: its ``K`` sequential steps each read every row it is given,
            so on a subsample they cost ``K`` passes over far fewer rows (an int ``>= K``;
            ``None`` or ``>= N``: all rows).

    A cluster left empty by an iteration is re-seeded at the row farthest from its centre
    for the next one. The last assignment can still leave a cluster empty (rows with fewer
    than ``K`` distinct values; or, rarely, the last iteration's step):
    :func:`mfa.init.fit_complete` starts such a component at the data's mean and pooled
    variance.
    """
    x = _check_rows(x)
    check_positive_int(n_clusters, "n_clusters")
    check_positive_int(n_iter, "n_iter", minimum=0)
    try:  # (a number, a 0-d tensor; NaN ran every iteration)
        ok = not isinstance(tol, (bool, str)) and float(tol) >= 0
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    n = x.shape[0]
    if n < n_clusters:
        raise ValueError(f"kmeans needs at least n_clusters={n_clusters} rows, got {n}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if seed_rows is not None:  # (0, -5 and 1.5 acted as None; '100' failed comparing)
        if isinstance(seed_rows, bool) or not isinstance(seed_rows, numbers.Integral):
            raise TypeError(f"seed_rows must be an int or None, got {type(seed_rows).__name__}")
        if seed_rows < n_clusters:
            raise ValueError(f"seed_rows must be None or >= n_clusters={n_clusters} (the "
                             f"seeding picks that many of its rows), got {seed_rows}")
    gen = _generator(seed, generator, x.device)
    # Distances are expanded as ‖x‖² − 2x·c + ‖c‖²: centre the data first so that float32
    # rows far from the origin keep their spread.
    offset = x.mean(0)
    x = x - offset
    if init == "k-means++":
        if seed_rows is not None and seed_rows < n:
            pool = x[torch.randperm(n, generator=gen, device=x.device)[:seed_rows]]
        else:
            pool = x
        centers = pool[_seed_indices(pool, n_clusters, gen)]  # (x is centred)
    else:
        centers = x[torch.randperm(n, generator=gen, device=x.device)[:n_clusters]]
    x_norm = _squared_norms(x)  # [N]
    _check_norms(x, x_norm)  # (init="random" returned NaN inertia where they overflowed)
    # The mean feature variance: x is centred, so it is the mean squared norm over D.
    threshold = tol * x_norm.mean().item() / x.shape[1]
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


def _check_norms(x: Tensor, x_norm: Tensor) -> None:
    """Refuse rows ``x`` [N, D] whose squared norms ``x_norm`` [N] overflow in their dtype."""
    if not bool(torch.isfinite(x_norm).all()):
        finfo = torch.finfo(x.dtype)
        raise ValueError(
            f"input values too large for {x.dtype}: the rows' squared norms overflow "
            f"(largest |x| is {x.abs().max().item():.3g}; squares overflow above |x| ≈ "
            f"{finfo.max ** 0.5 / max(1, x.shape[1]) ** 0.5:.3g} in {x.shape[1]} features). "
            "Rescale the data" + ("" if x.dtype == torch.float64 else " or use a float64 model"))
