"""Tests of mfa.data: the loaders run on tiny files written in each dataset's real on-disk format.

MNIST/Fashion-MNIST go through torchvision's own dataset classes (idx files in ``raw/``); SVHN
``.mat`` files are written with scipy in the official layout; CelebA gets 178×218 JPEGs and an
official-format partition file; the folder loader gets PNGs. One test reads the real
Fashion-MNIST files of Debian's ``dataset-fashion-mnist`` package when it is installed.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfa import data as mdata
from mfa.config import load_config
from mfa.data import decode
from mfa.data.sources import mnist as mnist_source
from mfa.data import (
    CELEBA_CROP,
    FASHION_MNIST_DEBIAN_DIR,
    DatasetNotFoundError,
    ImageData,
    ImageDataset,
    bits_per_dim,
    dequantize,
    load_dataset,
    pixels_to_float,
    to_images,
    to_rows,
)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Keep the default data root and cache inside the test's tmp folder."""
    monkeypatch.setenv("MFA_DATA_DIR", str(tmp_path / "default-data"))
    monkeypatch.setenv("MFA_CACHE_DIR", str(tmp_path / "default-cache"))


def row_keys(pixels: torch.Tensor) -> list[bytes]:
    return [bytes(r) for r in pixels.numpy()]


# --------------------------------------------------------------------------------------
# File writers in the real formats
# --------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An idx file (big-endian header, uint8 payload) as in the MNIST distribution."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    payload = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def mnist_arrays(n_train: int, n_test: int, seed: int = 0):
    """Images whose pixel (0, 0) is the image's index (train) or 200 + index (test), and whose
    pixel (3, 5) is a second marker, so that every row can be traced back to its source."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train[:, 0, 0] = np.arange(n_train)
    test[:, 0, 0] = 200 + np.arange(n_test)
    train[:, 3, 5] = 255 - np.arange(n_train)
    test[:, 3, 5] = 7
    return train, rng.integers(0, 10, n_train), test, rng.integers(0, 10, n_test)


def write_mnist(folder: Path, n_train=20, n_test=8, compress=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    tr, trl, te, tel = mnist_arrays(n_train, n_test, seed)
    write_idx(folder / "train-images-idx3-ubyte", tr, compress)
    write_idx(folder / "train-labels-idx1-ubyte", trl, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", te, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", tel, compress)
    return tr, trl, te, tel


def write_svhn(folder: Path, n_train=12, n_test=5):
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # [H, W, C, N]
        x[0, 0, 0, :] = np.arange(n)  # image index at (c=0, h=0, w=0)
        x[2, 7, 1, :] = 100 + np.arange(n)  # marker at (c=1, h=2, w=7)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, 10 = digit 0
        savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


FACE = (200, 40, 10)
BACKGROUND = (0, 255, 0)


def write_celeba(base: Path, partition=(0, 0, 0, 1, 1, 2)) -> Path:
    """``base/celeba`` with aligned-size JPEGs: the CELEBA_CROP box holds one colour (blue
    channel 10 + 20·index, to identify the image), the rest is green."""
    folder = base / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    top, left, h, w = CELEBA_CROP
    lines = []
    for i, part in enumerate(partition):
        arr = np.empty((218, 178, 3), dtype=np.uint8)
        arr[:] = BACKGROUND
        arr[top : top + h, left : left + w] = (FACE[0], FACE[1], 10 + 20 * i)
        name = f"{i + 1:06d}.jpg"
        # real CelebA files are JPEGs; 4:4:4 at top quality keeps colour edges sharp
        Image.fromarray(arr).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
        lines.append(f"{name} {part}\n")
    (folder / "list_eval_partition.txt").write_text("".join(lines))
    return folder


def write_png_folder(root: Path, counts=(("cats", 6), ("dogs", 4)), n_root=2, size=(5, 7)):
    """RGB PNGs of height 5, width 7 in class folders (and some directly in root). Pixel
    (c, h, w) = (2, 1, 3) of every image carries a per-image marker; (0, 0, 0) its index."""
    h, w = size
    k = 0
    markers = {}
    for cls, n in [*counts, ("", n_root)]:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            arr = np.full((h, w, 3), 50, dtype=np.uint8)
            arr[0, 0, 0] = k
            arr[1, 3, 2] = 100 + k
            Image.fromarray(arr).save(root / cls / f"img{k:03d}.png")
            markers[k] = cls
            k += 1
    return markers


# --------------------------------------------------------------------------------------
# The embedded digits
# --------------------------------------------------------------------------------------


def test_embedded_mnist_is_5000_real_digits():
    d = load_dataset("embedded-mnist")
    assert isinstance(d, ImageData)
    assert d.name == "embedded-mnist" and d.image_shape == (1, 28, 28) and d.n_features == 784
    assert d.sizes == {"train": 4000, "val": 500, "test": 500}
    pixels = torch.cat([d.pixels(s) for s in ("train", "val", "test")])
    labels = torch.cat([d.labels(s) for s in ("train", "val", "test")])
    assert pixels.dtype == torch.uint8 and pixels.shape == (5000, 784)
    assert torch.equal(labels.bincount(), torch.full((10,), 500))
    assert len(set(row_keys(pixels))) == 5000  # the three splits are disjoint
    x = d.train
    assert x.dtype == torch.float32 and x.shape == (4000, 784)
    assert x.min() == 0 and x.max() == 1
    mean = pixels.double().mean().item() / 255
    assert 0.12 < mean < 0.145, mean  # MNIST's mean intensity is 0.1307
    # Black background, white strokes: corners are empty, the centre is often inked.
    imgs = d.images("train").double() / 255
    assert imgs[:, 0, :2, :2].max() == 0 and imgs[:, 0, 10:18, 10:18].mean() > 0.3
    # The labels belong to the images: nearest class mean classifies held-out digits well.
    means = torch.stack([d.train[d.train_labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(d.val, means).argmin(1)
    assert (pred == d.val_labels).double().mean() > 0.7


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


# --------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST through torchvision
# --------------------------------------------------------------------------------------


def check_mnist_like(d: ImageData, tr, trl, te, tel):
    assert d.image_shape == (1, 28, 28)
    assert d.sizes == {"train": 18, "val": 2, "test": 8}
    # train + val is the official train split, each image once
    seen = torch.cat([d.train_pixels[:, 0], d.val_pixels[:, 0]]).sort().values
    assert torch.equal(seen, torch.arange(20, dtype=torch.uint8))
    for split in ("train", "val"):
        for row, label in zip(d.pixels(split), d.labels(split), strict=True):
            k = int(row[0])
            # CHW flattening: (c=0, h=3, w=5) sits at 0*784 + 3*28 + 5
            assert int(row[3 * 28 + 5]) == 255 - k
            assert torch.equal(row, torch.from_numpy(tr[k].reshape(-1)))
            assert int(label) == int(trl[k])
    # the official test split, in order
    assert torch.equal(d.test_pixels, torch.from_numpy(te.reshape(8, -1)))
    assert torch.equal(d.test_labels, torch.from_numpy(tel.astype(np.int64)))
    assert d.test.max() <= 1 and d.test.min() >= 0
    assert torch.allclose(d.test, d.test_pixels.float() / 255)


def test_mnist_torchvision_layout(tmp_path):
    tr, trl, te, tel = write_mnist(tmp_path / "MNIST" / "raw")
    d = load_dataset("mnist", tmp_path)
    check_mnist_like(d, tr, trl, te, tel)
    assert d.classes[0].startswith("0")  # torchvision's class names
    e = load_dataset("mnist", tmp_path)
    assert torch.equal(d.train_pixels, e.train_pixels)
    f = load_dataset("mnist", tmp_path, seed=5)
    assert not torch.equal(d.val_pixels, f.val_pixels)


def test_mnist_gz_in_raw_is_extracted_in_place(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    tr, trl, te, tel = write_mnist(raw, compress=True)
    assert not (raw / "train-images-idx3-ubyte").exists()
    d = load_dataset("mnist", tmp_path)
    check_mnist_like(d, tr, trl, te, tel)
    assert (raw / "train-images-idx3-ubyte").is_file()  # as torchvision's download() leaves it


def test_fashion_mnist_flat_gz_folder_is_mirrored_into_cache(tmp_path):
    # the layout of Debian's /usr/share/datasets/fashion-mnist: four .gz files, no raw/
    flat = tmp_path / "flat"
    tr, trl, te, tel = write_mnist(flat, compress=True, seed=2)
    flat.chmod(0o555)  # read-only, like /usr/share
    try:
        d = load_dataset("fashion-mnist", flat, cache_dir=tmp_path / "cache")
        check_mnist_like(d, tr, trl, te, tel)
        assert d.classes[0] == "T-shirt/top"
        mirrored = list((tmp_path / "cache").rglob("FashionMNIST/raw/train-images-idx3-ubyte"))
        assert len(mirrored) == 1
        stamp = mirrored[0].stat().st_mtime_ns
        e = load_dataset("fashion-mnist", flat, cache_dir=tmp_path / "cache")  # reuses it
        assert mirrored[0].stat().st_mtime_ns == stamp
        assert torch.equal(e.train_pixels, d.train_pixels)
    finally:
        flat.chmod(0o755)


def test_fashion_mnist_default_root_falls_back_to_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    tr, trl, te, tel = write_mnist(debian, compress=True, seed=3)
    monkeypatch.setattr(mnist_source, "FASHION_MNIST_DEBIAN_DIR", debian)
    check_mnist_like(load_dataset("fashion-mnist"), tr, trl, te, tel)
    with pytest.raises(DatasetNotFoundError, match="mnist"):
        load_dataset("mnist")  # the fallback is for Fashion-MNIST only


@pytest.mark.skipif(
    not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({FASHION_MNIST_DEBIAN_DIR})",
)
def test_real_fashion_mnist_from_debian_package(tmp_path):
    d = load_dataset("fashion-mnist", FASHION_MNIST_DEBIAN_DIR, cache_dir=tmp_path / "cache")
    assert d.sizes == {"train": 54000, "val": 6000, "test": 10000}
    assert d.image_shape == (1, 28, 28)
    assert torch.equal(d.test_labels.bincount(), torch.full((10,), 1000))
    mean = d.test_pixels.double().mean().item() / 255
    assert abs(mean - 0.2868) < 0.005, mean  # Fashion-MNIST's test-set mean intensity
    small = load_dataset("fashion-mnist", limit=300)  # root=None finds the Debian folder
    assert small.sizes == {"train": 300, "val": 300, "test": 300}
    assert set(row_keys(small.val_pixels)) <= set(row_keys(d.val_pixels))


def test_missing_mnist_names_path_and_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "download=True" in msg
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "svhn", "celeba"])
def test_missing_files_advise_the_download_override_that_exists(tmp_path, name):
    # The CLI has no --download flag: the messages must name the config override instead.
    with pytest.raises(DatasetNotFoundError, match=r"--set data\.download=true") as err:
        load_dataset(name, tmp_path / "nowhere")
    msg = str(err.value)
    assert "--download" not in msg and "download=True" in msg
    override = re.search(r"--set (\S+?)\)", msg).group(1)
    assert load_config(overrides=[override]).data.download is True  # the advice works


# --------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", "svhn"])
def test_svhn_mat_files(tmp_path, sub):
    mats = write_svhn(tmp_path / sub if sub else tmp_path)
    d = load_dataset("svhn", tmp_path, val_fraction=0.25)
    assert d.image_shape == (3, 32, 32)
    assert d.sizes == {"train": 9, "val": 3, "test": 5}
    x, y = mats["test"]
    for n in range(5):
        row = d.test_pixels[n]
        assert int(row[0]) == n
        # (c=1, h=2, w=7) -> 1*32*32 + 2*32 + 7
        assert int(row[1 * 1024 + 2 * 32 + 7]) == 100 + n
        ref = torch.from_numpy(x[..., n]).permute(2, 0, 1).reshape(-1)  # HWC -> CHW
        assert torch.equal(row, ref)
    assert d.test_labels.tolist() == [1, 2, 3, 4, 5]
    train_labels = dict(zip(d.train_pixels[:, 0].tolist(), d.train_labels.tolist(), strict=True))
    val_labels = dict(zip(d.val_pixels[:, 0].tolist(), d.val_labels.tolist(), strict=True))
    both = {**train_labels, **val_labels}
    assert sorted(both) == list(range(12)) and not set(train_labels) & set(val_labels)
    assert both[9] == 0  # label 10 in the file is digit 0
    assert all(v == (k % 10 + 1) % 10 for k, v in both.items())


def test_svhn_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat") as err:
        load_dataset("svhn", tmp_path)
    assert str(tmp_path) in str(err.value) and "download=True" in str(err.value)


# --------------------------------------------------------------------------------------
# CelebA
# --------------------------------------------------------------------------------------


def test_celeba_face_box_partition_and_resize(tmp_path):
    folder = write_celeba(tmp_path)
    d = load_dataset("celeba", tmp_path)
    assert d.image_shape == (3, 64, 64)
    assert d.sizes == {"train": 3, "val": 2, "test": 1}
    assert (d.train_labels == -1).all()
    imgs = d.images("train").int()
    # only the face box survives the crop: every pixel is the face colour (JPEG tolerance)
    assert (imgs[:, 0] - FACE[0]).abs().max() <= 12
    assert (imgs[:, 1] - FACE[1]).abs().max() <= 12
    # rows follow the partition file: blue channel 10 + 20·index
    blue = [d.images(s)[:, 2].float().mean(dim=(1, 2)) for s in ("train", "val", "test")]
    assert torch.allclose(torch.cat(blue), 10 + 20 * torch.arange(6.0), atol=6)

    small = load_dataset("celeba", folder, image_size=8)  # root may be the celeba folder
    assert small.image_shape == (3, 8, 8) and small.train_pixels.shape == (3, 192)

    whole = load_dataset("celeba", tmp_path, crop=(0, 0, 218, 178), image_size=(109, 89))
    assert whole.image_shape == (3, 109, 89)
    img = whole.images("test")[0].int()
    assert (img[:, 5, 5] - torch.tensor(BACKGROUND)).abs().max() <= 12  # outside the box
    assert (img[:2, 54, 44] - torch.tensor(FACE[:2])).abs().max() <= 12  # inside

    grey = load_dataset("celeba", tmp_path, channels=1, image_size=8, limit=1)
    assert grey.image_shape == (1, 8, 8) and grey.sizes == {"train": 1, "val": 1, "test": 1}


def test_celeba_cache_and_workers(tmp_path, monkeypatch):
    folder = write_celeba(tmp_path, partition=(0,) * 8 + (1, 2))
    kw = dict(image_size=8, cache=True, cache_dir=tmp_path / "cache")
    a = load_dataset("celeba", tmp_path, num_workers=2, batch_size=3, **kw)  # 2 processes
    b = load_dataset("celeba", tmp_path, image_size=8)  # no cache, no workers
    for s in ("train", "val", "test"):
        assert torch.equal(a.pixels(s), b.pixels(s))
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1

    def no_decoding(self, i):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as m:
        m.setattr(decode.DecodeFiles, "__getitem__", no_decoding)
        c = load_dataset("celeba", tmp_path, **kw)  # answered from the cache
        assert torch.equal(c.train_pixels, a.train_pixels) and c.image_shape == (3, 8, 8)
        with pytest.raises(AssertionError, match="decoded"):  # other options: other entry
            load_dataset("celeba", tmp_path, image_size=4, cache=True, cache_dir=kw["cache_dir"])
        image = folder / "img_align_celeba" / "000003.jpg"
        st = image.stat()
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="decoded"):  # a changed file: stale entry
            load_dataset("celeba", tmp_path, **kw)


def test_celeba_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="list_eval_partition.txt") as err:
        load_dataset("celeba", tmp_path)
    assert str(tmp_path / "celeba") in str(err.value) and "download=True" in str(err.value)
    folder = write_celeba(tmp_path / "x")
    (folder / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="000002.jpg"):
        load_dataset("celeba", tmp_path / "x")


# --------------------------------------------------------------------------------------
# Folders of images
# --------------------------------------------------------------------------------------


def test_folder_of_pngs(tmp_path):
    markers = write_png_folder(tmp_path / "imgs")
    d = load_dataset("folder", tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    assert d.image_shape == (3, 5, 7) and d.classes == ("cats", "dogs")
    assert d.sizes == {"train": 8, "val": 2, "test": 2}
    seen = []
    for s in ("train", "val", "test"):
        for row, label in zip(d.pixels(s), d.labels(s), strict=True):
            k = int(row[0])
            seen.append(k)
            assert int(row[2 * 35 + 1 * 7 + 3]) == 100 + k  # (c=2, h=1, w=3)
            assert int(label) == {"cats": 0, "dogs": 1, "": -1}[markers[k]]
    assert sorted(seen) == list(range(12))
    again = load_dataset("folder", tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    assert torch.equal(again.train_pixels, d.train_pixels)


def test_folder_greyscale_sizes_and_errors(tmp_path):
    root = tmp_path / "grey"
    root.mkdir()
    for i, (h, w) in enumerate([(10, 20), (10, 20), (10, 20), (12, 8)]):
        arr = np.full((h, w), 10 * i, dtype=np.uint8)
        arr[0, 0] = 255
        Image.fromarray(arr, mode="L").save(root / f"{i}.png")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("folder", root)
    d = load_dataset("folder", root, image_size=6, val_fraction=0.25, test_fraction=0.0)
    assert d.image_shape == (1, 6, 6) and d.sizes == {"train": 3, "val": 1, "test": 0}
    assert d.classes == () and (d.train_labels == -1).all()
    e = load_dataset("folder", root, image_size=(4, 5), channels=3)
    assert e.image_shape == (3, 4, 5)
    x = e.images("train")
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey as RGB
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        load_dataset("folder", _empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty"
    p.mkdir()
    (p / "notes.txt").write_text("no images here")
    return p


# --------------------------------------------------------------------------------------
# Float views, dequantisation, bits/dim
# --------------------------------------------------------------------------------------


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
    assert torch.equal(pixels_to_float(pixels)[[0, 255]], torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(pixels.float())


def test_bits_per_dim():
    # the uniform density on [0, 1)^D is the uniform distribution over the 256 levels: 8 bits
    assert bits_per_dim(0.0, 784) == pytest.approx(8.0)
    lp = torch.tensor([0.0, 784 * math.log(2)])
    torch.testing.assert_close(bits_per_dim(lp, 784), torch.tensor([8.0, 7.0]))
    assert mdata.LOG_PIXEL_LEVELS == pytest.approx(math.log(256))
    with pytest.raises(ValueError):
        bits_per_dim(0.0, 0)


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
