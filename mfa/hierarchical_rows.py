"""The rows a hierarchical fit (:mod:`mfa.hierarchical`) reads: their checks, their batches in
row order, the subset of one root component, and every row's hard assignment to the root.

``data`` is a floating tensor ``[N, D]`` or a map-style ``Dataset`` of rows ``[D]`` (or
``(row, label)`` tuples).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from mfa._validation import all_finite
from mfa.model import MixtureOfFactorAnalyzers

__all__ = ["assign_rows", "check_rows", "row_batches", "rows_of"]


def check_rows(data: object, name: str = "data") -> tuple[int, int, torch.dtype]:
    """``(N, D, dtype)`` of a tensor ``[N, D]`` or a map-style dataset of rows (``name``: the
    argument, for messages)."""
    if type(data).__module__ == "numpy":
        raise TypeError(f"{name} is a numpy array; convert it with torch.from_numpy(...).float()")
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ValueError(f"{name} must have shape [N, D], got {tuple(data.shape)}")
        if not data.is_floating_point():
            raise TypeError(f"{name} must be floating point (scale images to [0, 1] first), "
                            f"got {data.dtype}")
        if not all_finite(data):
            bad = ~torch.isfinite(data)
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} contains non-finite values (NaN or inf): row {row}, "
                             f"feature {col}")
        return data.shape[0], data.shape[1], data.dtype
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)
        if n == 0:
            raise ValueError(f"{name} is empty")
        first = data[0]
        row = first[0] if isinstance(first, (tuple, list)) else first
        if not isinstance(row, Tensor) or not row.is_floating_point():
            raise TypeError(f"{name} items must be floating-point tensors (or (tensor, label) "
                            f"tuples), got {type(row).__name__}")
        return n, row.numel(), row.dtype
    raise TypeError(f"{name} must be a torch.Tensor [N, D] or a map-style Dataset of rows, "
                    f"got {type(data).__name__}")


def row_batches(data: Tensor | Dataset, batch_size: int):
    """Float batches ``[B, D]`` of ``data`` in row order."""
    if isinstance(data, Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
        return
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False,
                            generator=torch.Generator()):  # (not torch's global RNG)
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield batch.reshape(batch.shape[0], -1)


def rows_of(data: Tensor | Dataset, index: Tensor) -> Tensor | Dataset:
    """The rows ``index`` [n] of ``data``: a tensor ``[n, D]`` or a ``Subset``."""
    if isinstance(data, Tensor):
        return data[index.to(data.device)]
    return Subset(data, index.tolist())


def assign_rows(root: MixtureOfFactorAnalyzers, data: Tensor | Dataset,
                batch_size: int = 4096) -> Tensor:
    """The most likely root component of every row, ``[N]`` int64 on the CPU, computed batch
    by batch (memory ``O(batch_size · K₁)``)."""
    labels = []
    with torch.no_grad():
        for batch in row_batches(data, batch_size):
            batch = batch.to(device=root.device, dtype=root.dtype)
            labels.append(root.predict(batch).cpu())
    return torch.cat(labels)
