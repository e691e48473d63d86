"""Evaluation metrics: NDB, likelihoods in bits per dimension, and model selection.

* **NDB** (Number of statistically Different Bins; Richardson & Weiss, "On GANs and GMMs",
  NeurIPS 2018). The training samples are split into ``K`` bins by K-means; every training
  sample and every sample of the model goes to its nearest bin centre, and each bin gets a
  two-proportion z-test of "the training proportion equals the sample proportion". NDB is the
  number of bins where the test rejects at level ``alpha``; for samples from the training
  distribution ``NDB / K ≈ alpha``, a model that drops modes or invents some scores higher.
  See :func:`ndb` (one shot) and :class:`NDB` (bins fitted once, many sample sets evaluated).
* **Likelihoods**: :func:`mean_log_likelihood` streams a tensor or a ``DataLoader`` through a
  model with float64 accumulation; :func:`bits_per_dim` converts a log-density of
  dequantised ``[0, 1]`` data into bits per dimension of the discrete images.
* **Model selection**: :func:`n_parameters`, :func:`bic`, :func:`aic` and
  :func:`select_model`, which compares ``(K, L)`` candidates fitted by a user-supplied
  ``fit_fn`` (so this module does not depend on any trainer).

Every function runs on the device of its inputs; the small per-bin statistics of NDB (``[K]``
vectors) are computed and returned on the CPU in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mfa._validation import check_finite, check_positive_int, check_tensor, feature_index

__all__ = [
    "NDB",
    "NDBResult",
    "ModelSelectionResult",
    "aic",
    "bic",
    "bits_per_dim",
    "js_divergence",
    "mean_log_likelihood",
    "n_parameters",
    "ndb",
    "select_model",
    "total_log_likelihood",
    "two_proportion_z_test",
]

#: Default number of rows per batch of the streamed computations.
DEFAULT_BATCH_SIZE = 4096

_SQRT2 = math.sqrt(2.0)


# ====================================================================== NDB


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
    ) -> None:
        """Low-level constructor from already computed parts; use :meth:`fit` or
        :meth:`from_centers` instead."""
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
                pixels, which is converted to float32). K-means runs on their device.
            n_bins: ``K``, the number of bins (``1 <= K <= N``).
            alpha: significance level of the per-bin tests (in ``(0, 1)``).
            seed: seeds K-means and the random feature subset; same seed, same bins.
            whiten: standardise each feature with the training mean and std before binning.
            max_dims: if set and smaller than ``D``, bin on a seeded random subset of
                ``max_dims`` features (sorted indices), as in the reference implementation
                for large ``D``.
            batch_size: rows per batch of the nearest-centre assignment; no ``[N, K, D]``
                tensor is formed (:func:`mfa.init.kmeans` chunks its own distances).
            kmeans_iter: maximum number of Lloyd iterations.

        The training proportions are recomputed by assigning every training sample to its
        nearest final centre, the same rule as for the evaluated samples.
        """
        from mfa.init import kmeans

        train = _check_matrix(train, "train")
        check_positive_int(n_bins, "n_bins")
        check_positive_int(kmeans_iter, "kmeans_iter")
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
        counts = _bin_counts(_nearest(z, centers, batch_size), n_bins)
        return cls(
            centers, counts, n_features=d, alpha=alpha, features=features,
            mean=mean, std=std, batch_size=batch_size,
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
        train = _check_matrix(train, "train")
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
        counts = _bin_counts(_nearest(z, centers, batch_size), centers.shape[0])
        return cls(
            centers, counts, n_features=d, alpha=alpha, features=idx,
            mean=mean, std=std, batch_size=batch_size,
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
        x = _check_matrix(x, "samples")
        if x.shape[1] != self.n_features:
            raise ValueError(
                f"samples must have shape [M, {self.n_features}] like the training data "
                f"(D={self.n_features}), got {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _assign(self, x: Tensor) -> Tensor:
        return _nearest(x, self.centers, self.batch_size, self.features, self.mean, self.std)


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
    samples = _check_matrix(samples, "samples")
    if train.dim() == 2 and samples.shape[1] != train.shape[1]:
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
        if not (isinstance(base, (int, float)) and base > 0 and base != 1):
            raise ValueError(f"base must be a positive number other than 1, got {base!r}")
        js /= math.log(base)
    return js


# ---------------------------------------------------------------------- NDB helpers


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


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


def _nearest(
    x: Tensor,
    centers: Tensor,
    batch_size: int,
    features: Tensor | None = None,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> Tensor:
    """Nearest centre of each row of ``x`` (``[M, D]``) → ``[M]`` int64.

    Rows are mapped to the binning space and compared in batches of ``batch_size``:
    ``‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²`` with the per-row constant ``‖x‖²`` dropped (it does not
    change the argmin), so each batch needs one ``[b, K]`` matrix product.
    """
    check_positive_int(batch_size, "batch_size")
    c_sq = (centers * centers).sum(dim=1)  # [K]
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = _transform(x[start : start + batch_size], features, mean, std)
            dist = torch.addmm(c_sq, xb, centers.T, beta=1.0, alpha=-2.0)  # [b, K]
            out[start : start + xb.shape[0]] = dist.argmin(dim=1)
    return out


def _bin_counts(labels: Tensor, n_bins: int) -> Tensor:
    return torch.bincount(labels, minlength=n_bins).cpu()


# ====================================================================== likelihoods


def bits_per_dim(
    log_likelihood: float | Tensor, n_dims: int, *, scale: float = 256
) -> float | Tensor:
    """Convert a log-density of dequantised data to bits per dimension.

    For 8-bit images the data are ``x = (pixel + u) / scale`` with ``u ~ U[0, 1)^D`` and
    ``scale = 256``, so ``x ∈ [0, 1)^D``. The dequantised ``y = pixel + u ∈ [0, 256)^D`` has
    density ``p_y(y) = p_x(x) / scale^D`` (change of variables), and ``log p_y`` lower-bounds
    (in expectation over ``u``) the log-probability of the discrete image. In bits per
    dimension::

        bits/dim = −log₂ p_y(y) / D = −(log p_x(x) − D · ln(scale)) / (D · ln 2)
                 = −log p_x(x) / (D ln 2) + log₂(scale)

    A uniform density on ``[0, 1]^D`` (``log p_x = 0``) gives ``log₂ 256 = 8`` bits/dim.
    Use ``scale=1`` if the model was fitted on the ``[0, 256)`` pixel scale itself. For any
    other affine preprocessing ``x' = a x + b``, first add ``D · log|a|`` to the
    log-likelihood of ``x'``.

    Args:
        log_likelihood: ``log p_x(x)`` in nats, per sample (tensor of any shape) or a mean.
        n_dims: ``D``, the number of dimensions of one sample.
        scale: the divisor that mapped pixel values to the model's data (``> 0``).

    Returns:
        A float (for a float input) or a tensor of the input's shape.
    """
    check_positive_int(n_dims, "n_dims")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    offset = n_dims * math.log(scale)
    denom = n_dims * math.log(2.0)
    if isinstance(log_likelihood, Tensor):
        return -(log_likelihood - offset) / denom
    return -(float(log_likelihood) - offset) / denom


def total_log_likelihood(
    model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[float, int]:
    """Sum of ``model.log_prob`` over ``data`` and the number of rows, streamed.

    Args:
        model: anything with ``log_prob(x[B, D]) -> [B]`` (e.g. a
            :class:`~mfa.model.MixtureOfFactorAnalyzers`); if it has ``device`` and
            ``dtype`` attributes, floating-point batches are moved/cast to them.
        data: a ``[N, D]`` tensor (processed in slices of ``batch_size`` rows) or an
            iterable such as a ``DataLoader`` yielding tensors ``[B, D]`` or tuples whose
            first element is that tensor (``(x, label)``).
        batch_size: rows per slice for tensor data.

    Returns:
        ``(total, n)``: the total log-likelihood in nats (accumulated in float64 on the
        model's device, one synchronisation at the end) and the number of rows.
        Per-sample values are never stored.
    """
    check_positive_int(batch_size, "batch_size")
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"data must have shape [N, D], got {tuple(data.shape)}")
        batches: Iterable = (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    else:
        try:
            batches = iter(data)
        except TypeError as err:
            raise TypeError(
                f"data must be a tensor or an iterable of batches, got {type(data).__name__}"
            ) from err
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    total: Tensor | None = None
    n = 0
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                if not batch:
                    raise ValueError("data yielded an empty tuple")
                batch = batch[0]
            if not isinstance(batch, Tensor):
                raise TypeError(f"data must yield tensors, got {type(batch).__name__}")
            if batch.is_floating_point() and isinstance(dtype, torch.dtype):
                batch = batch.to(dtype=dtype)
            if device is not None:
                batch = batch.to(device=device)
            lp = model.log_prob(batch)
            part = lp.sum(dtype=torch.float64)
            total = part if total is None else total + part
            n += lp.numel()
    if n == 0 or total is None:
        raise ValueError("data is empty")
    return float(total), n


def mean_log_likelihood(
    model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE
) -> float:
    """Mean ``log p(x)`` per sample (nats), streamed over a tensor or a ``DataLoader``.

    See :func:`total_log_likelihood` for the arguments; accumulation is in float64.
    """
    total, n = total_log_likelihood(model, data, batch_size)
    return total / n


# ====================================================================== model selection


def n_parameters(
    model_or_n_components: Any,
    n_features: int | None = None,
    n_factors: int | None = None,
    noise: str = "diagonal",
) -> int:
    """Number of free parameters of a mixture of factor analyzers.

    Per component: ``D`` for the mean, ``D·L − L(L−1)/2`` for the loadings (``A`` and ``A R``
    give the same covariance for any rotation ``R``, which removes ``L(L−1)/2``), and ``D``
    (diagonal) or ``1`` (isotropic) noise variances; plus ``K − 1`` mixture weights::

        diagonal:  K · (D·L − L(L−1)/2 + 2D)    + K − 1
        isotropic: K · (D·L − L(L−1)/2 + D + 1) + K − 1

    With ``L = 0`` these are the counts of a diagonal and a spherical GMM. This is the
    standard count; for large ``L`` (e.g. ``L = D``) the loadings and noise are no longer
    jointly identifiable and it over-counts the ``D + D(D+1)/2`` of a full covariance.

    Args:
        model_or_n_components: a model (anything with ``n_components``, ``n_features``,
            ``n_factors`` and ``noise``) or ``K``.
        n_features, n_factors, noise: ``D``, ``L`` and the noise type when ``K`` is given.
    """
    if not isinstance(model_or_n_components, int) or isinstance(model_or_n_components, bool):
        model = model_or_n_components
        try:
            k, d, lat = model.n_components, model.n_features, model.n_factors
            noise = model.noise
        except AttributeError as err:
            raise TypeError(
                "n_parameters takes a model (with n_components, n_features, n_factors, noise) "
                f"or integers K, D, L; got {type(model).__name__}"
            ) from err
    else:
        k, d, lat = model_or_n_components, n_features, n_factors
        if d is None or lat is None:
            raise TypeError("n_parameters(K, D, L, noise) needs n_features and n_factors")
    check_positive_int(k, "n_components")
    check_positive_int(d, "n_features")
    check_positive_int(lat, "n_factors", minimum=0)
    if lat > d:
        raise ValueError(f"n_factors must be <= n_features ({d}), got {lat}")
    if noise == "diagonal":
        noise_params = d
    elif noise == "isotropic":
        noise_params = 1
    else:
        raise ValueError(f"noise must be 'diagonal' or 'isotropic', got {noise!r}")
    per_component = d * lat - lat * (lat - 1) // 2 + d + noise_params
    return k * per_component + k - 1


def bic(model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Bayesian information criterion ``−2 log L + p log N`` (lower is better).

    ``log L`` is the total log-likelihood of ``data`` (nats, streamed as in
    :func:`total_log_likelihood`), ``p = n_parameters(model)`` and ``N`` the number of rows.
    """
    total, n = total_log_likelihood(model, data, batch_size)
    return -2.0 * total + n_parameters(model) * math.log(n)


def aic(model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Akaike information criterion ``−2 log L + 2 p`` (lower is better); see :func:`bic`."""
    total, _ = total_log_likelihood(model, data, batch_size)
    return -2.0 * total + 2.0 * n_parameters(model)


_CRITERIA = ("bic", "aic", "val_log_lik")


@dataclass
class ModelSelectionResult:
    """Outcome of :func:`select_model`.

    Attributes:
        rows: one dict per candidate, best first, with keys ``K``, ``L``, ``noise``,
            ``n_params``, ``log_lik`` (total training log-likelihood, nats),
            ``mean_log_lik`` (per sample), ``bic``, ``aic`` and ``val_log_lik`` (mean
            held-out log-likelihood per sample, or ``None`` without validation data).
        best: ``rows[0]``.
        best_model: the fitted model of the best row.
        criterion: the criterion the rows are sorted by.
    """

    rows: list[dict]
    best: dict
    best_model: Any
    criterion: str

    def table(self) -> str:
        """The rows as a fixed-width text table."""
        head = f"{'K':>5} {'L':>4} {'n_params':>10} {'mean_log_lik':>14} {'bic':>14} " \
               f"{'aic':>14} {'val_log_lik':>12}"
        lines = [head]
        for r in self.rows:
            val = "-" if r["val_log_lik"] is None else f"{r['val_log_lik']:.4f}"
            lines.append(
                f"{r['K']:>5} {r['L']:>4} {r['n_params']:>10} {r['mean_log_lik']:>14.4f} "
                f"{r['bic']:>14.2f} {r['aic']:>14.2f} {val:>12}"
            )
        return "\n".join(lines)


def select_model(
    train: Tensor | Iterable,
    candidates: Sequence[tuple[int, int]],
    fit_fn: Callable[[int, int], Any],
    criterion: str = "bic",
    validation: Tensor | Iterable | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ModelSelectionResult:
    """Fit every ``(K, L)`` candidate with ``fit_fn`` and rank them.

    Args:
        train: the training data (``[N, D]`` tensor or iterable of batches) on which the
            log-likelihood, BIC and AIC are computed; ``fit_fn`` is expected to fit on it.
        candidates: ``(K, L)`` pairs.
        fit_fn: ``fit_fn(K, L) -> model``, a fitted model (e.g. a closure around a trainer).
            The row records the returned model's own ``n_components`` and ``n_factors``.
        criterion: ``"bic"`` or ``"aic"`` (lower is better) or ``"val_log_lik"`` (higher is
            better; needs ``validation``).
        validation: optional held-out data; adds ``val_log_lik`` to every row.
        batch_size: rows per slice when streaming tensors.

    Returns:
        A :class:`ModelSelectionResult`; rows with a NaN criterion sort last, ties keep the
        candidate order. Only the best model is kept.
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    if criterion == "val_log_lik" and validation is None:
        raise ValueError("criterion='val_log_lik' needs validation data")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates must not be empty")
    for cand in candidates:
        if not (isinstance(cand, (tuple, list)) and len(cand) == 2):
            raise ValueError(f"each candidate must be a (K, L) pair, got {cand!r}")
        check_positive_int(cand[0], "K")
        check_positive_int(cand[1], "L", minimum=0)
    if not callable(fit_fn):
        raise TypeError(f"fit_fn must be callable, got {type(fit_fn).__name__}")

    rows: list[dict] = []
    best_key = math.inf
    best_model = None
    best_row = None
    for k, lat in candidates:
        model = fit_fn(k, lat)
        total, n = total_log_likelihood(model, train, batch_size)
        p = n_parameters(model)
        row = {
            "K": int(model.n_components),
            "L": int(model.n_factors),
            "noise": model.noise,
            "n_params": p,
            "log_lik": total,
            "mean_log_lik": total / n,
            "bic": -2.0 * total + p * math.log(n),
            "aic": -2.0 * total + 2.0 * p,
            "val_log_lik": None,
        }
        if validation is not None:
            row["val_log_lik"] = mean_log_likelihood(model, validation, batch_size)
        rows.append(row)
        key = _sort_key(row, criterion)
        if best_row is None or key < best_key:
            best_key, best_model, best_row = key, model, row
    rows.sort(key=lambda r: _sort_key(r, criterion))
    return ModelSelectionResult(rows=rows, best=rows[0], best_model=best_model,
                                criterion=criterion)


def _sort_key(row: dict, criterion: str) -> float:
    value = row[criterion]
    if criterion == "val_log_lik":
        value = -value
    return math.inf if math.isnan(value) else value
