"""What a dataset source returns: the raw pools of images (or image files) before splitting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

__all__ = ["Pools"]


@dataclass
class Pools:
    """Raw material of a dataset before splitting.

    ``kind`` is ``"all"`` (one pool, split train/val/test by seed), ``"train-test"`` (official
    test; val carved out of train by seed) or ``"train-val-test"`` (all official). Each pool is
    either uint8 images ``[N, C, H, W]`` (``images``) or image files (``files``); ``labels``
    holds int64 ``[N]`` per pool (``-1``: unlabelled).
    """

    kind: str
    labels: dict[str, Tensor]
    images: dict[str, Tensor] | None = None
    files: dict[str, list[Path]] | None = None
    classes: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)
