"""The ``"folder"`` source: every image file under ``root`` (recursively, sorted by path),
labelled by its first-level sub-folder's index among those that hold images, sorted, as
:class:`torchvision.datasets.ImageFolder` numbers them (which refuses a sub-folder without
images; here it gets no index) (``-1`` for images directly in ``root``); one pool split by
seed."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mfa.data.locations import DatasetNotFoundError
from mfa.data.sources.pools import Pools

__all__ = ["IMAGE_EXTENSIONS", "folder_pools"]

#: File name endings read by the ``"folder"`` dataset (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


def folder_pools(root: Path | None) -> Pools:
    """Every image file under ``root`` as one pool, labelled by first-level sub-folder."""
    if root is None:
        raise ValueError("the 'folder' dataset needs root=<a folder of images>")
    if not root.is_dir():
        raise DatasetNotFoundError(f"folder: {root} is not a directory")
    paths: list[Path] = []
    # Linked folders are followed, each real folder once: a link back up the tree (a loop)
    # or a second link to the same folder would otherwise list its images again and again.
    seen = {_identity(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            key = _identity(Path(dirpath) / d)
            if key not in seen:
                seen.add(key)
                kept.append(d)
        dirnames[:] = kept
        paths += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    paths.sort()
    if not paths:
        raise DatasetNotFoundError(
            f"folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}"
        )
    tops = [p.relative_to(root).parts for p in paths]
    classes = tuple(sorted({t[0] for t in tops if len(t) > 1}))
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[t[0]] if len(t) > 1 else -1 for t in tops], dtype=torch.int64)
    return Pools(
        kind="all",
        files={"all": paths},
        labels={"all": labels},
        classes=classes,
        metadata={"root": str(root)},
        missing_advice=f"they were under {root} when loading began: were they moved or "
                       "deleted since? Load again once they stay in place",
    )


def _identity(folder: Path) -> tuple[int, int]:
    """The real folder behind ``folder`` (links followed): (device, inode)."""
    st = folder.stat()
    return st.st_dev, st.st_ino
