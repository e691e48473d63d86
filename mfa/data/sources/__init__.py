"""Dataset sources: each reads one family of files into :class:`Pools` (images or image files
and labels, before splitting). :func:`read_pools` picks the source of a dataset name.

One module per source: ``embedded`` (the digits shipped in ``mfa/assets``), ``mnist`` (MNIST
and Fashion-MNIST idx files), ``svhn`` (``.mat`` files), ``celeba`` (aligned JPEGs and the
official partition), ``folder`` (any folder of images). See ``docs/data.md``.
"""

from __future__ import annotations

from pathlib import Path

from mfa.data.sources.celeba import CELEBA_CROP, CELEBA_SIZE, celeba_pools
from mfa.data.sources.embedded import embedded_mnist_pools
from mfa.data.sources.folder import IMAGE_EXTENSIONS, folder_pools
from mfa.data.sources.mnist import FASHION_MNIST_DEBIAN_DIR, mnist_pools
from mfa.data.sources.pools import Pools
from mfa.data.sources.svhn import svhn_pools

__all__ = ["CELEBA_CROP", "CELEBA_SIZE", "FASHION_MNIST_DEBIAN_DIR", "IMAGE_EXTENSIONS", "Pools",
           "read_pools"]


def read_pools(key: str, root: Path | None, download: bool, cache_dir: Path) -> Pools:
    """The pools of dataset ``key`` (a normalised :data:`~mfa.data.DatasetName`).

    Args:
        key: the dataset's name.
        root: its folder (``None``: the default data root; ``"folder"`` needs one).
        download: let torchvision download missing files (MNIST, Fashion-MNIST, SVHN, CelebA).
        cache_dir: where extracted idx files go.
    """
    if key == "embedded-mnist":
        return embedded_mnist_pools()
    if key in ("mnist", "fashion-mnist"):
        return mnist_pools(key, root, download, cache_dir)
    if key == "svhn":
        return svhn_pools(root, download)
    if key == "celeba":
        return celeba_pools(root, download)
    if key == "folder":
        return folder_pools(root)
    raise ValueError(f"no source for dataset {key!r}")  # pragma: no cover - names are checked
