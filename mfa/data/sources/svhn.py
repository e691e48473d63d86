"""The ``"svhn"`` source: ``train_32x32.mat`` and ``test_32x32.mat`` (in ``root`` or
``root/svhn``), read with scipy as :class:`torchvision.datasets.SVHN` does but without its MD5
check; ``download=True`` fetches the official, MD5-checked files with torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mfa.data.locations import DOWNLOAD_HINT, DatasetNotFoundError, default_data_root
from mfa.data.sources.pools import Pools

__all__ = ["svhn_pools"]


def svhn_pools(root: Path | None, download: bool) -> Pools:
    """The official train and test ``.mat`` files as uint8 images ``[N, 3, 32, 32]``."""
    from torchvision.datasets import SVHN

    base = root if root is not None else default_data_root() / "svhn"
    folders = [base, base / "svhn"]
    images, labels, origins = {}, {}, {}
    for pool in ("train", "test"):
        url, filename, md5 = SVHN.split_list[pool]
        path = next((f / filename for f in folders if (f / filename).is_file()), None)
        if path is None and download:
            from torchvision.datasets.utils import download_url

            try:
                download_url(url, str(base), filename, md5)
            except Exception as err:  # network, MD5 mismatch …
                raise DatasetNotFoundError(
                    f"svhn: torchvision could not download {filename} into {base}: {err}. "
                    f"Put train_32x32.mat and test_32x32.mat from {url.rsplit('/', 1)[0]}/ there."
                ) from err
            path = base / filename
        if path is None:
            raise DatasetNotFoundError(
                f"svhn: {filename} not found in {base} or {base / 'svhn'}. "
                f"Pass {DOWNLOAD_HINT} to fetch it with torchvision into {base}, or put "
                "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
                "there."
            )
        try:
            import scipy.io as sio
        except ImportError as err:  # pragma: no cover - scipy is installed with the tests
            raise ImportError("loading SVHN needs scipy: pip install scipy") from err
        try:
            mat = sio.loadmat(str(path), variable_names=["X", "y"])
        except Exception as err:  # scipy's MatReadError, ValueError, … on a corrupt file
            raise ValueError(f"svhn: cannot read {path} as a MATLAB .mat file (a truncated "
                             f"or corrupt download?): {err}") from err
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise ValueError(
                f"svhn: {path} must hold X (uint8 [H, W, 3, N]) and y ([N, 1]) as in "
                f"the official files; got X {None if x is None else (x.dtype, x.shape)}"
            )
        flat = np.asarray(y, dtype=np.float64).reshape(-1)
        whole = np.isfinite(flat) & (flat == np.round(flat))
        if not whole.all():  # (10.7 became 10, then digit 0, silently)
            bad = flat[~whole][0]
            raise ValueError(f"svhn: {path} has a label {float(bad)!r} that is not a whole number; "
                             "SVHN's labels are 1 to 10")
        y = y.astype(np.int64).reshape(-1)
        if y.shape[0] != x.shape[3]:
            raise ValueError(f"svhn: {path} has {x.shape[3]} images but {y.shape[0]} labels")
        if y.size and (y.min() < 1 or y.max() > 10):  # (checked before 10 becomes 0)
            bad = int(y[(y < 1) | (y > 10)][0])
            raise ValueError(f"svhn: {path} has a label {bad}; SVHN's labels are 1 to 10 "
                             "(10 for the digit 0)")
        y[y == 10] = 0  # SVHN labels digit 0 as 10
        # [H, W, C, N] -> [N, C, H, W], as torchvision's np.transpose(X, (3, 2, 0, 1))
        images[pool] = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
        origins[pool] = str(path)
        labels[pool] = torch.from_numpy(y)
    return Pools(
        kind="train-test",
        images=images,
        labels=labels,
        classes=tuple(str(i) for i in range(10)),
        metadata={"root": str(base)},
        origins=origins,
    )
