"""Adam on the minibatch negative marginal log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SGDConfig:
    """Settings of :class:`SGDTrainer`."""

    lr: float = 5e-3  # Adam learning rate
    batch_size: int = 256  # rows per step
    epochs: int = 20  # passes over the training data
    schedule: Literal["constant", "cosine", "step"] = "constant"  # learning-rate schedule
    grad_clip: float | None = 10.0  # max global gradient norm; None disables clipping
    val_fraction: float = 0.1  # held out for early stopping when no validation data is given
    patience: int = 5  # epochs without validation improvement before stopping (0: never)
    seed: int = 0  # seeds the split, the shuffling and the initialisation
    device: str | None = None  # None: the model's device
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 5  # factor-analysis iterations of the complete-data initial fit
    init_samples: int = 50_000  # rows (a seeded random subset) used by the initialisation
    variance_floor: float = 1e-5  # noise-variance floor of the initialisation
    weight_decay: float = 0.0  # Adam weight decay
    checkpoint_every: int = 0  # call checkpoint_fn every this many epochs (0: only at the end)
    progress: bool = True  # tqdm progress bar
