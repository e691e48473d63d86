"""Inpainting masks: which pixels of an image are observed and which are to be filled in.

A mask is a bool *observed* mask ``[N, D]`` over data rows flattened channel-first (CHW):
``True`` where a pixel is visible, ``False`` where it is hidden. A hidden pixel is hidden in
every channel. :data:`MASK_KINDS` names the kinds :func:`make_mask` builds.

PIL is imported only when a mask picture is read (kind ``"image"``), so the configuration
and the command line can list the mask kinds without loading an imaging library.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from mfa._validation import check_generator

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MASK_KINDS", "MISSING_KINDS", "MaskKind", "MissingKind", "make_mask",
           "missing_mask", "require_hidden"]

MaskKind = Literal["center", "top", "bottom", "left", "right", "random", "image"]
#: ``"center"``: the central square of half the side is hidden; ``"top"``/``"bottom"``/
#: ``"left"``/``"right"``: that half is hidden; ``"random"``: a ``fraction`` of the pixels is
#: hidden; ``"image"``: black pixels of a user mask image are hidden.
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)

MissingKind = Literal["none", "random", "block"]
#: How :func:`missing_mask` removes pixels from training images: ``"none"`` keeps them all;
#: ``"random"``: each image loses a ``rate`` of its pixels; ``"block"``: each image loses one
#: square of side ``block_size`` at a random place.
MISSING_KINDS: tuple[str, ...] = get_args(MissingKind)


def _pixel_mask_to_rows(hidden: Tensor, c: int) -> Tensor:
    """``hidden`` bool ``[N, H, W]`` → observed bool ``[N, C·H·W]`` (all channels alike)."""
    n, h, w = hidden.shape
    return (~hidden).unsqueeze(1).expand(n, c, h, w).reshape(n, c * h * w)  # (-1: n = 0 failed)


def _load_mask_image(mask_image: object, h: int, w: int) -> Tensor:
    """A mask picture (path or PIL image; black = hidden) → hidden bool ``[H, W]``: grey
    levels below half the format's range (128 of 8-bit, 32,768 of 16-bit) are hidden. A
    picture in an integer mode (``"I"``, ``"I;16"``: a 16-bit PNG, or 8-bit levels converted
    to one) is read as 8-bit when every level is at most 255, else as 16-bit."""
    from PIL import Image, UnidentifiedImageError  # only this mask kind needs PIL

    if isinstance(mask_image, (str, os.PathLike)):
        path = Path(mask_image).expanduser()
        if not path.is_file():  # (a folder was said not to exist)
            raise FileNotFoundError(f"mask image {path} "
                                    + ("is a folder, not an image file" if path.is_dir()
                                       else "does not exist"))
        try:
            with Image.open(path) as opened:
                opened.load()
                picture = opened.copy()
        except UnidentifiedImageError:  # (PIL's "cannot identify image file 'dup.yaml'")
            raise UnidentifiedImageError(f"mask image {path} is not an image file: give a "
                                         "PNG (black = hidden)") from None
    elif isinstance(mask_image, Image.Image):
        picture = mask_image
    else:
        raise TypeError(
            f"mask_image must be a path or a PIL image, got {type(mask_image).__name__}"
        )
    if picture.mode in SIXTEEN_BIT_MODES:  # convert("L") clipped every level >= 128 to white
        picture = picture.resize((w, h), Image.Resampling.NEAREST)
        grey = torch.from_numpy(np.asarray(picture).astype(np.int64).reshape(h, w))
        top = int(grey.max()) if grey.numel() else 0
        if grey.numel() and (int(grey.min()) < 0 or top > 65535):
            raise ValueError(f"mask image levels must lie in 0..65535 (an 8- or 16-bit grey "
                             f"picture), got {int(grey.min())}..{top} in mode {picture.mode}")
        # (8-bit levels in a 32-bit "I" picture, e.g. convert("I") of a PNG, were all hidden)
        return grey < (128 if top <= 255 else 32768)
    if picture.mode == "F":  # float levels: convert("L") made 0.0 and 1.0 grey 0 and 1,
        picture = picture.resize((w, h), Image.Resampling.NEAREST)  # both hidden
        grey = torch.from_numpy(np.asarray(picture, dtype=np.float64).reshape(h, w).copy())
        if not bool(torch.isfinite(grey).all()) or (grey.numel() and float(grey.min()) < 0):
            raise ValueError("mask image levels must be finite and >= 0 (mode F: 0..1, 0..255 "
                             "or 0..65535 grey)")
        top = float(grey.max()) if grey.numel() else 0.0
        return grey < (0.5 if top <= 1 else 128 if top <= 255 else 32768)
    picture = picture.convert("L").resize((w, h), Image.Resampling.NEAREST)
    grey = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(h, w)
    return grey < 128


#: PIL modes of 16-bit grey pictures (a 16-bit PNG opens as one of them).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def _count(value: object, name: str, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``: an int or a numpy integer, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _real(value: object, name: str) -> float:
    """``value`` as a float: a real number (numpy's included), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def make_mask(
    kind: str,
    image_shape: Sequence[int],
    n: int,
    generator: torch.Generator | None = None,
    fraction: float = 0.5,
    mask_image: str | os.PathLike[str] | Image.Image | None = None,
) -> Tensor:
    """Observed masks for inpainting: bool ``[n, C·H·W]``, ``True`` where a pixel is visible.

    Kinds (see :data:`MASK_KINDS`):

    * ``"center"``: the central ``H//2 × W//2`` rectangle (rows from ``(H − H//2)//2``) is
      hidden.
    * ``"top"`` / ``"bottom"``: the top ``H//2`` / bottom ``H//2`` rows are hidden.
    * ``"left"`` / ``"right"``: the left ``W//2`` / right ``W//2`` columns are hidden.
    * ``"random"``: exactly ``round(fraction·H·W)`` pixels are hidden, chosen independently
      per image with ``generator`` (CPU; ``None``: a generator seeded with 0, so the same call
      gives the same masks).
    * ``"image"``: ``mask_image`` (a path to a PNG or a PIL image) is converted to grey,
      resized to ``H × W`` with nearest-neighbour resampling, and its dark pixels (grey level
      below half the range: < 128 of 8-bit, < 32,768 of a 16-bit PNG) are hidden; the same
      mask for every image.

    A hidden pixel is hidden in every channel. The masks are on the CPU.
    """
    # The pixel-layout rule lives with the data; imported here so that importing this module
    # (for MASK_KINDS) stays free of the data loaders and PIL.
    from mfa.data import check_image_shape

    c, h, w = check_image_shape(image_shape)
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    n = _count(n, "n")
    check_generator(generator)  # (a string failed inside torch.rand with its signatures)
    hidden = torch.zeros(h, w, dtype=torch.bool)
    if kind == "center":  # centred also for odd sides (h // 4 hid the corner pixel of 3×3)
        top, left = (h - h // 2) // 2, (w - w // 2) // 2
        hidden[top : top + h // 2, left : left + w // 2] = True
    elif kind == "top":
        hidden[: h // 2] = True
    elif kind == "bottom":
        hidden[h - h // 2 :] = True
    elif kind == "left":
        hidden[:, : w // 2] = True
    elif kind == "right":
        hidden[:, w - w // 2 :] = True
    elif kind == "image":
        if mask_image is None:
            raise ValueError("kind 'image' needs mask_image (a PNG path or a PIL image)")
        hidden = _load_mask_image(mask_image, h, w)
    else:  # random
        fraction = _real(fraction, "fraction")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        n_hidden = round(fraction * h * w)
        order = torch.rand(n, h * w, generator=generator).argsort(dim=1)
        flat = torch.zeros(n, h * w, dtype=torch.bool)
        flat.scatter_(1, order[:, :n_hidden], True)
        return _pixel_mask_to_rows(flat.view(n, h, w), c)
    if kind != "image" and not bool(hidden.any()):
        raise ValueError(f"a {kind!r} mask of {h}×{w} images hides no pixel (it hides half a "
                         "side of 2 or more pixels); use another kind or a larger image")
    return _pixel_mask_to_rows(hidden.expand(n, h, w), c)


def require_hidden(observed: Tensor, kind: str) -> Tensor:
    """``observed`` (bool ``[n, D]``) when it hides some pixel, for figures of inpainting:
    a mask that hides nothing (``"random"`` with ``fraction·H·W`` rounding to 0, an
    ``"image"`` mask without a dark pixel) would show every image unchanged.

    Raises:
        ValueError: naming ``kind`` when every entry is observed.
    """
    if observed.numel() and bool(observed.all()):
        why = {"random": "its fraction of the pixels rounds to 0 of them",
               "image": "the mask image has no dark pixel (grey level below half the range)"}
        raise ValueError(f"the {kind!r} mask hides no pixel"
                         + (f": {why[kind]}" if kind in why else "")
                         + "; inpainting would show every image unchanged")
    return observed


def missing_mask(
    kind: str,
    image_shape: Sequence[int],
    n: int,
    generator: torch.Generator,
    *,
    rate: float = 0.25,
    block_size: int = 14,
) -> Tensor:
    """Observed masks of incomplete training images: bool ``[n, C·H·W]`` on the CPU.

    Kinds (see :data:`MISSING_KINDS`): ``"none"`` (all observed), ``"random"`` (as
    :func:`make_mask`'s ``"random"`` with ``fraction=rate``) and ``"block"``: one
    ``block_size × block_size`` square (clipped to the image) hidden per image, its top-left
    corner uniform over the places where it fits. ``generator`` (CPU) draws the masks.
    """
    from mfa.data import check_image_shape

    c, h, w = check_image_shape(image_shape)
    if kind not in MISSING_KINDS:
        raise ValueError(f"kind must be one of {MISSING_KINDS}, got {kind!r}")
    n = _count(n, "n")
    check_generator(generator, optional=False)  # (None drew from the global generator)
    if kind == "random":
        rate = _real(rate, "rate")
        if not 0 <= rate < 1 or round(rate * h * w) >= h * w:
            raise ValueError(f"rate must be in [0, 1) and hide fewer than all {h * w} pixels "
                             f"of an image, got {rate!r}: every pixel would be missing")
    if kind == "none":
        return torch.ones(n, c * h * w, dtype=torch.bool)
    if kind == "random":
        return make_mask("random", image_shape, n, generator, fraction=rate)
    block_size = _count(block_size, "block_size", 1)
    bh, bw = min(block_size, h), min(block_size, w)
    if (bh, bw) == (h, w):
        raise ValueError(f"block_size={block_size} hides the whole {h}×{w} image: every pixel "
                         "would be missing; use a block smaller than the image")
    top = torch.randint(0, h - bh + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, w - bw + 1, (n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hidden = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return _pixel_mask_to_rows(hidden, c)
