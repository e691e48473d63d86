"""Seeds and splits: independent random streams derived from one seed, and the seeded
assignment of a dataset's pools of images to the train/val/test splits.

Streams are told apart by a tag and the parts that matter (seed, split, epoch, row), hashed
with splitmix64, so that e.g. changing ``limit`` never changes which image is in which split.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SPLITS",
    "SPLIT_STREAM",
    "TAG_DEQUANT",
    "TAG_LIMIT",
    "TAG_SPLIT",
    "Split",
    "assign_splits",
    "check_split",
    "mix_seed",
    "seeded_generator",
]

Split = Literal["train", "val", "test"]
#: The three splits of an :class:`~mfa.data.ImageData`, in order.
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: The stream number of each split (tells the splits' noise and subsets apart).
SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}

#: Tags of the random streams derived from a dataset's seed.
TAG_SPLIT = 0x5B17
TAG_LIMIT = 0x11A1
TAG_DEQUANT = 0xDE0A

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (a hash, not a sum)."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`mix_seed` of ``parts``."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def check_split(split: object) -> str:
    """``split`` if it is one of :data:`SPLITS` (``ValueError`` otherwise)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def assign_splits(
    pool_sizes: dict[str, int],
    kind: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit: int | None,
) -> dict[str, tuple[str, Tensor]]:
    """Map each split to ``(pool, indices into the pool)``.

    Args:
        pool_sizes: number of images in each pool (``"all"``, or ``"train"``/``"test"``, or
            ``"train"``/``"val"``/``"test"``).
        kind: ``"all"`` (one pool split by seed), ``"train-test"`` (official test; val carved
            out of train by seed) or ``"train-val-test"`` (all official).
        val_fraction, test_fraction: shares of a pool that become val/test where not official.
        seed: seeds the permutation and the ``limit`` subsets.
        limit: keep at most this many images per split (a seeded subset of the split).
    """
    out: dict[str, tuple[str, Tensor]] = {}
    if kind == "all":
        n = pool_sizes["all"]
        n_val = round(n * val_fraction)
        n_test = round(n * test_fraction)
        if n - n_val - n_test < 1:
            raise ValueError(
                f"{n} images leave no training images with val_fraction={val_fraction}, "
                f"test_fraction={test_fraction}"
            )
        perm = torch.randperm(n, generator=seeded_generator(TAG_SPLIT, seed))
        # test first: it then depends on test_fraction and seed only, so runs with another
        # val_fraction are scored on the same images (val first made them disjoint)
        out["train"] = ("all", perm[n_test + n_val :])
        out["val"] = ("all", perm[n_test : n_test + n_val])
        out["test"] = ("all", perm[:n_test])
    elif kind == "train-test":
        n = pool_sizes["train"]
        n_val = round(n * val_fraction)
        if n - n_val < 1:
            raise ValueError(
                f"{n} images leave no training images with val_fraction={val_fraction}"
            )
        perm = torch.randperm(n, generator=seeded_generator(TAG_SPLIT, seed))
        out["train"] = ("train", perm[n_val:])
        out["val"] = ("train", perm[:n_val])
        out["test"] = ("test", torch.arange(pool_sizes["test"]))
    elif kind == "train-val-test":
        for s in SPLITS:
            out[s] = (s, torch.arange(pool_sizes[s]))
    else:  # pragma: no cover - internal
        raise AssertionError(kind)
    if limit is not None:
        for s, (pool, idx) in out.items():
            if idx.numel() > limit:
                gen = seeded_generator(TAG_LIMIT, seed, SPLIT_STREAM[s])
                sub = torch.randperm(idx.numel(), generator=gen)
                out[s] = (pool, idx[sub[:limit]])
    return out
