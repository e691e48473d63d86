"""Evaluation metrics: likelihoods in bits per dimension, model selection, and (re-exported
from :mod:`mfa.ndb`) NDB.

* **Likelihoods**: :func:`mean_log_likelihood` streams a tensor or a ``DataLoader`` through a
  model with float64 accumulation; :func:`bits_per_dim` converts a log-density of
  dequantised ``[0, 1]`` data into bits per dimension of the discrete images.
* **Model selection**: :func:`n_parameters`, :func:`bic`, :func:`aic` and
  :func:`select_model`, which compares ``(K, L)`` candidates fitted by a user-supplied
  ``fit_fn`` (so this module does not depend on any trainer).
* **NDB** (Number of statistically Different Bins): :func:`ndb`, :class:`NDB`,
  :class:`NDBResult`, :func:`two_proportion_z_test`, :func:`js_divergence`; see
  :mod:`mfa.ndb`.

Every function runs on the device of its inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mfa import distributed
from mfa._data_stream import DEFAULT_BATCH_SIZE
from mfa._validation import check_positive_int, check_positive_real, is_real_number
from mfa.data.quantized import QuantizedRows
from mfa.ndb import NDB, NDBResult, js_divergence, ndb, two_proportion_z_test
from mfa.training import check_reiterable

__all__ = [
    "DEFAULT_BATCH_SIZE",
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
    n_dims = check_positive_int(n_dims, "n_dims")
    scale = check_positive_real(scale, "scale")
    offset = n_dims * math.log(scale)
    denom = n_dims * math.log(2.0)
    if type(log_likelihood).__module__ == "numpy" and hasattr(log_likelihood, "ndim"):
        # an array: its shape, as a tensor; a 0-d one or a numpy scalar: a number
        log_likelihood = (torch.as_tensor(log_likelihood) if log_likelihood.ndim
                          else log_likelihood.item())
    if isinstance(log_likelihood, Tensor):
        return -(log_likelihood - offset) / denom
    if not is_real_number(log_likelihood):  # (True was read as 1.0, "1.5" parsed)
        raise TypeError(f"log_likelihood must be a number or a tensor, got "
                        f"{type(log_likelihood).__name__}")
    return -(float(log_likelihood) - offset) / denom


def total_log_likelihood(
    model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[float, int]:
    """Sum of ``model.log_prob`` over ``data`` and the number of rows, streamed.

    Args:
        model: anything with ``log_prob(x[B, D]) -> [B]`` (e.g. a
            :class:`~mfa.model.MixtureOfFactorAnalyzers`); if it has ``device`` and
            ``dtype`` attributes, floating-point batches are moved/cast to them.
        data: a ``[N, D]`` tensor or :class:`~mfa.data.QuantizedRows` (processed in slices
            of ``batch_size`` rows; a ``QuantizedRows``' pixels move to the model's device
            once) or an iterable such as a ``DataLoader`` yielding tensors ``[B, D]`` or
            tuples whose first element is that tensor (``(x, label)``). Images (a tensor
            ``[N, C, H, W]``, batches ``[B, C, H, W]``) are flattened to rows, as the
            trainers flatten them; the rows must have the model's ``n_features``.
        batch_size: rows per slice for tensor data.

    Returns:
        ``(total, n)``: the total log-likelihood in nats (accumulated in float64 on the
        model's device, one synchronisation at the end) and the number of rows.
        Per-sample values are never stored.
    """
    total, n = _summed(model, data, batch_size)
    if n == 0:
        raise ValueError("data is empty")
    return total, n


def _summed(model: Any, data: Tensor | Iterable, batch_size: int) -> tuple[float, int]:
    """:func:`total_log_likelihood`'s ``(total, n)``, ``(0.0, 0)`` for no rows."""
    check_positive_int(batch_size, "batch_size")
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"data must have shape [N, D] (or [N, C, H, W], flattened), got "
                             f"{tuple(data.shape)}")
        data = _flat_rows(data, model, "data")
        batches: Iterable = (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    elif isinstance(data, QuantizedRows):
        dtype = getattr(model, "dtype", None)
        rows = data.to(getattr(model, "device", None),
                       dtype if isinstance(dtype, torch.dtype) else None)
        batches = (rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size))
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
        for index, batch in enumerate(batches):
            if isinstance(batch, (tuple, list)):
                if not batch:
                    raise ValueError("data yielded an empty tuple")
                batch = batch[0]
            if not isinstance(batch, Tensor):
                raise TypeError(f"data must yield tensors, got {type(batch).__name__}")
            batch = _flat_rows(batch, model, f"data batch {index}")
            if batch.is_floating_point() and isinstance(dtype, torch.dtype):
                batch = batch.to(dtype=dtype)
            if device is not None:
                batch = batch.to(device=device)
            lp = model.log_prob(batch)
            part = lp.sum(dtype=torch.float64)
            total = part if total is None else total + part
            n += lp.numel()
    return (0.0, 0) if total is None else (float(total), n)


def _flat_rows(data: Tensor, model: Any, name: str) -> Tensor:
    """``data`` ``[N, ...]`` as rows ``[N, D]`` (images flattened, as the trainers take them),
    refused where a model with ``n_features`` has another ``D``."""
    if data.dim() <= 2:  # (rows: a D other than the model's is its log_prob's to refuse)
        return data
    rows = data.flatten(1)  # (reshape(N, -1) failed for N = 0)
    n_features = getattr(model, "n_features", None)
    if isinstance(n_features, int) and rows.shape[1] != n_features:
        raise ValueError(f"{name} must have {n_features} features per row (the model's "
                         f"n_features), got shape {tuple(data.shape)}")
    return rows


def mean_log_likelihood(
    model: Any, data: Tensor | Iterable, batch_size: int = DEFAULT_BATCH_SIZE, *,
    across_processes: bool = False,
) -> float:
    """Mean ``log p(x)`` per sample (nats), streamed over a tensor or a ``DataLoader``.

    See :func:`total_log_likelihood` for the arguments; accumulation is in float64.
    ``across_processes``: under :mod:`torch.distributed`, the mean over every process's rows
    (one all-reduce; call it on every process), each process passing its own (a
    ``DataLoader`` over ``mfa.distributed.ShardSampler(dataset)``). Without it a process
    scores the rows it is given: such a loader gives the mean of its shard only.
    """
    if not across_processes:
        total, n = total_log_likelihood(model, data, batch_size)
        return total / n
    total, n = distributed.sum_across_processes(*_summed(model, data, batch_size))
    if n == 0:  # (a process without rows takes part in the sum)
        raise ValueError("data is empty on every process")
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

    With ``L = 0`` these are the counts of a diagonal and a spherical GMM. For large ``L``
    (``(D−L)² < D+L``, e.g. ``L ≥ D−1``) the loadings and noise are no longer jointly
    identifiable: the covariance's count is then capped at the ``D(D+1)/2`` of a full
    covariance (the count above over-penalised such models' BIC).

    Args:
        model_or_n_components: a model (anything with ``n_components``, ``n_features``,
            ``n_factors`` and ``noise``) or ``K``.
        n_features, n_factors, noise: ``D``, ``L`` and the noise type when ``K`` is given.
    """
    if not isinstance(model_or_n_components, numbers.Integral) or isinstance(
            model_or_n_components, bool):
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
    k = check_positive_int(k, "n_components")
    d = check_positive_int(d, "n_features")
    lat = check_positive_int(lat, "n_factors", minimum=0)
    if lat > d:
        raise ValueError(f"n_factors must be <= n_features ({d}), got {lat}")
    if noise == "diagonal":
        noise_params = d
    elif noise == "isotropic":
        noise_params = 1
    else:
        raise ValueError(f"noise must be 'diagonal' or 'isotropic', got {noise!r}")
    # The covariance's free parameters (loadings up to rotation, and noise), at most those of
    # a full covariance: with (D−L)² < D+L (e.g. L ≥ D−1) the count above that is redundant.
    covariance = min(d * lat - lat * (lat - 1) // 2 + noise_params, d * (d + 1) // 2)
    return k * (d + covariance) + k - 1


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
        train: the training data (``[N, D]`` tensor or iterable of batches; images are
            flattened, see :func:`total_log_likelihood`) on which the
            log-likelihood, BIC and AIC are computed; ``fit_fn`` is expected to fit on it.
        candidates: ``(K, L)`` pairs.
        fit_fn: ``fit_fn(K, L) -> model``, a fitted model (e.g. a closure around a trainer).
            The row records the returned model's own ``n_components`` and ``n_factors``
            (``K``, ``L``) and the candidate asked for (``requested``).
        criterion: ``"bic"`` or ``"aic"`` (lower is better) or ``"val_log_lik"`` (higher is
            better; needs ``validation``).
        validation: optional held-out data; adds ``val_log_lik`` to every row.
        batch_size: rows per slice when streaming tensors.

    Returns:
        A :class:`ModelSelectionResult`; rows with a criterion that is not finite (NaN,
        or a log-likelihood of +inf and its BIC of −inf) sort last, ties keep the candidate
        order. Only the best model is kept.
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
    check_reiterable(train, "train")  # read once a candidate: refused before any fit
    check_reiterable(validation, "validation")

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
            "requested": (k, lat),
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
    # last where not finite: a model whose log p is +inf (BIC −inf) was ranked best
    return value if math.isfinite(value) else math.inf
