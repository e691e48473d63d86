"""The ``"celeba"`` source: the aligned faces ``img_align_celeba/*.jpg`` (178×218) and the
official partition ``list_eval_partition.txt``, read directly (not through torchvision's
``CelebA``, which needs all annotation files); cropped to :data:`CELEBA_CROP` by default."""

from __future__ import annotations

from pathlib import Path

import torch

from mfa.data.locations import DOWNLOAD_HINT, DatasetNotFoundError, default_data_root
from mfa.data.sources.pools import Pools

__all__ = ["CELEBA_CROP", "CELEBA_SIZE", "celeba_pools"]

#: CelebA face box ``(top, left, height, width)`` in the 178×218 aligned images: rows 50..177,
#: columns 25..152 (Richardson & Weiss 2018).
CELEBA_CROP = (50, 25, 128, 128)

#: ``(width, height)`` of the aligned images the face box is placed for; with the default box
#: every file must have it (another size, e.g. 1024 × 1024 CelebA-HQ, was cropped silently).
CELEBA_SIZE = (178, 218)

#: Where CelebA's files are downloaded by hand.
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def _celeba_folder(base: Path) -> Path | None:
    for folder in (base / "celeba", base):
        images, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
        if images.is_dir() and partition.is_file():
            return folder
    return None


def celeba_pools(root: Path | None, download: bool) -> Pools:
    """The official train/val/test partition of the aligned JPEGs (files, labels ``-1``)."""
    base = root if root is not None else default_data_root()
    folder = _celeba_folder(base)
    if folder is None and download:
        from torchvision.datasets import CelebA

        try:
            CelebA(str(base), split="all", target_type=[], download=True)
        except Exception as err:  # gdown missing, Google Drive quota, network …
            raise DatasetNotFoundError(
                f"celeba: torchvision could not download CelebA into {base / 'celeba'}: "
                f"{str(err).rstrip('.')}. "
                "Download img_align_celeba.zip and list_eval_partition.txt by hand from "
                f"{CELEBA_URL} and unpack them there."
            ) from err
        folder = _celeba_folder(base)
    if folder is None:
        raise DatasetNotFoundError(
            f"celeba not found: need {base / 'celeba' / 'img_align_celeba'}/ (the aligned "
            f"178x218 JPEGs) and {base / 'celeba' / 'list_eval_partition.txt'} (or both directly "
            f"in {base}). Pass {DOWNLOAD_HINT} to fetch them with torchvision "
            "(needs gdown), or download img_align_celeba.zip and list_eval_partition.txt from "
            f"{CELEBA_URL} and unpack them there."
        )
    partition = folder / "list_eval_partition.txt"
    files: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    names = {0: "train", 1: "val", 2: "test"}
    first_at: dict[str, int] = {}  # image → the line that listed it
    with open(partition) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(
                    f"celeba: {partition}:{lineno} must read '<image> <0|1|2>', got {line!r}"
                )
            if parts[0] in first_at:  # (two splits would share it, or one count it twice)
                raise ValueError(f"celeba: {partition}:{lineno} lists {parts[0]} again (first "
                                 f"at line {first_at[parts[0]]})")
            first_at[parts[0]] = lineno
            files[names[int(parts[1])]].append(folder / "img_align_celeba" / parts[0])
    if not files["train"]:
        raise ValueError(f"celeba: {partition} lists no training images (partition 0)")
    return Pools(
        kind="train-val-test",
        files=files,
        labels={s: torch.full((len(v),), -1, dtype=torch.int64) for s, v in files.items()},
        metadata={"root": str(folder)},
        missing_advice=(
            f"{partition.name} lists them in {folder / 'img_align_celeba'}/: extract "
            f"img_align_celeba.zip (from {CELEBA_URL}) again into {folder}, or remove "
            f"{folder / 'img_align_celeba'} and pass {DOWNLOAD_HINT} to fetch CelebA with "
            "torchvision (needs gdown)"),
    )
