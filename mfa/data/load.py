""":func:`load_dataset`: one call from a dataset name to an :class:`~mfa.data.ImageData`.

It checks the options, reads the dataset's pools with its source (:mod:`mfa.data.sources`),
assigns them to train/val/test by seed (:func:`~mfa.data.splits.assign_splits`), then crops and
resizes in-memory images (:mod:`mfa.data.transforms`) or decodes image files
(:mod:`mfa.data.decode`). See ``docs/data.md`` for what each dataset reads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mfa.data.checks import check_bool, check_fraction, check_nonnegative_int, check_positive_int
from mfa.data.decode import decode_splits
from mfa.data.image_data import ImageData
from mfa.data.locations import default_cache_dir
from mfa.data.names import DatasetName, normalise_name
from mfa.data.quantized import check_key_part
from mfa.data.sources import CELEBA_CROP, CELEBA_SIZE, read_pools
from mfa.data.splits import assign_splits
from mfa.data.transforms import check_crop, check_size, shape_of_transform, transform_tensor

__all__ = ["load_dataset"]


def load_dataset(
    name: DatasetName | str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_size: int | tuple[int, int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    dequantize: bool = False,
    channels: int | None = None,
    crop: tuple[int, int, int, int] | None = None,
    num_workers: int | None = None,
    batch_size: int = 256,
    cache: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageData:
    """Load an image dataset as uint8 rows split into train/val/test.

    Args:
        name: one of :data:`DATASET_NAMES` (``"embedded-mnist"``, ``"mnist"``,
            ``"fashion-mnist"``, ``"svhn"``, ``"celeba"``, ``"folder"``); see ``docs/data.md``
            for each one's files and splits.
        root: the dataset's folder, resolved (a relative one against the working
            directory); ``None``: :func:`default_data_root` (``"folder"`` needs one;
            ``"embedded-mnist"`` ignores it).
        download: let torchvision download a missing dataset into ``root``. Nothing is
            downloaded otherwise.
        image_size: output size. An int ``s``: resize so the shorter side is ``s``, then take
            the centre ``s × s`` (square images are simply resized); ``(H, W)``: resize to
            exactly that. ``None``: keep the size (CelebA: 64). Resizing is bilinear with
            antialiasing and happens after ``crop``.
        val_fraction: share of the pool that becomes the val split, where there is no official
            one (all but CelebA).
        test_fraction: share that becomes the test split, where there is no official one
            (``"embedded-mnist"`` and ``"folder"``).
        seed: seeds the split, the ``limit`` subsets and the dequantisation noise.
        limit: keep at most this many images in *each* split, a seeded random subset chosen
            before any image file is decoded. The split itself does not depend on ``limit``.
        dequantize: make the float views of the result dequantised (``(pixel + u)/256``)
            rather than ``pixel/255``.
        channels: 1 (greyscale) or 3 (RGB) for ``"folder"`` and ``"celeba"``; ``None``: the
            data's own (``"folder"``: the first image's). Other datasets accept only their own.
        crop: ``(top, left, height, width)`` box cut from each image before resizing; ``None``:
            no crop, except CelebA, which uses :data:`CELEBA_CROP`.
        num_workers: processes decoding image files (CelebA, ``"folder"``); ``None``: 0 for
            fewer than 2,000 files, else ``min(8, CPUs)``.
        batch_size: images decoded per batch.
        cache: for CelebA and ``"folder"``, save the decoded uint8 splits in ``cache_dir`` and
            reuse them when the same files are loaded with the same options.
        cache_dir: for ``cache`` and for extracted idx files; ``None``: :func:`default_cache_dir`.
        progress: show a progress bar while decoding image files.

    Returns:
        An :class:`ImageData`.

    Raises:
        ValueError: unknown ``name`` or bad options.
        DatasetNotFoundError: the files are missing (the message says where they were looked
            for and how to get them).
    """
    key = normalise_name(name)
    check_fraction(val_fraction, "val_fraction")
    check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    seed = check_key_part(seed, "seed")  # (a numpy int too, as the data's other entries)
    for flag, value in (("download", download), ("dequantize", dequantize), ("cache", cache),
                        ("progress", progress)):
        check_bool(value, flag)
    if limit is not None:
        check_positive_int(limit, "limit")
    size = check_size(image_size)
    if crop is not None:
        crop = check_crop(crop)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if num_workers is not None:
        check_nonnegative_int(num_workers, "num_workers")
    check_positive_int(batch_size, "batch_size")
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # resolved: the decoded-image cache keys on the files' paths, and a relative root's paths
    # name other files from another working directory (project B got project A's pixels)
    root_path = Path(root).expanduser().resolve() if root is not None else None

    pools = read_pools(key, root_path, download, cache_path)
    pools.check(key)
    source_size = None  # (width, height) every file must have
    if key == "celeba":
        if crop is None:
            crop, source_size = CELEBA_CROP, CELEBA_SIZE
        if size is None:  # as image_size=64: the shorter side to 64, then the centre square
            size = (64,)

    if pools.images is not None and channels is not None:
        native = next(iter(pools.images.values())).shape[1]
        if channels != native:
            raise ValueError(
                f"{key} images have {native} channel(s); channels={channels} is supported "
                "only for 'folder' and 'celeba'"
            )

    assignment = assign_splits(
        {p: t.shape[0] for p, t in pools.labels.items()},
        pools.kind,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        limit=limit,
    )
    labels = {s: pools.labels[p][idx] for s, (p, idx) in assignment.items()}

    meta = dict(pools.metadata)
    meta.update(
        name=key,
        seed=seed,
        limit=limit,
        crop=crop,
        image_size=size,
        val_fraction=val_fraction if pools.kind != "train-val-test" else None,
        test_fraction=test_fraction if pools.kind == "all" else None,
    )

    if pools.images is not None:
        image_shape = shape_of_transform(next(iter(pools.images.values())).shape[1:], crop, size)
        pixels = {}
        for s, (p, idx) in assignment.items():
            imgs = transform_tensor(pools.images[p][idx], crop, size)
            pixels[s] = imgs.reshape(imgs.shape[0], math.prod(image_shape)).contiguous()
    else:
        files = {s: [pools.files[p][i] for i in idx.tolist()] for s, (p, idx) in assignment.items()}
        pixels, image_shape = decode_splits(
            files,
            # CelebA is RGB by definition: no file is opened to choose (its first file in
            # sorted order need not be among those a limit selects, nor exist)
            channels=3 if key == "celeba" and channels is None else channels,
            crop=crop,
            size=size,
            num_workers=num_workers,
            batch_size=batch_size,
            progress=progress,
            cache=cache_path if cache else None,
            cache_key=dict(meta, channels=channels),
            # the dataset's first file in sorted order (not the shuffled, limited train split's)
            first=min(p for paths in pools.files.values() for p in paths),
            source_size=source_size,
            missing_advice=pools.missing_advice,
        )
        meta["channels"] = image_shape[0]
    meta["pools"] = pools.fingerprint()  # (after decoding: not part of the cache's key)

    return ImageData(
        name=key,
        image_shape=image_shape,
        train_pixels=pixels["train"],
        val_pixels=pixels["val"],
        test_pixels=pixels["test"],
        train_labels=labels["train"],
        val_labels=labels["val"],
        test_labels=labels["test"],
        dequantize=dequantize,
        seed=seed,
        classes=pools.classes,
        metadata=meta,
        sources={s: pools.source_names(p, idx) for s, (p, idx) in assignment.items()},
    )
