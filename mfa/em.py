"""Streaming EM for a Mixture of Factor Analyzers (Ghahramani & Hinton, 1996)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class ConvergenceWarning(UserWarning):
    """EM or SGD stopped at its iteration limit before meeting its tolerance."""


@dataclass
class EMConfig:
    """Settings of :class:`EMTrainer`."""

    max_iter: int = 100  # EM iterations (full passes over the data)
    tol: float = 1e-4  # stop when the mean train log-likelihood per sample gains less than this
    batch_size: int = 4096  # rows per streamed batch; the result does not depend on it
    variance_floor: float = 1e-5  # lower bound of every noise variance after each M-step
    device: str | None = None  # None: the model's device
    stats_dtype: Literal["float64", "float32"] = "float64"  # accumulators of the statistics
    seed: int = 0  # seeds initialisation and re-seeding of empty components
    n_init: int = 1  # restarts; the best by final train log-likelihood is kept
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 5  # factor-analysis iterations of the complete-data initial fit
    min_component_mass: float = 2.0  # components with less responsibility mass are re-seeded
    checkpoint_every: int = 0  # call checkpoint_fn every this many iterations (0: only at the end)
    progress: bool = True  # tqdm progress bar
