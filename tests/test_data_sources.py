"""Tests of mfa.data.sources: the loaders run on tiny files written in each dataset's real on-disk
format.

MNIST/Fashion-MNIST go through torchvision's own dataset classes (idx files in ``raw/``); SVHN
``.mat`` files are written with scipy in the official layout; CelebA gets 178×218 JPEGs and an
official-format partition file; the folder loader gets PNGs. One test reads the real
Fashion-MNIST files of Debian's ``dataset-fashion-mnist`` package when it is installed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mfa
from mfa.config import load_config
from mfa.data import (
    CELEBA_CROP,
    FASHION_MNIST_DEBIAN_DIR,
    DatasetNotFoundError,
    ImageData,
    decode,
    load_dataset,
)
from mfa.data.sources import mnist as mnist_source


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


def write_labelled_mnist(folder: Path, first: tuple[int, ...]) -> None:
    """Flat gzipped idx files whose first ten training labels are ``first`` (the real files'
    own: how a flat folder of one dataset is told from the other's)."""
    write_mnist(folder, compress=True)
    path = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8:18] = bytes(first)
    path.write_bytes(gzip.compress(bytes(raw)))


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


def test_mnist_gz_replaced_after_extraction_is_extracted_again(tmp_path):
    """The copy extracted next to the .gz files was read ever after, so replaced .gz files
    (another download) left the old images loading without a word. An uncompressed file
    newer than its .gz (the user's own) is still read as it is."""
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, compress=True, seed=0)
    first = load_dataset("mnist", tmp_path)
    tr, trl, te, tel = write_mnist(raw, compress=True, seed=7)
    later = time.time_ns() + 10**9  # (a replaced file is newer than the extracted copy)
    for path in raw.glob("*.gz"):
        os.utime(path, ns=(later, later))
    again = load_dataset("mnist", tmp_path)
    check_mnist_like(again, tr, trl, te, tel)
    assert not torch.equal(again.test_pixels, first.test_pixels)
    # the user's own uncompressed file, newer than the .gz beside it, wins
    own = raw / "t10k-labels-idx1-ubyte"
    labels = bytearray(own.read_bytes())
    labels[8] = (labels[8] + 1) % 10
    own.write_bytes(bytes(labels))
    newest = later + 10**9
    os.utime(own, ns=(newest, newest))
    assert load_dataset("mnist", tmp_path).labels("test")[0] == labels[8]


def test_an_old_downloads_processed_files_do_not_replace_the_idx_files(tmp_path):
    """torchvision's MNIST class loads processed/training.pt and test.pt (an old download's)
    instead of the idx files in raw/ wherever those exist: 3 + 2 images were read in place
    of the 20 + 8 of the idx files, which are what the docs say is read."""
    raw = tmp_path / "MNIST" / "raw"
    tr, trl, te, tel = write_mnist(raw)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    for name, n in (("training.pt", 3), ("test.pt", 2)):
        torch.save((torch.zeros(n, 28, 28, dtype=torch.uint8),
                    torch.zeros(n, dtype=torch.int64)), processed / name)
    check_mnist_like(load_dataset("mnist", tmp_path), tr, trl, te, tel)


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


def test_a_flat_folder_with_an_unusable_cache_dir_names_cache_dir(tmp_path, monkeypatch):
    """A flat folder's copy goes to cache_dir: where that cannot be written (a file here; a
    read-only ~/.cache takes the same path with PermissionError) a bare NotADirectoryError
    escaped that named neither cache_dir nor $MFA_CACHE_DIR."""
    write_mnist(tmp_path / "flat", compress=True)
    blocked = tmp_path / "cache-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MFA_CACHE_DIR", str(blocked))
    for options in ({}, {"cache_dir": blocked}):
        with pytest.raises(OSError) as err:
            load_dataset("fashion-mnist", tmp_path / "flat", **options)
        msg = str(err.value)
        assert msg.startswith(f"fashion-mnist: the idx files in {tmp_path / 'flat'} are read "
                              f"from an extracted copy in cache_dir, but {blocked}/idx/")
        assert f"make cache_dir ({blocked}) a writable folder" in msg
        assert "load_dataset(cache_dir=...)" in msg and "$MFA_CACHE_DIR" in msg
        assert isinstance(err.value.__cause__, NotADirectoryError)
    assert blocked.read_text() == "not a folder"


def test_an_unreadable_source_file_inside_cache_dir_is_not_blamed_on_cache_dir(
        tmp_path, monkeypatch):
    """The default data root lies inside the default cache dir: an unreadable source file
    there (simulated: root may read anything) was told to make cache_dir writable."""
    cache = tmp_path / "cache"
    flat = cache / "datasets" / "flat"
    write_mnist(flat, compress=True)
    real_open = gzip.open

    def denied(path, *args, **kwargs):
        if Path(path).parent == flat:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mnist_source.gzip, "open", denied)
    with pytest.raises(PermissionError, match="Permission denied") as err:
        load_dataset("fashion-mnist", flat, cache_dir=cache)
    assert "cache_dir" not in str(err.value) and str(flat) in str(err.value)
    # ... while a cache_dir inside the source folder that cannot be used is still named
    monkeypatch.setattr(mnist_source.gzip, "open", real_open)
    inside = flat / "cache"
    inside.mkdir()
    (inside / "idx").write_text("a file in the way")
    with pytest.raises(OSError, match=f"make cache_dir \\({inside}\\) a writable folder"):
        load_dataset("fashion-mnist", flat, cache_dir=inside)


def test_fashion_mnist_default_root_falls_back_to_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    tr, trl, te, tel = write_mnist(debian, compress=True, seed=3)
    monkeypatch.setattr(mnist_source, "FASHION_MNIST_DEBIAN_DIR", debian)
    check_mnist_like(load_dataset("fashion-mnist"), tr, trl, te, tel)
    with pytest.raises(DatasetNotFoundError, match="mnist"):
        load_dataset("mnist")  # the fallback is for Fashion-MNIST only


def test_inconsistent_or_corrupt_idx_files_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)

    def folder(name, n_train=50, n_train_labels=50, test_side=28):
        f = tmp_path / name
        f.mkdir(parents=True)
        write_idx(f / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), False)
        write_idx(f / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train_labels), False)
        write_idx(f / "t10k-images-idx3-ubyte",
                  rng.integers(0, 256, (20, test_side, test_side)), False)
        write_idx(f / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 20), False)
        return f

    # (the count alone, 'the train split has 50 images but 40 labels', named neither file)
    def disagree(where, n_labels, copied):
        return (re.escape(f"mnist: the train idx files in {where}")
                + (r" \(read from their copies in [^)]*\)" if copied else "")
                + re.escape(f" disagree: train-images-idx3-ubyte holds 50 images but "
                            f"train-labels-idx1-ubyte {n_labels} labels")
                + ".*replace both.*download=True")

    for name, n_labels in (("fewer", 40), ("more", 60)):  # flat folders (copied to the cache)
        with pytest.raises(ValueError, match=disagree(tmp_path / name, n_labels, True)):
            load_dataset("mnist", folder(name, n_train_labels=n_labels))
    raw = folder("tv/MNIST/raw", n_train_labels=40)  # torchvision's layout: read in place
    with pytest.raises(ValueError, match=disagree(raw, 40, False)):
        load_dataset("mnist", tmp_path / "tv")
    sizes = folder("sizes", test_side=32)  # (the message named neither file)
    with pytest.raises(ValueError, match=r"differ in shape.*train \(1, 28, 28\) "
                       r"\(train-images-idx3-ubyte in " + re.escape(str(sizes)) +
                       r"\).*test \(1, 32, 32\) \(t10k-images-idx3-ubyte in "):
        load_dataset("mnist", sizes)
    raw = folder("tv2/MNIST/raw", test_side=32)  # read in place: the file's own path
    test_file = raw / "t10k-images-idx3-ubyte"
    with pytest.raises(ValueError, match=re.escape(f"(1, 32, 32) ({test_file})")):
        load_dataset("mnist", tmp_path / "tv2")
    garbage = folder("garbage")
    (garbage / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    with pytest.raises(ValueError, match=r"train idx files \(.*\) in .* are not valid idx files"):
        load_dataset("mnist", garbage, cache_dir=tmp_path / "cache")


def test_an_idx_file_of_another_element_type_is_refused_by_name(tmp_path):
    """Type byte 0x09 (int8) instead of 0x08 (uint8): torchvision 0.29 raised a TypeError that
    named neither the file nor the dataset."""
    folder = tmp_path / "int8"
    write_mnist(folder)
    path = folder / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[2] = 0x09
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train idx files \(.*\) in .* are not valid idx files"):
        load_dataset("mnist", folder, cache_dir=tmp_path / "cache")


def test_svhn_labels_outside_1_to_10_are_refused(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path / "svhn")
    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)
    savemat(str(tmp_path / "svhn" / "test_32x32.mat"),
            {"X": x, "y": np.array([[1], [77], [3]], dtype=np.uint8)})
    with pytest.raises(ValueError, match="test_32x32.mat has a label 77; SVHN's labels are 1 "
                                         "to 10"):
        load_dataset("svhn", tmp_path / "svhn")
    # 0 is no SVHN label either (it was read as the digit 0, whose label is 10)
    savemat(str(tmp_path / "svhn" / "test_32x32.mat"),
            {"X": x, "y": np.array([[1], [0], [3]], dtype=np.uint8)})
    with pytest.raises(ValueError, match="test_32x32.mat has a label 0; SVHN's labels are 1 "):
        load_dataset("svhn", tmp_path / "svhn")


def test_mnist_labels_outside_0_to_9_are_refused(tmp_path):
    """A labels file of 77s loaded without a word."""
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw)
    labels = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[9] = 77
    labels.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte has a label 77; the labels "
                                         "are the ten classes 0 to 9"):
        load_dataset("mnist", tmp_path)


def test_svhn_labels_that_are_not_whole_numbers_are_refused(tmp_path):
    """The official y is stored as doubles: a corrupt 10.7 was cast to 10, then read as the
    digit 0, silently."""
    from scipy.io import savemat

    write_svhn(tmp_path / "svhn")
    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)
    savemat(str(tmp_path / "svhn" / "test_32x32.mat"),
            {"X": x, "y": np.array([[1.0], [10.7], [3.0]])})
    with pytest.raises(ValueError, match=r"test_32x32.mat has a label 10.7 that is not a whole "
                                         r"number"):
        load_dataset("svhn", tmp_path / "svhn")


def test_a_flat_folders_bad_label_names_the_users_file(tmp_path):
    """For a flat folder the label error named the cache's copy of the file."""
    write_mnist(tmp_path / "flat")
    labels = tmp_path / "flat" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[9] = 77
    labels.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"t10k-labels-idx1-ubyte in {tmp_path / 'flat'} "
                                         r"\(read from its copy in .*\) has a label 77"):
        load_dataset("mnist", tmp_path / "flat", cache_dir=tmp_path / "cache")


def test_svhn_files_of_different_image_sizes_are_named(tmp_path):
    from scipy.io import savemat

    write_svhn(tmp_path / "svhn")
    path = tmp_path / "svhn" / "train_32x32.mat"
    savemat(str(path), {"X": np.zeros((28, 28, 3, 4), dtype=np.uint8),
                        "y": np.ones((4, 1), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"differ in shape.*train \(3, 28, 28\) \("
                       + re.escape(str(path)) + r"\).*test \(3, 32, 32\) \(.*test_32x32.mat\)"):
        load_dataset("svhn", tmp_path / "svhn")


def test_corrupt_svhn_file_is_named(tmp_path):
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"garbage, not MATLAB" * 10)
    with pytest.raises(ValueError, match="cannot read .*test_32x32.mat as a MATLAB"):
        load_dataset("svhn", tmp_path / "svhn")


def test_default_root_is_not_read_flat(tmp_path, monkeypatch):
    # MNIST's and Fashion-MNIST's idx files share their names: idx files lying directly in
    # the shared default root must not load as either dataset (they would as both).
    write_mnist(tmp_path / "default-data", seed=4)
    monkeypatch.setattr(mnist_source, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    for key in ("mnist", "fashion-mnist"):
        with pytest.raises(DatasetNotFoundError, match=key):
            load_dataset(key)
    tr, trl, te, tel = write_mnist(tmp_path / "default-data" / "MNIST" / "raw", seed=5)
    check_mnist_like(load_dataset("mnist"), tr, trl, te, tel)
    with pytest.raises(DatasetNotFoundError, match="fashion-mnist"):
        load_dataset("fashion-mnist")
    # a root passed explicitly names one dataset: read flat
    tr, trl, te, tel = write_mnist(tmp_path / "fashion-flat", seed=6)
    check_mnist_like(load_dataset("fashion-mnist", tmp_path / "fashion-flat"), tr, trl, te, tel)


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


def test_a_missing_idx_file_is_named_per_folder(tmp_path):
    """With one of the four idx files missing the error named all four and no folder's gap."""
    write_mnist(tmp_path / "tv" / "MNIST" / "raw")
    (tmp_path / "tv" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", tmp_path / "tv")
    raw = tmp_path / "tv" / "MNIST" / "raw"
    assert (f"in {raw} (which lacks t10k-labels-idx1-ubyte) and {tmp_path / 'tv'} (which has "
            f"none of them). Put the missing ones in {raw} ") in str(err.value)
    write_mnist(tmp_path / "flat", compress=True)  # a flat folder, .gz files
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (tmp_path / "flat" / name).unlink()
    with pytest.raises(DatasetNotFoundError, match=re.escape(
            f"{tmp_path / 'flat'} (which lacks train-labels-idx1-ubyte and "
            "t10k-images-idx3-ubyte)")):
        load_dataset("fashion-mnist", tmp_path / "flat")


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
# CelebA (and mfa.data.decode: workers and the cache)
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


def test_missing_celeba_images_are_refused_with_the_fix(tmp_path):
    """Missing images said only '13 of 13 image files are missing, e.g. …', with no fix: the
    zip unpacked one folder too deep (img_align_celeba/img_align_celeba/*.jpg) is found and
    the files are to be moved up; otherwise the zip is to be extracted again."""
    folder = write_celeba(tmp_path / "deep")
    images = folder / "img_align_celeba"
    images.rename(folder / "tmp")
    images.mkdir()
    (folder / "tmp").rename(images / "img_align_celeba")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("celeba", tmp_path / "deep")
    assert str(err.value).startswith(f"6 of 6 image files are missing, e.g. {images}/000001.jpg")
    assert f"in {images}/img_align_celeba/" in str(err.value)
    assert f"move the files of {images}/img_align_celeba up into {images} " in str(err.value)

    folder = write_celeba(tmp_path / "partial")
    (folder / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("celeba", tmp_path / "partial")
    msg = str(err.value)
    assert msg.startswith(f"1 of 6 image files are missing, e.g. {folder}/img_align_celeba/"
                          "000005.jpg")
    assert "extract img_align_celeba.zip (from https://mmlab" in msg and str(folder) in msg
    assert "move the files" not in msg and "--set data.download=true" in msg
    for image in (folder / "img_align_celeba").iterdir():  # all missing, none deeper
        image.unlink()
    with pytest.raises(DatasetNotFoundError, match="6 of 6 .* extract img_align_celeba.zip"):
        load_dataset("celeba", tmp_path / "partial")


def test_a_celeba_file_of_another_size_is_refused_under_the_default_box(tmp_path):
    """The face box is placed for 178 × 218 aligned images: a 1024 × 1024 file among them
    (CelebA-HQ, an unaligned photo) was cropped where no face is, silently. An explicit crop
    takes any size that fits it."""
    folder = write_celeba(tmp_path)
    Image.new("RGB", (1024, 1024), BACKGROUND).save(folder / "img_align_celeba" / "000006.jpg")
    with pytest.raises(ValueError, match=r"000006.jpg is 1024 × 1024 pixels, not the 178 × 218"):
        load_dataset("celeba", tmp_path, cache=False)
    (folder / "img_align_celeba" / "000006.jpg").unlink()
    Image.new("RGB", (178, 218), BACKGROUND).save(folder / "img_align_celeba" / "000006.jpg")
    assert load_dataset("celeba", tmp_path, cache=False).sizes["test"] == 1


def test_celeba_image_listed_twice_is_refused(tmp_path):
    """A partition file listing a training image again as a test image made the splits
    overlap, silently."""
    folder = write_celeba(tmp_path)
    with open(folder / "list_eval_partition.txt", "a") as f:
        f.write("000001.jpg 2\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:7 lists 000001.jpg again "
                                         r"\(first at line 1\)"):
        load_dataset("celeba", tmp_path)


# --------------------------------------------------------------------------------------
# Folders of images
# --------------------------------------------------------------------------------------


def test_folder_of_pngs(tmp_path):
    markers = write_png_folder(tmp_path / "imgs")
    # hidden files are skipped (docs/data.md): a dotfile image, and macOS's AppleDouble
    # "._" companion, which is no image at all
    hidden = np.full((5, 7, 3), 50, dtype=np.uint8)
    hidden[0, 0, 0] = 99
    Image.fromarray(hidden).save(tmp_path / "imgs" / ".x.png", format="PNG")
    Image.fromarray(hidden).save(tmp_path / "imgs" / "cats" / ".x.png", format="PNG")
    (tmp_path / "imgs" / "cats" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
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
    with pytest.raises(ValueError, match="image_size") as caught:
        load_dataset("folder", root)
    assert "--set data.image_size=" in str(caught.value)  # the CLI's spelling too
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


def test_folder_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "wide"
    root.mkdir()
    values = np.array([[0, 257, 1000, 32767], [32768, 47000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(root / "a.png")  # a 16-bit greyscale PNG
    with Image.open(root / "a.png") as im:
        assert im.mode.startswith("I")  # what Pillow reads it as (not 8-bit "L")
    d = load_dataset("folder", root, val_fraction=0.0, test_fraction=0.0)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert torch.equal(d.train_pixels[0], torch.from_numpy(expected.reshape(-1)))
    e = load_dataset("folder", root, val_fraction=0.0, test_fraction=0.0, channels=3)
    assert torch.equal(e.images("train")[0, 2], torch.from_numpy(expected))
    bad = tmp_path / "float"
    bad.mkdir()
    Image.fromarray(np.full((2, 2), 3.5, dtype=np.float32), mode="F").save(bad / "f.tif")
    with pytest.raises(ValueError, match="f.tif.*no defined 8-bit scale"):
        load_dataset("folder", bad, val_fraction=0.0, test_fraction=0.0)


def test_folder_follows_links_but_each_real_folder_once(tmp_path):
    root = tmp_path / "linked"
    (root / "a").mkdir(parents=True)
    for name, value in (("a/x.png", 10), ("y.png", 20)):
        Image.fromarray(np.full((3, 3), value, dtype=np.uint8), mode="L").save(root / name)
    (root / "a" / "back").symlink_to("..")  # a loop (was: 82 files from these 2 images)
    (root / "b").symlink_to(tmp_path / "outside")  # a linked folder elsewhere: followed
    (tmp_path / "outside").mkdir()
    Image.fromarray(np.full((3, 3), 30, dtype=np.uint8), mode="L").save(tmp_path / "outside/z.png")
    (root / "c").symlink_to("b")  # a second link to the same folder: read once
    d = load_dataset("folder", root, val_fraction=0.0, test_fraction=0.0)
    assert sorted(int(r[0]) for r in d.train_pixels) == [10, 20, 30]
    assert d.classes == ("a", "b")


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty"
    p.mkdir()
    (p / "notes.txt").write_text("no images here")
    return p


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not gzip"])
def test_a_damaged_gz_idx_file_is_named_and_leaves_nothing_behind(tmp_path, layout, damage):
    """A cut-off or corrupted .gz raised EOFError / zlib.error with a traceback (not gzip at
    all: an error without the file's name) and left a hidden .tmp file beside it (or in the
    cache) on every attempt."""
    folder = tmp_path / "data" / ("MNIST/raw" if layout == "torchvision" else "")
    write_mnist(folder, n_train=200, compress=True)
    bad = folder / "train-images-idx3-ubyte.gz"
    payload = bytearray(bad.read_bytes())
    if damage == "truncated":
        payload = payload[: len(payload) // 2]
    elif damage == "corrupt":
        for i in range(len(payload) // 3, len(payload) // 3 + 100):
            payload[i] ^= 0xFF
    else:
        payload = bytearray(b"no gzip here")
    bad.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + " is not a valid gzip file"):
        load_dataset("mnist", tmp_path / "data", cache_dir=tmp_path / "cache")
    left = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not left, left


def test_a_truncated_idx_file_is_reported_as_invalid_not_as_a_failed_download(tmp_path):
    write_mnist(tmp_path / "data", n_train=200)
    path = tmp_path / "data" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    # the user's folder is named (the files are read from a copy in the cache, which the
    # message named alone), with the two files of the split
    with pytest.raises(ValueError, match=r"mnist: the train idx files \(train-images-idx3-ubyte "
                                         r"and train-labels-idx1-ubyte\) in "
                                         + re.escape(str(tmp_path / "data")) +
                                         r" \(read from their copy in .*cache.*\) are not valid"):
        load_dataset("mnist", tmp_path / "data", cache_dir=tmp_path / "cache")


def test_folder_channels_follow_the_folders_first_image_whatever_the_seed_or_limit(tmp_path):
    """With channels=None the channel count came from the first file of the shuffled,
    limited train split: (1, 8, 8) for some seeds, (3, 8, 8) for others."""
    for i in range(10):  # 00..04 greyscale (sorted first), 05..09 RGB
        shape = (8, 8) if i < 5 else (8, 8, 3)
        Image.fromarray(np.full(shape, 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    for seed, limit in [(s, None) for s in range(6)] + [(0, n) for n in (1, 2, 3)]:
        data = load_dataset("folder", root=tmp_path, seed=seed, limit=limit, val_fraction=0.2,
                            test_fraction=0.2, cache_dir=tmp_path / "cache")
        assert data.image_shape == (1, 8, 8), (seed, limit)


def test_a_colour_image_after_a_greyscale_first_one_is_refused_not_turned_grey(tmp_path):
    """The first file made the folder greyscale and every colour photo was converted to
    grey without a word (a size mismatch had a clear error); colour stored in RGB files
    whose channels are equal is still fine (see the test above)."""
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "a.png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 100, 50
    for i in range(5):
        Image.fromarray(colour).save(tmp_path / f"b{i}.png")
    options = dict(root=tmp_path, val_fraction=0.2, test_fraction=0.2, cache=False)
    with pytest.raises(ValueError, match=r"b\d\.png is a colour image, but the first image "
                                         r"\(.*a\.png\) is greyscale.*channels=3"):
        load_dataset("folder", **options)
    data = load_dataset("folder", **options, channels=3)
    assert data.image_shape == (3, 8, 8)
    assert load_dataset("folder", **options, channels=1).image_shape == (1, 8, 8)
    # the CLI's way (its advice named only load_dataset's argument, which no config had)
    with pytest.raises(ValueError, match=r"--set data\.channels=3"):
        load_dataset("folder", **options)
    config = load_config(Path(mfa.__file__).parent / "assets" / "embedded-mnist.yaml", [
        "data.name=folder", f"data.root={tmp_path}", "data.val_fraction=0.2",
        "data.test_fraction=0.2", "data.channels=3"])
    kwargs = config.data.load_kwargs()
    assert kwargs["channels"] == 3
    assert load_dataset(**kwargs, cache=False).image_shape == (3, 8, 8)


def test_the_cache_follows_the_first_image_that_sets_the_channels(tmp_path):
    """The channels come from the folder's first file, also when a limit leaves it out of
    the splits; the cache key left it out too, and a cached load kept 1 channel after it
    became RGB (an uncached load: 3)."""
    for i in range(10):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    options = dict(root=tmp_path, limit=3, cache=True, cache_dir=tmp_path / "cache",
                   val_fraction=0.2, test_fraction=0.2)
    for seed in range(20):  # a split that leaves 00.png (all 0) out
        data = load_dataset("folder", **options, seed=seed)
        if all((data.pixels(s) != 0).all() for s in ("train", "val", "test")):
            break
    else:
        pytest.fail("no seed left 00.png out")
    options["seed"] = seed
    assert data.image_shape == (1, 8, 8)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "00.png")
    assert load_dataset("folder", **options).image_shape == (3, 8, 8)
    assert load_dataset("folder", **{**options, "cache": False}).image_shape == (3, 8, 8)


@pytest.mark.parametrize("cache", [False, True])
def test_a_file_name_that_is_not_utf8_loads(tmp_path, cache):
    """A Latin-1 name (bytes b'caf\\xe9.png', decoded by Python with surrogateescape):
    hashing it for the pools' fingerprint and the cache key raised UnicodeEncodeError."""
    root = tmp_path / "images"
    root.mkdir()
    for name in (b"a.png", b"caf\xe9.png", b"z.png"):
        Image.fromarray(np.full((4, 4), len(name), np.uint8)).save(
            os.fsdecode(os.fsencode(root) + b"/" + name))
    data = load_dataset("folder", root, val_fraction=0.0, test_fraction=0.0, cache=cache,
                        cache_dir=tmp_path / "cache")
    assert data.sizes["train"] == 3 and sorted(data.train_pixels[:, 0].tolist()) == [5, 5, 8]


@pytest.mark.parametrize("kind", ["pgm header cut short", "png claiming 20000×20000"])
def test_a_damaged_image_is_named_in_the_error(tmp_path, kind):
    """PIL's errors for these (a ValueError, a DecompressionBombError) named no file; the
    first file (read for the channels) and any later one are named."""
    for position in ("00", "05"):
        root = tmp_path / f"{kind[:3]}-{position}"
        root.mkdir()
        for i in range(8):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(root / f"{i:02d}.png")
        bad = root / f"{position}.{kind[:3]}"
        (root / f"{position}.png").unlink()
        if kind.startswith("pgm"):
            bad.write_bytes(b"P5\n8")  # the header stops before the height
        else:
            Image.new("L", (1, 1)).save(bad)
            raw = bytearray(bad.read_bytes())
            raw[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height
            raw[29:33] = struct.pack(">I", zlib.crc32(raw[12:29]))  # and its checksum
            bad.write_bytes(bytes(raw))
        with pytest.raises(OSError, match=rf"cannot read image {re.escape(str(bad))}: "):
            load_dataset("folder", root, val_fraction=0.0, test_fraction=0.0)


def test_a_damaged_decoded_image_cache_entry_is_decoded_again(tmp_path, caplog):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(root / f"{i:02d}.png")
    options = dict(root=root, cache=True, cache_dir=tmp_path / "cache", val_fraction=0.2,
                   test_fraction=0.2)
    first = load_dataset("folder", **options)
    (entry,) = (tmp_path / "cache" / "decoded").iterdir()
    entry.write_bytes(entry.read_bytes()[:200])  # a partial copy, a full disk
    again = load_dataset("folder", **options)  # raised a raw torch error, every time
    assert torch.equal(again.train_pixels, first.train_pixels)
    assert "unreadable" in caplog.text
    assert torch.equal(load_dataset("folder", **options).test_pixels, first.test_pixels)


def test_celeba_default_size_is_the_int_64_for_any_crop(tmp_path):
    """image_size=None was an exact 64×64 resize, which squashed a non-square crop; the docs
    say the default is 64 (the shorter side to 64, then the centre square)."""
    write_celeba(tmp_path)
    whole = (0, 0, 218, 178)
    default = load_dataset("celeba", tmp_path, crop=whole, cache_dir=tmp_path / "c")
    given = load_dataset("celeba", tmp_path, crop=whole, image_size=64, cache_dir=tmp_path / "c")
    assert default.image_shape == (3, 64, 64)
    assert torch.equal(default.train_pixels, given.train_pixels)


def test_each_row_names_its_source(tmp_path):
    """`mfa outliers` numbered images by their place in the (seeded, limited) split only:
    nothing said which file or row an outlier was. Each row's source, checked against the
    files themselves."""
    markers = write_png_folder(tmp_path / "imgs")
    d = load_dataset("folder", tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2, limit=3)
    for s in ("train", "val", "test"):
        names = d.source_names(s)
        assert len(names) == d.sizes[s]
        for row, name in zip(d.pixels(s), names, strict=True):
            assert not Path(name).is_absolute() and (tmp_path / "imgs" / name).is_file()
            png = np.asarray(Image.open(tmp_path / "imgs" / name))  # [H, W, C]
            assert int(row[0]) == png[0, 0, 0] and markers[int(row[0])] == Path(name).parent.name
    tr, _, te, _ = write_mnist(tmp_path / "MNIST" / "raw", n_train=20, n_test=8)
    m = load_dataset("mnist", tmp_path, limit=5)
    for s, pool, arrays in (("train", "train", tr), ("val", "train", tr), ("test", "test", te)):
        for row, name in zip(m.pixels(s), m.source_names(s), strict=True):
            where, i = name.split(":")
            assert where == pool and np.array_equal(row.numpy(), arrays[int(i)].reshape(-1))
    raw = np.load(Path(mfa.__file__).parent / "assets" / "mnist_5k.npz")["images"]
    e = load_dataset("embedded-mnist", seed=4, limit=50)
    for row, name in zip(e.pixels("test"), e.source_names("test"), strict=True):
        assert name.startswith("all:")
        assert np.array_equal(row.numpy(), raw[int(name[4:])].reshape(-1))


def test_pool_fingerprints_cut_a_prefix_with_the_digests_of_relpath(monkeypatch):
    """Pools.fingerprint called os.path.relpath once per file (1.4-2.7 s for CelebA's 202,599
    files); a prefix cut gives the same digests, here against relpath from the folder each
    layout's files share, given by hand."""
    from mfa.data.sources import Pools

    odd = os.fsdecode(b"caf\xe9.png")  # (a name that is not UTF-8)
    layouts = {  # the shared folder: [files of pool "a"], [files of pool "b"]
        "/data/celeba/img_align_celeba": (["000002.jpg", "000001.jpg"], ["000003.jpg"]),
        "/srv/imgs": (["cats/x/1.png", "dogs/2.png", "3.png"], ["cats/4.png", odd]),
        "/": (["a.png"], ["b/c.png"]),
        "imgs": (["cats/1.png"], ["dogs/2.png", "3.png"]),  # relative paths
        "data/../imgs": (["cats/1.png"], ["dogs/2.png"]),
    }
    relpath, calls = os.path.relpath, []
    monkeypatch.setattr(os.path, "relpath", lambda *a: calls.append(a) or relpath(*a))
    for top, (a, b) in layouts.items():
        files = {"a": [Path(top, n) for n in a], "b": [Path(top, n) for n in b]}
        expected = {}
        for pool, paths in files.items():
            names = "\n".join(Path(relpath(f, top)).as_posix() for f in paths)
            digest = hashlib.sha256(names.encode(errors="surrogateescape")).hexdigest()[:16]
            expected[pool] = [len(paths), digest]
        pools = Pools(kind="train-test", files=files,
                      labels={p: torch.full((len(v),), -1) for p, v in files.items()})
        assert pools.fingerprint() == expected, top
        assert pools.source_names("b", torch.arange(len(b))) == [
            Path(n).as_posix() for n in b]
        assert calls == [], top  # (a prefix cut, not relpath per file)


def test_a_flat_folder_of_the_other_datasets_files_is_refused(tmp_path, monkeypatch):
    """The two share their idx files' names: data.name=mnist with Debian's Fashion-MNIST
    folder as data.root trained on clothing, logged and recorded as mnist. A flat folder is
    told apart by its first training labels (those of the real files), whatever its name."""
    from mfa.data.sources import mnist

    labelled = write_labelled_mnist
    labelled(tmp_path / "data", mnist._FIRST_LABELS["fashion-mnist"])
    with pytest.raises(ValueError, match=r"holds fashion-mnist's idx files .*data.name="
                                         r"fashion-mnist"):
        load_dataset("mnist", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert load_dataset("fashion-mnist", tmp_path / "data",
                        cache_dir=tmp_path / "cache").sizes["test"] == 8
    labelled(tmp_path / "fashion-digits", mnist._FIRST_LABELS["mnist"])  # (a name: no matter)
    with pytest.raises(ValueError, match=r"holds mnist's idx files"):
        load_dataset("fashion-mnist", tmp_path / "fashion-digits", cache_dir=tmp_path / "c2")
    assert load_dataset("mnist", tmp_path / "fashion-digits",
                        cache_dir=tmp_path / "c3").sizes["test"] == 8
    write_mnist(tmp_path / "other", compress=True)  # neither's labels (test files): read
    assert load_dataset("mnist", tmp_path / "other", cache_dir=tmp_path / "c4").sizes["test"] == 8
