"""Rows kept as uint8 pixels wherever they live (on a GPU: 1 byte per value resident) and
made float only for the rows asked for: :class:`QuantizedRows`.

The trainers (:class:`~mfa.EMTrainer`, :class:`~mfa.SGDTrainer`) and every streamed
computation take a ``QuantizedRows`` where they take a tensor ``[N, D]``: they move its pixels
to the model's device once and index it batch by batch, so no float copy of the whole data is
made (CelebA at 64×64×3: 2.0 GB as uint8, 8.0 GB as float32).

Value scales (one rule each, from :mod:`mfa.data.layout`): ``pixel / 255``, or dequantised
``(pixel + u) / 256``. The noise ``u`` of pixel ``(i, j)`` is a hash of ``(seed, stream,
epoch, i, j)`` (``i`` the row's index in the data it was made from), computed on the pixels'
device: the same row always gets the same noise, whatever the batch size, order, subset,
process (under :mod:`torch.distributed`) or device, and the whole set dequantised at once
equals the batches concatenated. This is not the noise of
:class:`~mfa.data.ImageDataset` (a CPU generator per row, ~14 ns per value on one core, which
would bound a CelebA epoch at ~27 s): same distribution, other values.

The hash: a 32-bit key per row and one per column (each from two rounds of Chris Wellons'
``lowbias``-style integer mixer ``x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15;
x *= 0x735a2d97; x ^= x >> 15``, seeded by :func:`~mfa.data.splits.mix_seed`), their XOR
mixed once more; the top 24 bits give ``u = k · 2⁻²⁴``, exact in float32. Every product stays
below 2⁶³ in int64 (32-bit values, 31-bit constants), so CPUs and GPUs give the same bits.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from mfa.data.checks import check_uint8
from mfa.data.layout import check_dequantized_dtype, dequantize_with_noise, pixels_to_float
from mfa.data.splits import mix_seed

__all__ = ["QuantizedRows"]

#: Tag of the hashed dequantisation noise (another stream than ImageDataset's TAG_DEQUANT).
TAG_HASHED_NOISE = 0xDE0B
_MASK32 = 0xFFFFFFFF
#: int64 temporaries of the noise hash hold at most this many values at once.
_NOISE_CHUNK = 1 << 22


def check_key_part(value: object, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (Python's or numpy's; not a bool, a float or a string) of at least
    ``minimum`` where one is given: a part (seed, stream, epoch) of a noise key, hashed by
    :func:`~mfa.data.splits.mix_seed`. ``int()`` ran 1.5 as 1, ``"1"`` as 1 and ``True`` as 1.
    A seed may be negative (``load_dataset`` takes any int, and the hash any); the streams
    and epochs the library makes are counts, ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _mix32(x: Tensor) -> Tensor:
    """A bijective mixer of 32-bit values held in int64 ``[...]`` (products < 2⁶³)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def hashed_uniform(row_ids: Tensor, n_columns: int, key: int, dtype: torch.dtype) -> Tensor:
    """``u ∈ [0, 1)`` ``[len(row_ids), n_columns]`` on ``row_ids``' device: a function of
    ``(key, row id, column)`` only (see the module docstring).

    Args:
        row_ids: int64 ``[B]``, each in ``[0, 2³²)``.
        n_columns: ``D``.
        key: a 64-bit key (``mix_seed`` of the seed, stream and epoch).
        dtype: floating-point dtype of the result (24 random bits in any case).
    """
    k1, k2 = key & _MASK32, (key >> 32) & _MASK32
    rows = _mix32(_mix32(row_ids ^ k1) ^ k2)  # [B]
    cols = torch.arange(n_columns, dtype=torch.int64, device=row_ids.device)
    cols = _mix32(_mix32(cols ^ k2) ^ k1)  # [D]
    out = torch.empty(row_ids.shape[0], n_columns, dtype=dtype, device=row_ids.device)
    # 24-bit integers are exact in float32 (and overflow float16): scale them there.
    work = dtype if torch.finfo(dtype).bits >= 32 else torch.float32
    step = max(1, _NOISE_CHUNK // max(n_columns, 1))
    for start in range(0, row_ids.shape[0], step):
        bits = _mix32(rows[start : start + step, None] ^ cols) >> 8  # [b, D] in [0, 2²⁴)
        out[start : start + step] = bits.to(work).mul_(2.0**-24)
    if work != dtype:  # u near 1 rounds to 1 in a narrower dtype: keep u < 1
        below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
        out.clamp_(max=below_one.item())
    return out


class QuantizedRows:
    """uint8 rows ``[N, D]`` and the rule that makes them float, indexed like a tensor.

    ``rows[i : j]`` and ``rows[index]`` (a 1-d int64 tensor) give float rows ``[B, D]`` of
    ``dtype`` on ``pixels``' device, converted now: ``pixel / 255`` or, with
    ``dequantize=True``, ``(pixel + u) / 256`` with the hashed noise of the module docstring.
    :meth:`subset` keeps rows as uint8 (their noise follows them); :meth:`to` moves them.

    Args:
        pixels: uint8 ``[N, D]`` (any device; not copied).
        dequantize: add noise as above instead of dividing by 255.
        seed, stream, epoch: ints that key the noise (``stream`` tells splits apart; a new
            ``epoch`` gives fresh noise; ``stream`` and ``epoch`` ``>= 0``); no effect
            without ``dequantize``.
        dtype: floating-point dtype of the rows given out (with ``dequantize``: float32 or
            float64, see :func:`~mfa.data.layout.check_dequantized_dtype`).
        row_ids: int64 ``[N]``, each row's index in the data the noise is keyed by
            (``None``: ``0 … N−1``).

    Raises:
        TypeError: ``pixels`` not uint8, ``dtype`` not floating point, or ``seed``,
            ``stream`` or ``epoch`` not an int.
        ValueError: ``pixels`` not 2-d, ``row_ids`` not of shape ``[N]``, ``dtype``
            float16/bfloat16 with ``dequantize``, or a negative ``stream`` or ``epoch``.
    """

    def __init__(self, pixels: Tensor, *, dequantize: bool = False, seed: int = 0,
                 stream: int = 0, epoch: int = 0, dtype: torch.dtype = torch.float32,
                 row_ids: Tensor | None = None) -> None:
        check_uint8(pixels, "pixels")
        if pixels.dim() != 2:
            raise ValueError(f"pixels must have shape [N, D], got {tuple(pixels.shape)}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if dequantize:
            check_dequantized_dtype(dtype)
        if row_ids is not None and (row_ids.dtype != torch.int64
                                    or tuple(row_ids.shape) != (pixels.shape[0],)):
            raise ValueError(f"row_ids must be int64 of shape [{pixels.shape[0]}], got "
                             f"{row_ids.dtype} {tuple(row_ids.shape)}")
        self.pixels = pixels
        self.dequantize = bool(dequantize)
        self.seed = check_key_part(seed, "seed")
        self.stream = check_key_part(stream, "stream", minimum=0)
        self.epoch = check_key_part(epoch, "epoch", minimum=0)
        self.dtype = dtype
        self.row_ids = None if row_ids is None else row_ids.to(pixels.device)

    def _like(self, pixels: Tensor, row_ids: Tensor | None,
              dtype: torch.dtype | None = None) -> QuantizedRows:
        return QuantizedRows(pixels, dequantize=self.dequantize, seed=self.seed,
                             stream=self.stream, epoch=self.epoch,
                             dtype=self.dtype if dtype is None else dtype, row_ids=row_ids)

    @property
    def shape(self) -> torch.Size:
        """``(N, D)``."""
        return self.pixels.shape

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __repr__(self) -> str:
        return (f"QuantizedRows({tuple(self.shape)}, device={self.device}, dequantize="
                f"{self.dequantize}, seed={self.seed}, stream={self.stream}, "
                f"epoch={self.epoch}, dtype={self.dtype})")

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> QuantizedRows:
        """The same rows with the pixels on ``device`` (copied once, as uint8) and float
        rows of ``dtype`` (``None``: unchanged)."""
        pixels = self.pixels if device is None else self.pixels.to(device)
        ids = self.row_ids if self.row_ids is None or device is None else self.row_ids.to(device)
        return self._like(pixels, ids, dtype)

    def _ids(self, index: slice | Tensor) -> Tensor:
        if self.row_ids is not None:
            return self.row_ids[index]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return torch.arange(start, stop, step, dtype=torch.int64, device=self.device)
        return index.to(device=self.device, dtype=torch.int64) % max(len(self), 1)

    def subset(self, index: Tensor) -> QuantizedRows:
        """The rows ``index`` (int64 ``[M]``) as uint8, each keeping its own noise."""
        index = self._check_index(index)
        return self._like(self.pixels[index], self._ids(index))

    def _check_index(self, index) -> Tensor:
        if (not isinstance(index, Tensor) or index.dim() != 1
                or index.dtype not in (torch.int64, torch.int32)):
            raise TypeError(f"rows are indexed by a slice or a 1-d int64 tensor, got "
                            f"{type(index).__name__}"
                            f"{'' if not isinstance(index, Tensor) else ' ' + str(index.dtype)}")
        return index.to(self.device)

    def __getitem__(self, index: slice | Tensor) -> Tensor:
        """Float rows ``[B, D]`` of ``dtype`` on ``device`` (see the class docstring)."""
        if not isinstance(index, slice):
            index = self._check_index(index)
        pixels = self.pixels[index]  # [B, D] uint8
        if not self.dequantize:
            return pixels_to_float(pixels, self.dtype)
        key = mix_seed(TAG_HASHED_NOISE, self.seed, self.stream, self.epoch)
        noise = hashed_uniform(self._ids(index), pixels.shape[1], key, self.dtype)
        return dequantize_with_noise(pixels, noise)
