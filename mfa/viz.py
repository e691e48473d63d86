"""Image grids, inpainting and factor figures and training curves (masks: :mod:`mfa.masks`).

Conventions:

* Images are float tensors ``[N, C, H, W]`` with values in ``[0, 1]`` (clamped for display;
  NaN shows as 0), or uint8 pixels (drawn as they are). ``C`` is 1 (grayscale) or 3 (RGB).
  A float ``x`` is drawn as the pixel it stands for (:func:`to_pixels`): ``round(255·x)``
  for ``pixel/255`` data (the default), ``floor(256·x)`` with ``dequantized=True`` for
  dequantised ``(pixel + u)/256`` data and a model of them (their samples, means and
  inpainted pixels), so a dequantised row shows its stored pixel, not ``pixel ± 1``.
* Data rows are flattened channel-first (CHW): feature ``c·H·W + h·W + w`` is channel ``c``,
  row ``h``, column ``w`` (:func:`rows_to_images`, :func:`images_to_rows`).
* Grids are returned as ``PIL.Image`` in mode ``"L"`` (8-bit grayscale) for ``C = 1`` and
  ``"RGB"`` for ``C = 3`` (and for grayscale inpainting figures with a coloured hidden
  marker). Like ``torchvision.utils.make_grid``, ``nrow`` is the number of images per row and
  ``padding`` pixels of ``pad_value`` surround every cell.
* Masks are bool ``[N, D]`` *observed* masks: ``True`` where a pixel is visible, ``False``
  where it is hidden and must be inpainted. A mask hides all channels of a pixel.
* Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global state);
  :func:`plot_training_curve` lives in :mod:`mfa._curves`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from mfa._curves import plot_training_curve
from mfa._temporaries import IfExists, write_atomically
from mfa._validation import check_positive_int, is_real_number
from mfa.data import check_image_shape, to_images, to_rows

if TYPE_CHECKING:
    from mfa.model import MixtureOfFactorAnalyzers

__all__ = [
    "MAX_FIGURE_PIXELS",
    "check_figure_size",
    "factor_grid",
    "grid_size",
    "image_grid",
    "images_to_rows",
    "inpainting_grid",
    "plot_training_curve",
    "rows_to_images",
    "sample_grid",
    "save_image",
    "save_image_grid",
    "to_pixels",
    "upscale",
]

#: Default colour of hidden pixels in the masked-input column of :func:`inpainting_grid`:
#: magenta, which neither digits nor natural photographs contain.
HIDDEN_COLOR = (1.0, 0.0, 1.0)


# ---------------------------------------------------------------------------- shapes


def rows_to_images(x: Tensor, image_shape: Sequence[int]) -> Tensor:
    """``[N, D]`` rows → ``[N, C, H, W]`` images (CHW order: ``d = c·H·W + h·W + w``); the
    batched case of :func:`mfa.data.to_images`."""
    if isinstance(x, Tensor) and x.dim() != 2:
        raise ValueError(f"x must have shape [N, C*H*W], got {tuple(x.shape)}")
    return to_images(x, image_shape)


def images_to_rows(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` → ``[N, C·H·W]``, the inverse of :func:`rows_to_images`."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {_shape_of(images)}")
    return to_rows(images)


def _shape_of(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


# ---------------------------------------------------------------------------- grids


def to_pixels(x: Tensor, *, dequantized: bool = False) -> Tensor:
    """Float values → the uint8 pixels they stand for, ``x``'s shape: ``round(255·x)`` for
    ``pixel/255`` values, ``floor(256·x)`` for dequantised ``(pixel + u)/256`` values
    (``dequantized=True``, as :func:`mfa.outliers.quantize`), clipped to ``0..255``; NaN
    gives 0. Computed in ``x``'s dtype (float16 and bfloat16 in float32): a float64 row cast
    to float32 first could round ``(pixel + u)/256`` up to ``(pixel + 1)/256``."""
    _check_dequantized(dequantized)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor, got {got}")
    if torch.finfo(x.dtype).bits < 32:
        x = x.float()
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    pixels = torch.floor(x * 256.0) if dequantized else torch.floor(x.clamp(0, 1) * 255 + 0.5)
    return pixels.clamp_(0, 255).to(torch.uint8)


def _check_dequantized(dequantized: object) -> None:
    if not isinstance(dequantized, bool):  # ("no" would draw as True)
        raise TypeError(f"dequantized must be True or False, got {dequantized!r}")


def _as_images(images: Tensor, dequantized: bool = False) -> Tensor:
    """Validate and convert to uint8 ``[N, C, H, W]`` on the CPU (uint8 as it is, floats by
    :func:`to_pixels`)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:  # [N, H, W] grayscale
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images must contain at least one image, got N = 0")
    _check_dequantized(dequantized)
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (or uint8), got {images.dtype}")
    return to_pixels(images, dequantized=dequantized)


def _grey(value: float) -> int:
    """A display grey level in ``[0, 1]`` (padding, the hidden marker) as a pixel 0..255."""
    return int(to_pixels(torch.tensor(float(value), dtype=torch.float64)))


#: The most pixels a saved figure may have after upscaling (2^28: 0.8 GB as RGB); a larger
#: one is refused before it is drawn (PIL ran out of memory, with a traceback, after the work).
MAX_FIGURE_PIXELS = 2**28


def grid_size(n: int, nrow: int, height: int, width: int, padding: int = 2) -> tuple[int, int]:
    """``(width, height)`` in pixels of a grid of ``n`` images ``height × width``, ``nrow`` a
    row (as :func:`image_grid` lays them out)."""
    n, nrow = check_positive_int(n, "n"), check_positive_int(nrow, "nrow")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return cols * (width + padding) + padding, rows * (height + padding) + padding


def check_figure_size(width: int, height: int, scale: int) -> None:
    """Refuse a ``width × height`` figure that upscaled ``scale`` times would have more than
    :data:`MAX_FIGURE_PIXELS` pixels (a ``ValueError`` naming the sizes)."""
    pixels = width * scale * height * scale
    if pixels > MAX_FIGURE_PIXELS:
        raise ValueError(
            f"a {width}×{height}-pixel figure upscaled {scale}× would have {pixels:,} pixels, "
            f"more than mfa.viz.MAX_FIGURE_PIXELS = {MAX_FIGURE_PIXELS:,}; use a smaller scale "
            "(--scale, output.image_scale) or fewer images")


def _grid_tensor(images: Tensor, nrow: int, padding: int, pad_value: float) -> Tensor:
    """uint8 ``[N, C, H, W]`` → uint8 ``[C, H', W']`` with ``nrow`` images per row."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    width, height = grid_size(n, nrow, h, w, padding)
    grid = images.new_full((c, height, width), _grey(pad_value))
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def _to_pil(grid: Tensor) -> Image.Image:
    """uint8 ``[C, H, W]`` → PIL ``"L"`` (C = 1) or ``"RGB"`` (C = 3)."""
    array = grid.permute(1, 2, 0).contiguous().numpy()
    if grid.shape[0] == 1:
        return Image.fromarray(array[:, :, 0])
    return Image.fromarray(array)


def _check_grid_args(nrow: int, padding: int, pad_value: float) -> tuple[int, int]:
    """``(nrow, padding)`` as ints: numpy integers too (as :func:`grid_size` takes them)."""
    if isinstance(nrow, bool) or not isinstance(nrow, numbers.Integral) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if not is_real_number(pad_value):  # (a string failed in float(), unnamed)
        raise TypeError(f"pad_value must be a number in [0, 1], got {pad_value!r}")
    if not 0.0 <= float(pad_value) <= 1.0:
        raise ValueError(f"pad_value must be in [0, 1], got {pad_value!r}")
    return int(nrow), int(padding)


def image_grid(
    images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0, *,
    dequantized: bool = False,
) -> Image.Image:
    """Tile images into one 8-bit picture.

    Args:
        images: ``[N, C, H, W]`` (or ``[N, H, W]``: ``N`` grey images, so one RGB image
            ``[3, H, W]`` is drawn as three grey ones: pass ``image[None]``), float in
            ``[0, 1]`` (clamped) or uint8 (drawn as it is); ``C`` is 1 or 3.
        nrow: images per row; the grid has ``ceil(N / nrow)`` rows, empty cells are
            ``pad_value``.
        padding: pixels between cells and around the border.
        pad_value: grey level of the padding, in ``[0, 1]``.
        dequantized: float images are dequantised ``(pixel + u)/256`` values (or a model of
            them): drawn as ``floor(256·x)``, not ``round(255·x)`` (:func:`to_pixels`).

    Returns:
        A ``PIL.Image`` of width ``cols·(W + padding) + padding`` and height
        ``rows·(H + padding) + padding`` (``cols = min(nrow, N)``), mode ``"L"`` for
        ``C = 1`` and ``"RGB"`` for ``C = 3``.
    """
    nrow, padding = _check_grid_args(nrow, padding, pad_value)
    return _to_pil(_grid_tensor(_as_images(images, dequantized), nrow, padding, pad_value))


def upscale(image: Image.Image, scale: int) -> Image.Image:
    """Enlarge by an integer factor with nearest-neighbour resampling (crisp pixels)."""
    if not isinstance(scale, numbers.Integral) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    scale = int(scale)  # (numpy integers too, as nrow and padding take them)
    check_figure_size(image.width, image.height, scale)
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def save_image(image: Image.Image, path: str | os.PathLike[str], *, scale: int = 1,
               if_exists: IfExists = "replace") -> Path:
    """Save a PIL image (format from the suffix, e.g. ``.png``), creating parent folders;
    ``if_exists`` as :func:`mfa._temporaries.write_atomically`'s. Returns the path written."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:  # (the temporary's suffix would hide PIL's own error)
        raise ValueError(f"unknown image file extension: {path.name!r}")
    image = upscale(image, scale)  # (its size check first: a refused figure left a folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda temporary: image.save(temporary, format=image_format),
                            if_exists=if_exists)


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int = 8,
    *,
    padding: int = 2,
    pad_value: float = 1.0,
    scale: int = 1,
    if_exists: IfExists = "replace",
    dequantized: bool = False,
) -> Path:
    """:func:`image_grid` saved to ``path``, upscaled ``scale`` times (nearest neighbour).

    ``scale=3`` makes a grid of 28×28 digits readable on screen. Returns the path written
    (``if_exists``: see :func:`save_image`; ``dequantized``: see :func:`image_grid`).
    """
    grid = image_grid(images, nrow, padding, pad_value, dequantized=dequantized)
    return save_image(grid, path, scale=scale, if_exists=if_exists)


def sample_grid(
    model: MixtureOfFactorAnalyzers,
    n: int,
    image_shape: Sequence[int],
    nrow: int = 8,
    *,
    generator: torch.Generator | None = None,
    padding: int = 2,
    dequantized: bool = False,
) -> Image.Image:
    """A grid of ``n`` samples of ``model`` (rows reshaped to ``image_shape``, clamped;
    ``dequantized``: a model of dequantised data, see :func:`image_grid`)."""
    with torch.no_grad():
        x, _ = model.sample(n, generator=generator)
    return image_grid(rows_to_images(x, image_shape), nrow, padding, dequantized=dequantized)


# ---------------------------------------------------------------------------- inpainting


def _check_rows(x: Tensor, name: str, n: int | None, d: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != d or (n is not None and x.shape[0] != n):
        expected = f"[{n if n is not None else 'N'}, {d}]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    return x.detach().cpu()


def inpainting_grid(
    original: Tensor,
    masked_input: Tensor | None,
    mean: Tensor,
    samples: Tensor | None,
    image_shape: Sequence[int],
    mask: Tensor,
    *,
    hidden_color: float | Sequence[float] = HIDDEN_COLOR,
    padding: int = 2,
    pad_value: float = 1.0,
    dequantized: bool = False,
) -> Image.Image:
    """One row per image: original | masked input | conditional mean | S samples.

    Args:
        original: ``[N, D]`` the complete images: float, or the stored uint8 pixels (drawn
            as they are; a dequantised dataset's ``data.pixels(split)[rows]``).
        masked_input: ``[N, D]`` what the model was given (``None``: ``original``); its hidden
            pixels are painted ``hidden_color``, so only the observed pixels are shown.
        mean: ``[N, D]`` the conditional means ``E[x_hidden | x_observed]``.
        samples: ``[S, N, D]`` conditional samples, or ``None`` for none.
        image_shape: ``(C, H, W)`` with ``D = C·H·W``.
        mask: bool ``[N, D]`` (or ``[D]`` for all rows), ``True`` where observed.
        hidden_color: RGB triple in ``[0, 1]`` (default magenta) or one grey level. A grey
            level keeps grayscale images in mode ``"L"``; a colour makes the figure RGB.
        dequantized: the float rows are dequantised ``(pixel + u)/256`` values and the
            model's outputs over them: drawn as ``floor(256·x)`` (:func:`to_pixels`).

    Returns:
        A ``PIL.Image`` with ``N`` rows and ``3 + S`` columns.
    """
    c, h, w = check_image_shape(image_shape)
    d = c * h * w
    original = _check_rows(original, "original", None, d)
    n = original.shape[0]
    masked_input = original if masked_input is None else masked_input
    masked_input = _check_rows(masked_input, "masked_input", n, d)
    mean = _check_rows(mean, "mean", n, d)
    if samples is None:
        samples = mean.new_zeros(0, n, d)
    if not isinstance(samples, Tensor) or samples.dim() != 3 or samples.shape[1:] != (n, d):
        raise ValueError(f"samples must have shape [S, {n}, {d}], got {_shape_of(samples)}")
    samples = samples.detach().cpu()
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = observed), got {got}")
    mask = mask.detach().cpu()
    if mask.dim() == 1:
        mask = mask.expand(n, -1)
    if tuple(mask.shape) != (n, d):
        raise ValueError(f"mask must have shape [{n}, {d}] or [{d}], got {tuple(mask.shape)}")

    if is_real_number(hidden_color):
        color = [float(hidden_color)] * (1 if c == 1 else 3)
    else:
        color = _rgb(hidden_color)
    if not all(0.0 <= v <= 1.0 for v in color):
        raise ValueError(f"hidden_color values must be in [0, 1], got {hidden_color!r}")
    out_c = max(c, len(color))

    def images(rows: Tensor) -> Tensor:
        x = _as_images(rows_to_images(rows, (c, h, w)), dequantized)
        return x.expand(-1, out_c, -1, -1) if x.shape[1] != out_c else x

    shown = images(masked_input).clone()
    hidden = ~rows_to_images(mask, (c, h, w)).all(dim=1)  # [N, H, W], any channel hidden
    fill = torch.tensor([_grey(v) for v in color], dtype=torch.uint8)
    fill = fill.view(out_c, 1, 1).expand(out_c, h, w)
    shown = torch.where(hidden.unsqueeze(1), fill, shown)

    columns = [images(original), shown, images(mean)] + [images(s) for s in samples]
    cells = torch.stack(columns, dim=1).reshape(-1, out_c, h, w)  # row-major: image, column
    _check_grid_args(len(columns), padding, pad_value)
    return _to_pil(_grid_tensor(cells, len(columns), padding, pad_value))


def _rgb(hidden_color: object) -> list[float]:
    """An RGB triple of numbers as floats (a colour name failed in float(), unnamed)."""
    try:
        if isinstance(hidden_color, str) or any(isinstance(v, str) for v in hidden_color):
            raise TypeError
        color = [float(v) for v in hidden_color]
    except (TypeError, ValueError):
        raise TypeError(f"hidden_color must be a grey level or an RGB triple of numbers in "
                        f"[0, 1], got {hidden_color!r}") from None
    if len(color) != 3:
        raise ValueError(f"hidden_color must be a grey level or an RGB triple, "
                         f"got {hidden_color!r}")
    return color


# ---------------------------------------------------------------------------- factors


def _normalise(x: Tensor) -> Tensor:
    """Min-max scale to [0, 1] (jointly over channels); a constant image becomes 0.5."""
    low, high = x.min(), x.max()
    if float(high - low) <= 0:
        return torch.full_like(x, 0.5)
    return (x - low) / (high - low)


def factor_grid(
    model: MixtureOfFactorAnalyzers,
    component: int | Sequence[int],
    image_shape: Sequence[int],
    scale: float = 2.0,
    *,
    max_factors: int | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    dequantized: bool = False,
) -> Image.Image:
    """What each factor of a component does, as in the factor figure of "On GANs and GMMs".

    One row per component ``k``::

        μ_k | √d_k | μ_k − c·A_k1 | A_k1 | μ_k + c·A_k1 | ... | μ_k − c·A_kL | A_kL | μ_k + c·A_kL

    ``μ_k ± c·A_ki`` are clamped to [0, 1]; the noise standard deviation ``√d_k`` and each
    column ``A_ki`` are min-max normalised to [0, 1] for display (a constant image shows as
    mid grey). ``dequantized``: a model of dequantised data, whose ``μ_k`` and ``μ_k ± c·A_ki``
    are drawn as ``floor(256·x)`` (:func:`to_pixels`; the normalised cells as
    ``round(255·x)``).

    Args:
        model: a trained model over ``D = C·H·W`` features.
        component: one component index or several (one row each).
        image_shape: ``(C, H, W)``.
        scale: ``c``, how far to move along each factor (in latent standard deviations).
        max_factors: show at most this many factors per component (default all ``L``).
    """
    c, h, w = check_image_shape(image_shape)
    if model.n_features != c * h * w:
        raise ValueError(f"image_shape {(c, h, w)} has {c * h * w} pixels but the model has "
                         f"n_features={model.n_features}")
    single = isinstance(component, numbers.Integral) or (
        isinstance(component, Tensor) and component.dim() == 0)
    components = [component] if single else list(component)
    if not components:
        raise ValueError("component must name at least one component")
    for i, k in enumerate(components):  # (numpy or 0-d tensor integers too)
        if isinstance(k, Tensor) and k.dim() == 0 and not k.is_floating_point():
            k = k.item()
        if (not isinstance(k, numbers.Integral) or isinstance(k, bool)
                or not 0 <= k < model.n_components):
            raise ValueError(f"component must be in [0, {model.n_components}), got {k!r}")
        components[i] = int(k)
    n_factors = model.n_factors if max_factors is None else min(
        check_positive_int(max_factors, "max_factors", minimum=0), model.n_factors)
    with torch.no_grad():
        means = model.means.detach().cpu().float()
        loadings = model.factor_loadings.detach().cpu().float()
        noise_std = model.noise_variance.detach().cpu().float().sqrt()

    def pixels(x: Tensor) -> Tensor:  # μ_k (± c·A_ki): values on the data's scale
        return to_pixels(x, dequantized=dequantized)

    cells = []
    for k in components:
        mu = means[k]
        cells += [pixels(mu), to_pixels(_normalise(noise_std[k]))]
        for i in range(n_factors):
            a = loadings[k, :, i]
            cells += [pixels(mu - scale * a), to_pixels(_normalise(a)), pixels(mu + scale * a)]
    images = rows_to_images(torch.stack(cells), (c, h, w))
    return image_grid(images, 2 + 3 * n_factors, padding, pad_value)
