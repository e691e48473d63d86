"""NDB, the Number of statistically Different Bins (Richardson & Weiss, "On GANs and GMMs",
NeurIPS 2018).

The training samples are split into ``K`` bins by K-means; every training sample and every
sample of the model goes to its nearest bin centre (:func:`mfa.kmeans.nearest_center`), and each
bin gets a two-proportion z-test of "the training proportion equals the sample proportion".
NDB is the number of bins where the test rejects at level ``alpha``; for samples from the
training distribution ``NDB / K ≈ alpha``, a model that drops modes or invents some scores
higher. See :func:`ndb` (one shot) and :class:`NDB` (bins fitted once, many sample sets
evaluated). K-means and the assignments run on the device of the inputs; the small per-bin
statistics (``[K]`` vectors) are computed and returned on the CPU in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mfa._data_stream import DEFAULT_BATCH_SIZE
from mfa._validation import (
    as_real,
    check_finite,
    check_positive_int,
    check_seed,
    check_tensor,
    feature_index,
)
from mfa.kmeans import kmeans, nearest_center

__all__ = ["NDB", "NDBResult", "js_divergence", "ndb", "two_proportion_z_test"]

_SQRT2 = math.sqrt(2.0)


@dataclass
class NDBResult:
    """The outcome of an NDB evaluation with ``K`` bins.

    Attributes:
        ndb: the number of statistically different bins.
        ndb_over_k: ``ndb / K``; about ``alpha`` for samples from the training distribution.
        js_divergence: Jensen–Shannon divergence between the two bin-proportion vectors, in
            nats (natural logarithm, so it lies in ``[0, ln 2]``).
        bin_proportions_train: ``[K]`` float64, fraction of the training samples in each bin.
        bin_proportions_samples: ``[K]`` float64, fraction of the evaluated samples per bin.
        z_scores: ``[K]`` float64, ``(p_train − p_samples) / se``: positive where the samples
            under-populate a bin (e.g. a dropped mode), negative where they over-populate it.
        p_values: ``[K]`` float64, two-sided p-values of the z-tests.
        different: ``[K]`` bool, ``p_values < alpha``.
        centers: ``[K, D']`` bin centres, in the binning space (after the optional feature
            subset and whitening; see :class:`NDB`), on the training data's device.
        bin_counts_train, bin_counts_samples: ``[K]`` int64 counts behind the proportions.
        n_train, n_samples: the sample sizes ``n1`` and ``n2`` of the tests.
        alpha: the significance level used.

    The ``[K]`` statistics live on the CPU.
    """

    ndb: int
    ndb_over_k: float
    js_divergence: float
    bin_proportions_train: Tensor
    bin_proportions_samples: Tensor
    z_scores: Tensor
    p_values: Tensor
    different: Tensor
    centers: Tensor
    bin_counts_train: Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    bin_counts_samples: Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    n_train: int = 0
    n_samples: int = 0
    alpha: float = 0.05


class NDB:
    """NDB bins fitted once on training data, to evaluate many sample sets.

    Build it with :meth:`fit` (K-means bins) or :meth:`from_centers` (given bin centres),
    then call :meth:`evaluate` on each sample set::

        bins = NDB.fit(train, n_bins=100, seed=0)      # train: [N, D]
        result = bins.evaluate(model.sample(10_000)[0])
        result.ndb, result.ndb_over_k, result.js_divergence

    Binning space: the optional feature subset ``features`` is taken first, then (if
    ``whiten``) every kept feature is standardised with the training mean and standard
    deviation (population std; constant features are left unscaled). Bin centres live in
    that space; samples are mapped the same way before being assigned.

    Attributes:
        centers: ``[K, D']`` bin centres on the training data's device.
        features: ``[D']`` int64 indices of the kept features, or ``None`` (all features).
        mean, std: ``[D']`` whitening statistics, or ``None`` when ``whiten=False``.
        bin_counts_train: ``[K]`` int64 (CPU), training samples per bin.
        bin_proportions_train: ``[K]`` float64 (CPU).
        n_train: number of training samples; n_features: ``D``; n_bins: ``K``.
        alpha: default significance level of :meth:`evaluate`.
        batch_size: rows per batch of the nearest-centre assignment.
    """

    def __init__(
        self,
        centers: Tensor,
        bin_counts_train: Tensor,
        *,
        n_features: int,
        alpha: float = 0.05,
        features: Tensor | None = None,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        integer_train: bool | None = None,
    ) -> None:
        """Low-level constructor from already computed parts; use :meth:`fit` or
        :meth:`from_centers` instead. ``integer_train``: whether the training samples were
        integers (pixels 0..255): samples of the other kind are then refused (``None``: not
        checked)."""
        self.centers = centers
        self.bin_counts_train = bin_counts_train
        self.n_train = int(bin_counts_train.sum())
        self.bin_proportions_train = bin_counts_train.double() / max(self.n_train, 1)
        self.n_features = n_features
        self.n_bins = centers.shape[0]
        self.alpha = _check_alpha(alpha)
        self.features = features
        self.mean = mean
        self.std = std
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.integer_train = integer_train

    # ------------------------------------------------------------------ construction

    @classmethod
    def fit(
        cls,
        train: Tensor,
        n_bins: int = 100,
        *,
        alpha: float = 0.05,
        seed: int = 0,
        whiten: bool = False,
        max_dims: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        kmeans_iter: int = 50,
    ) -> NDB:
        """Fit ``n_bins`` K-means bins to the training samples.

        Args:
            train: ``[N, D]`` training samples (floating point, or integer such as ``uint8``
                pixels, which is converted to float32 on its own scale, 0..255). K-means runs
                on their device. Samples evaluated later must be of the same kind (integers
                for integer training data, floating point for floating): uint8 pixels
                against samples in ``[0, 1]`` would put every sample in the darkest bins, so
                the mix is refused (``mfa.data.pixels_to_float`` converts pixels).
            n_bins: ``K``, the number of bins (``1 <= K <= N``).
            alpha: significance level of the per-bin tests (in ``(0, 1)``).
            seed: seeds K-means and the random feature subset; same seed, same bins.
            whiten: standardise each feature with the training mean and std before binning.
            max_dims: if set and smaller than ``D``, bin on a seeded random subset of
                ``max_dims`` features (sorted indices), as in the reference implementation
                for large ``D``.
            batch_size: rows per batch of the nearest-centre assignment; no ``[N, K, D]``
                tensor is formed (:func:`mfa.kmeans.kmeans` chunks its own distances).
            kmeans_iter: maximum number of Lloyd iterations.

        The training proportions are recomputed by assigning every training sample to its
        nearest final centre, the same rule as for the evaluated samples.
        """
        integer = _integer_kind(check_tensor(train, "train"))
        train = _check_matrix(train, "train")
        check_positive_int(n_bins, "n_bins")
        check_positive_int(batch_size, "batch_size")
        check_positive_int(kmeans_iter, "kmeans_iter")
        seed = check_seed(seed)
        _check_alpha(alpha)
        n, d = train.shape
        if n_bins > n:
            raise ValueError(
                f"n_bins ({n_bins}) exceeds the number of training samples ({n}); "
                "use fewer bins or more training data"
            )
        features = None
        if max_dims is not None:
            check_positive_int(max_dims, "max_dims")
            if max_dims < d:
                gen = torch.Generator().manual_seed(int(seed))
                features = torch.randperm(d, generator=gen)[:max_dims].sort().values
                features = features.to(train.device)
        mean, std = _whitening_stats(train, features) if whiten else (None, None)
        z = _transform(train, features, mean, std)
        centers = kmeans(z, n_bins, n_iter=kmeans_iter, seed=seed).centers
        centers = centers.to(dtype=z.dtype, device=z.device)
        labels, _ = nearest_center(z, centers, batch_size=batch_size)
        counts = _bin_counts(labels, n_bins)
        empty = int((counts == 0).sum())
        if empty:  # K-means' centres coincide where the rows have fewer distinct values
            warnings.warn(
                f"{empty} of the {n_bins} NDB bins hold no training sample (the training "
                "data has fewer distinct rows than bins, or duplicates K-means could not "
                "separate); such a bin can never differ, so NDB/K is biased low: use fewer "
                "bins", UserWarning, stacklevel=2)
        return cls(
            centers, counts, n_features=d, alpha=alpha, features=features,
            mean=mean, std=std, batch_size=batch_size, integer_train=integer,
        )

    @classmethod
    def from_centers(
        cls,
        train: Tensor,
        centers: Tensor,
        *,
        alpha: float = 0.05,
        whiten: bool = False,
        features: Sequence[int] | Tensor | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> NDB:
        """Bins with given centres (e.g. from another run, or hand-made for a test).

        Args:
            train: ``[N, D]`` training samples, assigned to the nearest centres.
            centers: ``[K, D']`` centres in the binning space (``D' = len(features)`` or
                ``D``; whitened coordinates when ``whiten``).
            alpha, whiten, batch_size: as in :meth:`fit`.
            features: indices (or a bool mask ``[D]``) of the features to bin on, in the
                order the columns of ``centers`` use; ``None`` for all.
        """
        integer = _integer_kind(check_tensor(train, "train"))
        train = _check_matrix(train, "train")
        check_positive_int(batch_size, "batch_size")
        n, d = train.shape
        idx = None
        if features is not None:
            idx = feature_index(features, d).to(train.device)
        width = d if idx is None else idx.numel()
        centers = _check_matrix(centers, "centers")
        if centers.shape[1] != width:
            raise ValueError(
                f"centers must have shape [K, {width}] (the binning space has {width} "
                f"features), got {tuple(centers.shape)}"
            )
        if centers.shape[0] > n:
            raise ValueError(
                f"n_bins ({centers.shape[0]}) exceeds the number of training samples ({n})"
            )
        mean, std = _whitening_stats(train, idx) if whiten else (None, None)
        z = _transform(train, idx, mean, std)
        centers = centers.to(dtype=z.dtype, device=z.device)
        labels, _ = nearest_center(z, centers, batch_size=batch_size)
        counts = _bin_counts(labels, centers.shape[0])
        return cls(
            centers, counts, n_features=d, alpha=alpha, features=idx,
            mean=mean, std=std, batch_size=batch_size, integer_train=integer,
        )

    # ------------------------------------------------------------------ use

    @property
    def device(self) -> torch.device:
        return self.centers.device

    @property
    def dtype(self) -> torch.dtype:
        return self.centers.dtype

    def transform(self, x: Tensor) -> Tensor:
        """Map rows to the binning space: ``[M, D]`` → ``[M, D']`` (on the bins' device)."""
        x = self._check_samples(x)
        return _transform(x, self.features, self.mean, self.std)

    def assign(self, x: Tensor) -> Tensor:
        """Index of the nearest bin centre of each row: ``[M, D]`` → ``[M]`` int64."""
        x = self._check_samples(x)
        return self._assign(x)

    def evaluate(self, samples: Tensor, *, alpha: float | None = None) -> NDBResult:
        """Compare the bin proportions of ``samples`` (``[M, D]``) with the training ones.

        ``samples`` are moved to the bins' device and dtype. ``alpha`` overrides the level
        given at construction. Returns an :class:`NDBResult`.
        """
        alpha = self.alpha if alpha is None else _check_alpha(alpha)
        samples = self._check_samples(samples)
        counts = _bin_counts(self._assign(samples), self.n_bins)
        n2 = samples.shape[0]
        p_train = self.bin_proportions_train
        p_samples = counts.double() / n2
        z, p_values = two_proportion_z_test(p_train, self.n_train, p_samples, n2)
        different = p_values < alpha
        n_diff = int(different.sum())
        return NDBResult(
            ndb=n_diff,
            ndb_over_k=n_diff / self.n_bins,
            js_divergence=js_divergence(p_train, p_samples),
            bin_proportions_train=p_train.clone(),
            bin_proportions_samples=p_samples,
            z_scores=z,
            p_values=p_values,
            different=different,
            centers=self.centers,
            bin_counts_train=self.bin_counts_train.clone(),
            bin_counts_samples=counts,
            n_train=self.n_train,
            n_samples=n2,
            alpha=float(alpha),
        )

    def __repr__(self) -> str:
        width = self.n_features if self.features is None else self.features.numel()
        return (
            f"NDB(n_bins={self.n_bins}, n_features={self.n_features}, binned_features={width}, "
            f"whiten={self.mean is not None}, n_train={self.n_train}, alpha={self.alpha})"
        )

    def _check_samples(self, x: Tensor) -> Tensor:
        x = check_tensor(x, "samples")
        if self.integer_train is not None:
            _check_kind(self.integer_train, x)
        x = _check_matrix(x, "samples")
        if x.shape[1] != self.n_features:
            raise ValueError(
                f"samples must have shape [M, {self.n_features}] like the training data "
                f"(D={self.n_features}), got {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _assign(self, x: Tensor) -> Tensor:
        z = _transform(x, self.features, self.mean, self.std)
        return nearest_center(z, self.centers, batch_size=self.batch_size)[0]


def ndb(
    train: Tensor,
    samples: Tensor,
    n_bins: int = 100,
    *,
    alpha: float = 0.05,
    seed: int = 0,
    whiten: bool = False,
    max_dims: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    kmeans_iter: int = 50,
) -> NDBResult:
    """NDB of ``samples`` (``[M, D]``) against K-means bins of ``train`` (``[N, D]``).

    Shorthand for ``NDB.fit(train, n_bins, ...).evaluate(samples)``; see :meth:`NDB.fit`
    for the arguments. Use :class:`NDB` directly to reuse the bins for several sample sets.
    """
    # Fail before K-means on bad samples; train is checked (once) by NDB.fit.
    train = check_tensor(train, "train")
    _check_kind(_integer_kind(train), check_tensor(samples, "samples"))
    width = _check_matrix(samples, "samples").shape[1]  # (evaluate converts the samples)
    if train.dim() == 2 and width != train.shape[1]:
        raise ValueError(
            f"samples must have shape [M, {train.shape[1]}] like train (D={train.shape[1]}), "
            f"got {tuple(samples.shape)}"
        )
    bins = NDB.fit(
        train, n_bins, alpha=alpha, seed=seed, whiten=whiten, max_dims=max_dims,
        batch_size=batch_size, kmeans_iter=kmeans_iter,
    )
    return bins.evaluate(samples)


def two_proportion_z_test(
    p1: Tensor, n1: int, p2: Tensor, n2: int
) -> tuple[Tensor, Tensor]:
    """Two-sided two-proportion z-tests with pooled proportion, elementwise.

    ``p = (n1 p1 + n2 p2) / (n1 + n2)``, ``se = sqrt(p (1 − p) (1/n1 + 1/n2))``,
    ``z = (p1 − p2) / se`` and ``p_value = 2 (1 − Φ(|z|)) = erfc(|z| / √2)``. Where
    ``se = 0`` (both proportions 0 or both 1) the test has no evidence: ``z = 0``,
    ``p_value = 1``.

    Args:
        p1, p2: proportions (any broadcastable shapes); computed in float64 on the CPU.
        n1, n2: sample sizes (``>= 1``).

    Returns:
        ``(z, p_value)``, float64 tensors.
    """
    check_positive_int(n1, "n1")
    check_positive_int(n2, "n2")
    p1 = torch.as_tensor(p1, dtype=torch.float64).cpu()
    p2 = torch.as_tensor(p2, dtype=torch.float64).cpu()
    for name, p in (("p1", p1), ("p2", p2)):  # NaN or 1.5 would read as "no difference"
        check_finite(p, name)
        if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError(f"{name} must hold proportions in [0, 1], got values in "
                             f"[{p.min().item():.4g}, {p.max().item():.4g}]")
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    se = (pooled * (1.0 - pooled)).clamp_min(0.0).mul(1.0 / n1 + 1.0 / n2).sqrt()
    ok = se > 0
    z = torch.where(ok, (p1 - p2) / torch.where(ok, se, torch.ones_like(se)), 0.0)
    p_value = torch.special.erfc(z.abs() / _SQRT2)
    return z, p_value


def js_divergence(p: Tensor | Sequence[float], q: Tensor | Sequence[float], *,
                  base: float | None = None) -> float:
    """Jensen–Shannon divergence ``½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p + q) / 2``.

    Args:
        p, q: ``[K]`` non-negative weights; each is normalised to sum to one.
        base: logarithm base; ``None`` for nats (natural log, result in ``[0, ln 2]``),
            ``2`` for bits (result in ``[0, 1]``).

    ``0 · log 0 = 0``. Equals ``scipy.spatial.distance.jensenshannon(p, q, base) ** 2``.
    """
    p = torch.as_tensor(p, dtype=torch.float64).cpu().flatten()
    q = torch.as_tensor(q, dtype=torch.float64).cpu().flatten()
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    for name, v in (("p", p), ("q", q)):
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or float(v.sum()) <= 0:
            raise ValueError(f"{name} must be finite, non-negative and not all zero")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum()
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum()
    js = max(0.5 * float(kl_pm + kl_qm), 0.0)
    if base is not None:
        value = as_real(base)
        if value is None or not (math.isfinite(value) and value > 0 and value != 1):
            raise ValueError(f"base must be a positive number other than 1, got {base!r}")
        js /= math.log(value)
    return js


# ---------------------------------------------------------------------- NDB helpers


def _check_alpha(alpha: object) -> float:
    value = as_real(alpha)  # (np.float32(0.05) was refused as out of range)
    if value is None:
        raise TypeError(f"alpha must be a real number in (0, 1), got {type(alpha).__name__}")
    if not 0 < value < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return value


def _integer_kind(x: Tensor) -> bool:
    """Whether ``x`` holds integers (pixel levels), not floating-point values or booleans."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _check_kind(integer_train: bool, samples: Tensor) -> None:
    """Refuse samples of another kind than the training data: integer pixels (0..255) and
    floating-point values (``[0, 1]`` in this library) are on different scales."""
    if _integer_kind(samples) != integer_train:
        kinds = ("integers (pixels 0..255?)", "floating point (values in [0, 1]?)")
        train_kind, sample_kind = (kinds[0], kinds[1]) if integer_train else (kinds[1], kinds[0])
        raise ValueError(
            f"samples are {sample_kind} ({samples.dtype}) but the bins were fitted on "
            f"training data of {train_kind}: the two are on different scales; convert one "
            "to the other's (mfa.data.pixels_to_float turns uint8 pixels into [0, 1])")


def _check_matrix(x: object, name: str) -> Tensor:
    """A finite ``[N, D]`` tensor with ``N >= 1`` (and ``D >= 1``), as a float tensor."""
    x = check_tensor(x, name)
    if x.dim() != 2 or x.shape[1] < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    check_finite(x, name)
    return x


def _whitening_stats(train: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std of the (selected) training features, ``[D']``."""
    x = train if features is None else train[:, features.to(train.device)]
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


def _transform(x: Tensor, features: Tensor | None, mean: Tensor | None,
               std: Tensor | None) -> Tensor:
    if features is not None:
        x = x[:, features.to(x.device)]
    if mean is not None:
        x = (x - mean) / std
    return x


def _bin_counts(labels: Tensor, n_bins: int) -> Tensor:
    return torch.bincount(labels, minlength=n_bins).cpu()
