"""Tests of mfa.data.layout: CHW rows and images, pixel/255, dequantisation, bits/dim."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mfa import data as mdata
from mfa.data import (
    ImageDataset,
    QuantizedRows,
    bits_per_dim,
    check_image_shape,
    dequantize,
    load_dataset,
    pixels_to_float,
    to_images,
    to_rows,
)
from mfa.data.layout import dequantize_with_noise


def test_dequantize_function():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(40)
    x = dequantize(pixels, generator=torch.Generator().manual_seed(0))
    y = dequantize(pixels, generator=torch.Generator().manual_seed(0))
    z = dequantize(pixels, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and torch.equal(x, y) and not torch.equal(x, z)
    p = pixels.double()
    assert (x.double() >= p / 256).all() and (x.double() < (p + 1) / 256).all()
    assert 0 <= x.min() and x.max() < 1
    frac = x.double() * 256 - p
    assert abs(frac.mean().item() - 0.5) < 0.02  # u ~ U[0, 1)
    assert dequantize(pixels, dtype=torch.float64).dtype == torch.float64
    # p + u in float32 would round up to p + 1 for a few u near 1 (3 in 10⁶ at p = 200)
    bright = torch.full((2000, 1000), 200, dtype=torch.uint8)
    b = dequantize(bright, generator=torch.Generator().manual_seed(0))
    assert b.min() >= 200 / 256 and b.max() < 201 / 256
    assert torch.equal(pixels_to_float(pixels)[[0, 255]], torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(pixels.float())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_dequantised_values_in_half_precision_are_refused(half):
    """pixel + u was formed in the output dtype: in bfloat16 (8 significant bits) u vanished
    and every value was pixel/256; float16 (11 bits) kept 8 noise levels. Each place that
    takes a dtype for dequantised values refuses them; plain pixel/255 is still allowed."""
    pixels = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    name = re.escape(str(half))
    with pytest.raises(ValueError, match=rf"dequantised values cannot be {name}.*float32"):
        dequantize(pixels, dtype=half)
    with pytest.raises(ValueError, match=name):
        dequantize_with_noise(pixels, torch.rand(16, 16).to(half))
    with pytest.raises(ValueError, match=name):
        ImageDataset(pixels, dequantize=True, dtype=half)
    with pytest.raises(ValueError, match=name):
        QuantizedRows(pixels, dequantize=True, dtype=half)
    with pytest.raises(ValueError, match=name):
        QuantizedRows(pixels, dequantize=True).to(dtype=half)
    data = load_dataset("embedded-mnist", limit=4, dequantize=True)
    for view in (data.as_float, data.loader, data.quantized):
        with pytest.raises(ValueError, match=name):
            view("val", dtype=half)
    plain = data.as_float("val", dtype=half, dequantize=False)
    assert plain.dtype == half and torch.equal(plain, pixels_to_float(data.val_pixels, half))
    assert QuantizedRows(pixels, dtype=half)[0:16].dtype == half
    assert ImageDataset(pixels, dtype=half)[0].dtype == half


def test_bits_per_dim():
    # the uniform density on [0, 1)^D is the uniform distribution over the 256 levels: 8 bits
    assert bits_per_dim(0.0, 784) == pytest.approx(8.0)
    lp = torch.tensor([0.0, 784 * math.log(2)])
    torch.testing.assert_close(bits_per_dim(lp, 784), torch.tensor([8.0, 7.0]))
    assert mdata.LOG_PIXEL_LEVELS == pytest.approx(math.log(256))
    with pytest.raises(ValueError):
        bits_per_dim(0.0, 0)


def test_to_images_and_to_rows():
    imgs = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    rows = to_rows(imgs)
    assert rows.shape == (2, 60)
    assert rows[1, 2 * 20 + 3 * 5 + 4] == imgs[1, 2, 3, 4]  # c·H·W + h·W + w
    assert torch.equal(to_images(rows, (3, 4, 5)), imgs)
    assert to_images(rows[0], (3, 4, 5)).shape == (3, 4, 5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 60\]"):
        to_images(rows[:, :59], (3, 4, 5))
    with pytest.raises(ValueError):
        to_rows(torch.zeros(4, 5))


def test_check_image_shape():
    assert check_image_shape([3, 4, 5]) == (3, 4, 5)
    assert check_image_shape(torch.Size([1, 28, 28])) == (1, 28, 28)
    with pytest.raises(ValueError, match=r"\(C, H, W\) of positive ints"):
        check_image_shape((3, 0, 5))
    with pytest.raises(ValueError, match=r"\(C, H, W\) of positive ints"):
        check_image_shape((28, 28))
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\) of ints, got 'abc'"):
        check_image_shape("abc")
    # a float is refused, not truncated (28.7 became 28); numpy's and 0-d tensors' ints pass
    for bad in ((1, 28.7, 28), (1, 28.0, 28), (True, 28, 28)):
        with pytest.raises(ValueError, match=r"of ints, got"):
            check_image_shape(bad)
    assert check_image_shape((np.int64(1), torch.tensor(28), 28)) == (1, 28, 28)
