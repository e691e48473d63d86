"""Tests of mfa.data.image_data: float views of uint8 pixels, seeded dequantisation noise,
loaders and ImageDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfa.data import ImageDataset, load_dataset


def row_keys(pixels: torch.Tensor) -> list[bytes]:
    return [bytes(r) for r in pixels.numpy()]


def test_dequantised_views_are_deterministic_and_consistent():
    d = load_dataset("embedded-mnist", dequantize=True, seed=2, limit=64)
    v1, v2 = d.val, d.val
    assert torch.equal(v1, v2)
    p = d.val_pixels.double()
    assert (v1.double() >= p / 256).all() and (v1.double() < (p + 1) / 256).all()
    ds = d.dataset("val")
    assert torch.equal(ds[5], v1[5]) and torch.equal(ds[-1], v1[-1])
    # noise depends on (seed, split, epoch, row), not on batching or shuffling
    batches = list(d.loader("val", batch_size=10))
    assert torch.equal(torch.cat(batches), v1)
    shuffled = torch.cat(list(d.loader("val", batch_size=7, shuffle=True, seed=0)))
    position = {key: i for i, key in enumerate(row_keys(d.val_pixels))}
    source = [position[k] for k in row_keys((shuffled * 256).floor().to(torch.uint8))]
    assert sorted(source) == list(range(64)) and source != list(range(64))
    assert torch.equal(shuffled, v1[source])
    assert not torch.equal(d.train[:64], d.as_float("val"))  # splits get different noise
    ds.set_epoch(1)
    assert not torch.equal(ds[5], v1[5])
    ds.set_epoch(0)
    assert torch.equal(ds[5], v1[5])
    plain = d.as_float("val", dequantize=False)
    assert torch.equal(plain, d.val_pixels.float() / 255)
    other = load_dataset("embedded-mnist", dequantize=True, seed=3, limit=64)
    assert not torch.equal(other.val, v1)


def test_loader_shapes_labels_and_seeded_shuffle():
    d = load_dataset("embedded-mnist", limit=50)
    x, y = next(iter(d.loader("train", 16, with_labels=True)))
    assert x.shape == (16, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, d.train[:16])
    assert torch.equal(y, d.train_labels[:16])
    a = torch.cat(list(d.loader("train", 16, shuffle=True, seed=1)))
    b = torch.cat(list(d.loader("train", 16, shuffle=True, seed=1)))
    c = torch.cat(list(d.loader("train", 16, shuffle=True, seed=2)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort(0).values, d.train.sort(0).values)
    assert len(list(d.loader("train", 16, drop_last=True))) == 3
    x64 = d.as_float("test", dtype=torch.float64)
    assert x64.dtype == torch.float64
    with pytest.raises(ValueError, match="split"):
        d.pixels("validation")
    assert "embedded-mnist" in repr(d) and d.nbytes == 150 * 784 + 150 * 8


def test_image_dataset_direct_use():
    pix = torch.randint(0, 256, (6, 12), dtype=torch.uint8)
    ds = ImageDataset(pix, torch.arange(6), image_shape=(3, 2, 2), with_labels=True)
    row, label = ds[2]
    assert torch.equal(row, pix[2].float() / 255) and label == 2
    assert len(ds) == 6
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="image_shape"):
        ImageDataset(pix, image_shape=(1, 2, 2))
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset(pix.float())


def test_seeds_streams_and_epochs_must_be_ints():
    """They went through int(): a seed of 1.5 ran as 1, "1" as 1 and True as 1, set_epoch(0.9)
    chose epoch 0, loader(seed=2.7) shuffled as seed 2 and seeded_rows(seed="2") as 2 (where
    load_dataset and NDB refuse a float seed)."""
    pix = torch.randint(0, 256, (6, 12), dtype=torch.uint8)
    for kw in ({"seed": 1.5}, {"seed": "1"}, {"seed": True}, {"stream": 2.0}):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be an int"):
            ImageDataset(pix, dequantize=True, **kw)
    with pytest.raises(ValueError, match="stream must be >= 0, got -1"):
        ImageDataset(pix, dequantize=True, stream=-1)
    ds = ImageDataset(pix, dequantize=True, seed=np.int64(-4))  # (load_dataset takes -4)
    for bad in (0.9, "1", True):
        with pytest.raises(TypeError, match="epoch must be an int"):
            ds.set_epoch(bad)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        ds.set_epoch(-1)
    ds.set_epoch(np.int64(3))
    assert ds.epoch == 3 and type(ds.epoch) is int and ds.seed == -4
    d = load_dataset("embedded-mnist", limit=50)
    for bad in (2.7, "2", True):
        with pytest.raises(TypeError, match="seed must be an int, a torch.Generator or None"):
            d.loader("train", 8, shuffle=True, seed=bad)
        with pytest.raises(TypeError, match="seed must be an int"):
            d.seeded_rows("train", 10, bad)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        d.seeded_rows("train", 10, -1)
    with pytest.raises(ValueError, match="seed must be below 2[*][*]63"):
        d.seeded_rows("train", 10, 2**63)
    assert torch.equal(next(iter(d.loader("train", 8, shuffle=True, seed=np.int64(2)))),
                       next(iter(d.loader("train", 8, shuffle=True, seed=2))))
    assert torch.equal(d.seeded_rows("train", 10, np.int64(2)), d.seeded_rows("train", 10, 2))
