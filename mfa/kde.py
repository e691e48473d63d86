"""Gaussian kernel density estimates, as mixtures with one isotropic component per point.

``p(x) = (1/N) Σ_i N(x; x_i, σ² I)`` is a :class:`~mfa.model.MixtureOfFactorAnalyzers` with
``K = N`` and ``L = 0``: the usual baseline for the likelihood of image models.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from mfa._validation import check_finite, check_tensor
from mfa.model import DEFAULT_CHUNK_ELEMENTS, MixtureOfFactorAnalyzers


def kde(
    data: Tensor,
    bandwidth: float | None = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MixtureOfFactorAnalyzers:
    """A Gaussian kernel density estimate: one isotropic component per data point.

    ``p(x) = (1/N) Σ_i N(x; x_i, σ² I)``, a mixture with ``K = N``, ``L = 0``.

    Args:
        data: ``[N, D]``, the kernel centres.
        bandwidth: ``σ``. When ``None``, Scott's rule
            ``σ = s · N^(−1/(D+4))`` with ``s`` the mean per-feature standard deviation
            (for ``D = 1`` this is the ``N^(−1/5)`` rate). In high dimensions this rule
            is far too wide; pick ``σ`` on held-out data with :func:`select_kde_bandwidth`.
        chunk_elements: as in :class:`~mfa.model.MixtureOfFactorAnalyzers`.
    """
    data = _check_rows(data, "data")
    n, d = data.shape
    if bandwidth is None:
        bandwidth = scott_bandwidth(data)
    if isinstance(bandwidth, Tensor) and bandwidth.numel() == 1:
        bandwidth = bandwidth.item()
    if isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool):
        bandwidth = float(bandwidth)
    if not (isinstance(bandwidth, float) and math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a finite float > 0, got {bandwidth!r}")
    _check_variance(bandwidth, data.dtype)
    weights = torch.full((n,), 1.0 / n, dtype=data.dtype, device=data.device)
    variance = torch.full((n,), float(bandwidth) ** 2, dtype=data.dtype, device=data.device)
    loadings = data.new_zeros(n, d, 0)
    return MixtureOfFactorAnalyzers.from_parameters(
        weights, data, loadings, variance, noise="isotropic", chunk_elements=chunk_elements
    )


def _check_variance(bandwidth: float, dtype: torch.dtype) -> None:
    """Refuse a bandwidth whose square ``σ²`` (the kernels' variance) overflows or falls
    below the smallest normal number of ``dtype``."""
    info = torch.finfo(dtype)
    if not info.tiny <= bandwidth * bandwidth <= info.max:
        raise ValueError(
            f"bandwidth {bandwidth:g}: its square, the kernels' variance, is outside the range of "
            f"{dtype} ([{info.tiny:.3g}, {info.max:.3g}]); rescale the data or use float64")


def _check_rows(rows: object, name: str, width: int | None = None) -> Tensor:
    """``rows`` as a checked tensor: finite floating point ``[N, D]``, ``N >= 1`` (and
    ``D == width`` when given)."""
    rows = check_tensor(rows, name)
    if rows.dim() != 2 or rows.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {tuple(rows.shape)}")
    if width is not None and rows.shape[1] != width:
        raise ValueError(f"{name} has {rows.shape[1]} features, the kernel centres {width}")
    if not rows.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {rows.dtype}")
    check_finite(rows, name)
    return rows


def scott_bandwidth(data: Tensor) -> float:
    """Scott's rule ``σ = s · N^(−1/(D+4))``, ``s`` the mean per-feature standard deviation
    of ``data`` ``[N, D]`` (1 when ``N < 2`` or every feature is constant)."""
    n, d = _check_rows(data, "data").shape
    if n < 2:
        return 1.0
    std = data.std(dim=0).mean().item()
    std = std if std > 0 else 1.0
    return std * n ** (-1.0 / (d + 4))


def select_kde_bandwidth(
    train: Tensor,
    validation: Tensor,
    candidates: Sequence[float] | Tensor | None = None,
) -> tuple[float, Tensor]:
    """Pick the KDE bandwidth that maximises the mean held-out log-likelihood.

    Args:
        train: ``[N, D]``, the kernel centres.
        validation: ``[M, D]``, held-out rows.
        candidates: bandwidths to try; by default 25 values log-spaced from 1/100 to 2 times
            Scott's bandwidth.

    Returns:
        ``(best_bandwidth, scores)``, ``scores[i]`` the mean held-out log-likelihood of
        ``candidates[i]``.
    """
    train = _check_rows(train, "train")
    validation = _check_rows(validation, "validation", train.shape[1])
    if validation.dtype != train.dtype:
        raise TypeError(f"validation has dtype {validation.dtype} but train (the kernel "
                        f"centres) {train.dtype}; convert one to the other")
    if candidates is None:
        base = scott_bandwidth(train)
        candidates = torch.logspace(math.log10(base / 100), math.log10(base * 2), 25).tolist()
    if isinstance(candidates, str):  # (its characters were taken for bandwidths)
        raise TypeError(f"candidates must be a sequence of floats, got the string "
                        f"{candidates!r}")
    if isinstance(candidates, Tensor):
        if candidates.dim() != 1:
            raise ValueError(f"candidates must be a 1-D tensor or a sequence of floats, got "
                             f"shape {tuple(candidates.shape)}")
        candidates = candidates.tolist()
    try:
        candidates = [float(c) for c in candidates]
    except (TypeError, ValueError) as error:
        raise ValueError(f"candidates must be a sequence of floats ({error})") from None
    if not candidates:
        raise ValueError("candidates must not be empty")
    scores = []
    with torch.no_grad():
        for bandwidth in candidates:
            model = kde(train, bandwidth)
            scores.append(model.log_prob(validation).mean().item())
    scores_t = torch.tensor(scores, dtype=torch.float64)
    return candidates[int(scores_t.argmax())], scores_t


__all__ = ["kde", "scott_bandwidth", "select_kde_bandwidth"]
