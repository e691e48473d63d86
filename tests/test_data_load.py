"""Tests of mfa.data.load_dataset's options: seeded splits, ``limit``, crop and resize
(mfa.data.splits, mfa.data.transforms) and argument checks, on the embedded digits. Nothing here
reads the default data root or cache: the other sources are only given a root that does not
exist."""

from __future__ import annotations

import re

import pytest
import torch

from mfa.data import DATASET_NAMES, DatasetNotFoundError, load_dataset


def row_keys(pixels: torch.Tensor) -> list[bytes]:
    return [bytes(r) for r in pixels.numpy()]


def test_embedded_split_is_seeded():
    a = load_dataset("embedded-mnist", seed=3)
    b = load_dataset("embedded-mnist", seed=3)
    c = load_dataset("embedded-mnist", seed=4)
    for s in ("train", "val", "test"):
        assert torch.equal(a.pixels(s), b.pixels(s)) and torch.equal(a.labels(s), b.labels(s))
    assert not torch.equal(a.val_pixels, c.val_pixels)
    d = load_dataset("embedded-mnist", val_fraction=0.2, test_fraction=0.3)
    assert d.sizes == {"train": 2500, "val": 1000, "test": 1500}
    e = load_dataset("embedded-mnist", val_fraction=0.0, test_fraction=0.0)
    assert e.sizes == {"train": 5000, "val": 0, "test": 0}
    assert e.val.shape == (0, 784) and e.dataset("val").rows([]).shape == (0, 784)


def test_the_test_split_does_not_depend_on_val_fraction():
    """With val taken first, val_fraction 0.1 and 0.2 gave disjoint test sets (the second's
    test images were the first's training images): runs with different validation shares
    could not be compared on held-out data."""
    base = load_dataset("embedded-mnist", seed=2)
    for val_fraction in (0.0, 0.2, 0.5):
        other = load_dataset("embedded-mnist", seed=2, val_fraction=val_fraction)
        assert torch.equal(other.pixels("test"), base.pixels("test"))
        assert torch.equal(other.labels("test"), base.labels("test"))
        keys = {s: set(row_keys(other.pixels(s))) for s in ("train", "val", "test")}
        assert not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    # a larger test share keeps the smaller one's test images
    wider = load_dataset("embedded-mnist", seed=2, test_fraction=0.2)
    assert set(row_keys(base.pixels("test"))) <= set(row_keys(wider.pixels("test")))


def test_limit_subsamples_each_split_without_changing_the_split():
    full = load_dataset("embedded-mnist", seed=1)
    small = load_dataset("embedded-mnist", seed=1, limit=100)
    again = load_dataset("embedded-mnist", seed=1, limit=100)
    assert small.sizes == {"train": 100, "val": 100, "test": 100}
    for s in ("train", "val", "test"):
        assert set(row_keys(small.pixels(s))) <= set(row_keys(full.pixels(s)))
        assert torch.equal(small.pixels(s), again.pixels(s))
    assert load_dataset("embedded-mnist", limit=10_000).sizes == full.sizes


def test_embedded_resize_and_crop():
    d = load_dataset("embedded-mnist", image_size=14, limit=50)
    assert d.image_shape == (1, 14, 14) and d.train_pixels.shape == (50, 196)
    ref = load_dataset("embedded-mnist", limit=50)
    assert abs(d.train_pixels.double().mean() - ref.train_pixels.double().mean()) < 5
    c = load_dataset("embedded-mnist", crop=(4, 2, 20, 24), limit=50)
    assert c.image_shape == (1, 20, 24)
    assert torch.equal(c.images("val"), ref.images("val")[:, :, 4:24, 2:26])
    r = load_dataset("embedded-mnist", image_size=(10, 12), limit=5)
    assert r.image_shape == (1, 10, 12)
    with pytest.raises(ValueError, match="does not fit"):
        load_dataset("embedded-mnist", crop=(10, 0, 20, 28))


def test_bad_names_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*embedded-mnist"):
        load_dataset("cifar10")
    assert load_dataset("Embedded_MNIST", limit=2).name == "embedded-mnist"  # normalised
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("embedded-mnist", val_fraction=1.5)
    with pytest.raises(ValueError, match="< 1"):
        load_dataset("embedded-mnist", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("embedded-mnist", limit=0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("embedded-mnist", image_size=(3, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        load_dataset("embedded-mnist", channels=3)
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        load_dataset("folder", tmp_path / "missing")


def test_seed_is_an_int_of_any_kind_and_nothing_else():
    """A numpy int (``np.random.randint``'s, a config read with numpy) was refused here while
    the data layer's other entries (``ImageData``, ``QuantizedRows``) take it."""
    import numpy as np

    same = load_dataset("embedded-mnist", limit=3, seed=np.int64(7)).test
    assert torch.equal(same, load_dataset("embedded-mnist", limit=3, seed=7).test)
    for bad in (1.5, "1", True):
        with pytest.raises(TypeError, match="seed must be an int"):
            load_dataset("embedded-mnist", limit=2, seed=bad)


@pytest.mark.parametrize("flag", ["dequantize", "download", "cache", "progress"])
def test_flags_must_be_bools(flag):
    """The string "false" (from a hand-written config or script) counted as true."""
    for bad in ("false", 0, None):
        with pytest.raises(ValueError, match=rf"{flag} must be True or False, got {bad!r}"):
            load_dataset("embedded-mnist", limit=2, **{flag: bad})
    assert load_dataset("embedded-mnist", limit=2, **{flag: False}).sizes["val"] == 2


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_dataset_name_has_a_source(tmp_path, name):
    # DATASET_NAMES is the one list of names: each must reach its loader, which either loads
    # (the embedded digits) or says that the files are missing under the root it was given.
    nowhere = tmp_path / "nowhere"
    if name == "embedded-mnist":
        assert load_dataset(name, nowhere, limit=2).name == name
        return
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(nowhere))):
        load_dataset(name, nowhere)
