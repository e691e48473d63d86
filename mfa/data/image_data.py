"""Float views over uint8 pixels: :class:`ImageData` (a dataset split into train/val/test,
stored as uint8 rows) and :class:`ImageDataset` (a map-style dataset of float rows whose
dequantisation noise depends only on ``(seed, split, epoch, row)``).

Pixels stay ``uint8`` (1 byte per value); float32 (4 bytes per value) is made one batch at a
time by :meth:`ImageData.loader`, or for a whole split by :meth:`ImageData.as_float`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mfa.data.checks import check_positive_int, check_uint8
from mfa.data.layout import (
    check_dequantized_dtype,
    check_image_shape,
    dequantize_with_noise,
    pixels_to_float,
    to_images,
)
from mfa.data.quantized import QuantizedRows, check_key_part
from mfa.data.splits import (
    SPLIT_STREAM,
    SPLITS,
    TAG_DEQUANT,
    Split,
    check_split,
    mix_seed,
    seeded_generator,
)

__all__ = ["ImageData", "ImageDataset"]


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
        seed, stream: ints that seed the noise (``stream``, ``>= 0``, tells splits apart).
        dtype: floating-point dtype of the rows (with ``dequantize``: float32 or float64,
            see :func:`~mfa.data.layout.check_dequantized_dtype`).
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
        check_uint8(pixels, "pixels")
        if pixels.dim() != 2:
            raise ValueError(f"pixels must have shape [N, D], got {tuple(pixels.shape)}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if dequantize:
            check_dequantized_dtype(dtype)
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != pixels.shape[0]):
            raise ValueError(
                f"labels must have shape [{pixels.shape[0]}], got {tuple(labels.shape)}"
            )
        if with_labels and labels is None:
            raise ValueError("with_labels=True needs labels")
        self.image_shape = None
        if image_shape is not None:
            self.image_shape = check_image_shape(image_shape)
            c, h, w = self.image_shape
            if c * h * w != pixels.shape[1]:
                raise ValueError(
                    f"image_shape {self.image_shape} has {c * h * w} values but the rows "
                    f"have {pixels.shape[1]}"
                )
        self.pixels = pixels
        self.labels = labels
        self.dequantize = bool(dequantize)
        self.seed = check_key_part(seed, "seed")
        self.stream = check_key_part(stream, "stream", minimum=0)
        self.dtype = dtype
        self.with_labels = bool(with_labels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the dequantisation noise of epoch ``epoch``, an int ``>= 0`` (no effect
        without it)."""
        self.epoch = check_key_part(epoch, "epoch", minimum=0)

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
        """The float rows ``[len(indices), D]`` for ``indices`` (one conversion for all).

        Row ``i``'s noise is drawn by a CPU generator seeded with the 63-bit key
        ``mix_seed(TAG_DEQUANT, seed, stream, epoch, i)``, but torch's CPU generator (a
        Mersenne Twister) keeps only the key's low 32 bits: two rows whose keys agree there get
        the same noise ``u``. In a split of ``N`` rows about ``N²/2³³`` pairs of rows share
        their noise (≈ 3 pairs in CelebA's 162,770 training rows, ≈ 0.4 in 60,000). It is kept
        as it is: every published result was computed on this noise.
        """
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        idx = [self._index(i) for i in indices]
        pix = self.pixels[torch.as_tensor(idx, dtype=torch.long)]
        if not self.dequantize:
            return pixels_to_float(pix, self.dtype)
        out = torch.empty(pix.shape, dtype=self.dtype)
        gen = torch.Generator()
        for j, i in enumerate(idx):
            gen.manual_seed(mix_seed(TAG_DEQUANT, self.seed, self.stream, self.epoch, i))
            torch.rand(pix.shape[1], generator=gen, dtype=self.dtype, out=out[j])
        return dequantize_with_noise(pix, out)

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
        name: the dataset's name (as given to :func:`~mfa.data.load_dataset`).
        image_shape: ``(C, H, W)``; rows have ``D = C·H·W`` values in CHW order.
        train_pixels, val_pixels, test_pixels: uint8 ``[N, D]`` (contiguous).
        train_labels, val_labels, test_labels: int64 ``[N]``; ``-1`` where there is no label.
        dequantize: whether the float views (``train``, ``loader`` …) are dequantised by
            default (``(pixel + u)/256``) instead of ``pixel/255``.
        seed: seeds the dequantisation noise (and was used for the split).
        classes: class names by label index, when known.
        metadata: how the data was made (root, crop, sizes …), for logs.
        sources: per split, where each row comes from (one string per row: a file path
            below the dataset's folder, or ``"<pool>:<row>"`` of the dataset's own files;
            :meth:`~mfa.data.sources.pools.Pools.source_names`); empty when not known.
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
    sources: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.image_shape = check_image_shape(self.image_shape)
        self.seed = check_key_part(self.seed, "seed")
        d = self.n_features
        for split in SPLITS:
            pix = getattr(self, f"{split}_pixels")
            lab = getattr(self, f"{split}_labels")
            check_uint8(pix, f"{split}_pixels")
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
            names = self.sources.get(split)
            if names is not None and len(names) != pix.shape[0]:
                raise ValueError(f"sources[{split!r}] must name each of the {pix.shape[0]} "
                                 f"rows, got {len(names)} names")
        unknown = set(self.sources) - set(SPLITS)
        if unknown:
            raise ValueError(f"sources has keys {sorted(unknown)}; splits are {SPLITS}")

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
        return getattr(self, f"{check_split(split)}_pixels")

    def labels(self, split: Split) -> Tensor:
        """The int64 labels ``[N]`` of ``split`` (``-1``: unlabelled)."""
        return getattr(self, f"{check_split(split)}_labels")

    def source_names(self, split: Split) -> list[str] | None:
        """Where each row of ``split`` comes from (see ``sources``), or ``None``."""
        return self.sources.get(check_split(split))

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
        split = check_split(split)
        return ImageDataset(
            self.pixels(split),
            self.labels(split),
            image_shape=self.image_shape,
            dequantize=self.dequantize if dequantize is None else dequantize,
            seed=self.seed,
            stream=SPLIT_STREAM[split],
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
        check_positive_int(batch_size, "batch_size")
        if isinstance(seed, torch.Generator):
            gen = seed
        else:  # (int() ran seed=2.7 as 2; the message names the Generator it also takes)
            if seed is not None and (isinstance(seed, bool)
                                     or not isinstance(seed, numbers.Integral)):
                raise TypeError(f"seed must be an int, a torch.Generator or None, got "
                                f"{type(seed).__name__} {seed!r}")
            gen = seeded_generator(0x5AFF, self.seed if seed is None else int(seed))
        return DataLoader(
            self.dataset(split, dequantize=dequantize, with_labels=with_labels, dtype=dtype),
            batch_size=batch_size,
            shuffle=shuffle,
            # (unshuffled, a generator of its own all the same: without one, each pass drew
            # its base seed from torch's global RNG)
            generator=gen if shuffle else torch.Generator(),
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
        float32; see ``docs/data.md`` on memory). ``dequantize=None``: this data's default."""
        ds = self.dataset(split, dequantize=dequantize, dtype=dtype)
        n = len(ds)
        if not ds.dequantize:
            out = pixels_to_float(ds.pixels, dtype)
        else:
            out = torch.empty((n, self.n_features), dtype=dtype)
            step = 4096
            for start in range(0, n, step):
                out[start : start + step] = ds.rows(range(start, min(start + step, n)))
        return out if device is None else out.to(device)

    def seeded_rows(self, split: Split, most: int, seed: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
        """Float rows ``[n, D]`` of ``split`` (its own dequantisation noise, as
        :meth:`as_float`): every row where it has at most ``most``, else a seeded subset of
        ``most`` (the first of ``torch.randperm`` with ``seed``, in split order), converted
        4,096 rows at a time (no float copy of the whole split). ``seed``: an int in
        ``[0, 2**63)``, as a run's seed (``int()`` ran 2.7 as 2 and ``"2"`` as 2)."""
        seed = check_key_part(seed, "seed", minimum=0)
        if seed >= 2**63:  # (torch's generator failed with "Overflow when unpacking long")
            raise ValueError(f"seed must be below 2**63, got {seed}")
        n = self.pixels(split).shape[0]
        index = torch.arange(n)
        if n > most:
            index = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
            index = index[:most].sort().values
        dataset = self.dataset(split, dtype=dtype)
        out = torch.empty((index.numel(), self.n_features), dtype=dtype)
        for start in range(0, index.numel(), 4096):
            out[start:start + 4096] = dataset.rows(index[start:start + 4096])
        return out

    def quantized(
        self,
        split: Split,
        *,
        dequantize: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantizedRows:
        """``split`` as :class:`~mfa.data.QuantizedRows`: uint8 rows (on ``device``, 1 byte
        per value) that a trainer makes float batch by batch. ``dequantize=None``: this data's
        default. Its dequantisation noise is hashed on the device, so it differs from that of
        :meth:`as_float` and :meth:`loader` (see ``docs/data.md``)."""
        split = check_split(split)
        rows = QuantizedRows(
            self.pixels(split),
            dequantize=self.dequantize if dequantize is None else dequantize,
            seed=self.seed, stream=SPLIT_STREAM[split], dtype=dtype,
        )
        return rows if device is None else rows.to(device)

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
