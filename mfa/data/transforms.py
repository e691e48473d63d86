"""Crop and resize: the ``crop``/``image_size`` options of :func:`~mfa.data.load_dataset`,
applied to PIL images and to uint8 image tensors ``[N, C, H, W]`` alike.

``crop`` is a ``(top, left, height, width)`` box; ``image_size`` is an int ``s`` (shorter side
to ``s``, then the centre ``s × s``) or ``(H, W)``. Resizing is bilinear with antialiasing
and comes after the crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_crop",
    "check_crop_fits",
    "check_size",
    "shape_of_transform",
    "transform",
    "transform_tensor",
]


def check_size(size: object) -> tuple[int, ...] | None:
    """``image_size`` as ``None``, ``(s,)`` or ``(H, W)`` (``ValueError`` otherwise)."""
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


def check_crop(crop: object) -> tuple[int, int, int, int]:
    """``crop`` as a ``(top, left, height, width)`` tuple (``ValueError`` otherwise)."""
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


def check_crop_fits(crop, h: int, w: int, what: str) -> None:
    """The box ``crop`` must lie inside an ``h × w`` image (``what`` names it in the error)."""
    top, left, height, width = crop
    if top + height > h or left + width > w:
        raise ValueError(
            f"crop (top={top}, left={left}, height={height}, width={width}) does not fit "
            f"{what} of height {h} and width {w}"
        )


def shape_of_transform(
    chw: Sequence[int], crop: tuple[int, int, int, int] | None, size: tuple[int, ...] | None
) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image of shape ``chw`` after :func:`transform`."""
    c, h, w = (int(v) for v in chw)
    if crop is not None:
        check_crop_fits(crop, h, w, "the images")
        h, w = crop[2], crop[3]
    if size is not None:
        h, w = (size[0], size[0]) if len(size) == 1 else size
    return c, h, w


def transform(img, crop, size):
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


def transform_tensor(images: Tensor, crop, size, chunk: int = 8192) -> Tensor:
    """Crop then resize uint8 images ``[N, C, H, W]`` (resized ``chunk`` images at a time)."""
    if crop is not None:
        check_crop_fits(crop, images.shape[2], images.shape[3], "the images")
        top, left, height, width = crop
        images = images[:, :, top : top + height, left : left + width]
    if size is None:
        return images
    crop = None
    if images.shape[0] == 0:
        c, h, w = shape_of_transform(images.shape[1:], crop, size)
        return images.new_empty((0, c, h, w))
    return torch.cat(
        [transform(images[i : i + chunk], crop, size) for i in range(0, images.shape[0], chunk)]
    )
