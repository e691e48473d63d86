"""Pixel layout and value scales: flat CHW rows ↔ images, ``pixel/255`` and dequantisation.

An image ``[C, H, W]`` is one row of ``D = C·H·W`` values, ``index = c·H·W + h·W + w``
(``images.reshape(N, D)``). Plain values are ``pixel / 255`` in ``[0, 1]``; dequantised values
are ``(pixel + u) / 256`` with ``u ~ U[0, 1)`` in ``[0, 1)``. See ``docs/data.md``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from mfa.data.checks import check_uint8

__all__ = [
    "LOG_PIXEL_LEVELS",
    "PIXEL_LEVELS",
    "check_dequantized_dtype",
    "check_image_shape",
    "dequantize",
    "dequantize_with_noise",
    "pixels_to_float",
    "to_images",
    "to_rows",
]

#: Number of grey levels of an 8-bit pixel.
PIXEL_LEVELS = 256
#: ``log 256``: the per-dimension change of log-density between ``[0, 256)`` and ``[0, 1)``.
LOG_PIXEL_LEVELS = math.log(PIXEL_LEVELS)


def check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a ``(C, H, W)`` tuple of positive ints (``ValueError`` otherwise; a float
    such as 28.7 is refused, not truncated)."""
    try:
        if any(isinstance(v, bool) for v in shape):
            raise TypeError
        out = tuple(operator.index(v) for v in shape)  # ints (numpy's and 0-d tensors too)
    except TypeError:
        raise ValueError(f"image_shape must be (C, H, W) of ints, got {shape!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {shape!r}")
    return out  # type: ignore[return-value]


def check_dequantized_dtype(dtype: torch.dtype) -> None:
    """``dtype`` must hold dequantised values: float32 or float64 (``TypeError`` for a dtype
    that is not floating point, ``ValueError`` for a narrower one).

    ``pixel + u`` is formed in ``dtype``; the pixel level takes 8 of its significant bits, so
    float16 (11) keeps 3 bits of ``u`` (8 noise levels) and bfloat16 (8) none: ``u`` vanishes
    and the values are ``pixel/256``, which no density can be fitted to."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    info = torch.finfo(dtype)
    if info.bits < 32:
        significant = round(-math.log2(info.eps)) + 1
        kept = max(significant - 8, 0)
        raise ValueError(
            f"dequantised values cannot be {dtype}: (pixel + u)/256 is formed in the output "
            f"dtype, whose {significant} significant bits leave {kept} bit(s) of the noise u "
            f"({2**kept if kept else 'no'} noise levels per pixel level); use float32 or "
            "float64, or dequantize=False"
        )


def pixels_to_float(pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``pixels / 255`` as ``dtype``: uint8 levels 0..255 to values in ``[0, 1]``."""
    check_uint8(pixels, "pixels")
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
        dtype: float32 or float64, the dtype of the result (float16 and bfloat16 are
            refused: see :func:`check_dequantized_dtype`).

    Returns:
        A tensor of ``pixels``' shape with values in ``[pixel/256, (pixel+1)/256)`` ⊂ ``[0, 1)``.
        Bits per dimension of a density over these values: :func:`mfa.metrics.bits_per_dim`.
    """
    check_uint8(pixels, "pixels")
    check_dequantized_dtype(dtype)
    noise = torch.rand(pixels.shape, generator=generator, dtype=dtype, device=pixels.device)
    return dequantize_with_noise(pixels, noise)


def dequantize_with_noise(pixels: Tensor, noise: Tensor) -> Tensor:
    """``(pixels + noise) / 256``, written into ``noise`` (float, ``u ∈ [0, 1)`` of
    ``pixels``' shape): the one rule of dequantisation, whatever draws the noise.

    Every value stays below ``(pixel + 1)/256``: ``pixel + u`` rounds up to ``pixel + 1``
    in the dtype when ``u`` is within half an ulp of 1 (float32 keeps 24 bits, so for pixels
    ≥ 128 about 3 values in 10⁶ would), and such a value becomes the largest one below.
    ``noise`` must be float32 or float64 (:func:`check_dequantized_dtype`)."""
    check_dequantized_dtype(noise.dtype)
    out = noise.add_(pixels).div_(PIXEL_LEVELS)
    upper = pixels.to(out.dtype).add_(1).div_(PIXEL_LEVELS)  # exact: a multiple of 2⁻⁸
    return torch.minimum(out, torch.nextafter(upper, torch.zeros((), dtype=out.dtype,
                                                                   device=out.device)), out=out)


def to_images(rows: Tensor, image_shape: Sequence[int]) -> Tensor:
    """Reshape flat rows ``[..., D]`` into images ``[..., C, H, W]``.

    ``rows`` are in CHW order (``index = c·H·W + h·W + w``) and ``image_shape`` is
    ``(C, H, W)`` with ``C·H·W = D``; e.g. ``[N, D]`` becomes ``[N, C, H, W]``, ready for
    :func:`torchvision.utils.make_grid`. Values and dtype are unchanged (a view when possible).
    """
    if not isinstance(rows, Tensor):
        raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
    shape = check_image_shape(image_shape)
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
