"""Tests of mfa.data.decode: errors from worker processes, the decoded-image cache when it
cannot be written, and which files are opened to choose the channels and shape."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_sources import write_celeba

from mfa.data import CELEBA_CROP, decode, load_dataset

WHOLE = dict(val_fraction=0.0, test_fraction=0.0)  # every file in the train split


def png_folder(root, n=6, shape=(8, 8, 3)):
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.full(shape, 20 * i, np.uint8)).save(root / f"{i:02d}.png")
    return root


def damage(root, kind):
    """Spoil ``03.png`` (not the first file, which is read in the main process)."""
    bad = root / "03.png"
    if kind == "truncated":  # (noise: the compressed pixels are long enough to cut short)
        noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(noise).save(bad)
        bad.write_bytes(bad.read_bytes()[:150])
    elif kind == "other size":
        Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(bad)
    else:  # a colour image among greyscale ones
        for i in range(6):
            Image.fromarray(np.full((8, 8), 9 * i, np.uint8)).save(root / f"{i:02d}.png")
        colour = np.zeros((8, 8, 3), np.uint8)
        colour[..., 0] = 200
        Image.fromarray(colour).save(bad)
    return bad


@pytest.mark.parametrize("kind", ["truncated", "other size", "colour among grey"])
def test_a_workers_error_is_the_error_of_decoding_in_this_process(tmp_path, kind):
    """With worker processes the error came back as torch's wrapper, 'Caught OSError in
    DataLoader worker process 0. Original Traceback …' (47 lines in the CLI), instead of the
    one line 'cannot read image …/03.png: …' that decoding in the main process gives."""
    bad = damage(png_folder(tmp_path / "images"), kind)
    errors = []
    for workers in (0, 1):
        with pytest.raises(Exception) as caught:  # noqa: B017 - compared below
            load_dataset("folder", tmp_path / "images", num_workers=workers, batch_size=2,
                         **WHOLE)
        errors.append(caught.value)
    alone, worker = errors
    assert type(worker) is type(alone) and str(worker) == str(alone)
    assert str(bad) in str(worker) and "DataLoader worker" not in str(worker)
    assert len(str(worker).splitlines()) == 1


def test_an_error_that_cannot_leave_its_worker_is_still_raised(tmp_path, monkeypatch):
    """An error that does not pickle cannot leave a worker (torch's own wrapper of it neither:
    the batch was lost and the main process waited forever): its nearest base class that
    pickles carries its message instead."""

    class Unpicklable(ValueError):  # (a local class: pickle cannot find it)
        pass

    def fail_in_batches(self, i):
        if len(self.paths) == 1:  # the probe of the first image, in this process
            return torch.zeros(3, 8, 8, dtype=torch.uint8)
        raise Unpicklable("cannot decode")

    png_folder(tmp_path / "images")
    monkeypatch.setattr(decode.DecodeFiles, "__getitem__", fail_in_batches)
    with pytest.raises(Unpicklable, match="cannot decode"):
        load_dataset("folder", tmp_path / "images", num_workers=0, batch_size=2, **WHOLE)
    with pytest.raises(ValueError, match="^cannot decode$") as caught:
        load_dataset("folder", tmp_path / "images", num_workers=1, batch_size=2, **WHOLE)
    assert caught.type is ValueError


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path, caplog):
    """A cache_dir that is a file raised FileExistsError after the whole decode, losing it."""
    root = png_folder(tmp_path / "images")
    blocked = tmp_path / "cache-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="mfa.data.decode"):
        data = load_dataset("folder", root, cache=True, cache_dir=blocked, **WHOLE)
    assert torch.equal(data.train_pixels, load_dataset("folder", root, **WHOLE).train_pixels)
    assert "cannot be written" in caplog.text and str(blocked) in caplog.text
    assert blocked.read_text() == "not a folder"


def test_celeba_with_a_limit_opens_only_the_selected_files(tmp_path):
    """load_dataset('celeba', root, limit=1) opened 000001.jpg to choose the channels and
    the shape even when the limit left it out, and failed naming it when it was missing."""
    write_celeba(tmp_path)
    options = dict(limit=1, image_size=8, cache_dir=tmp_path / "cache")
    for seed in range(20):  # a seed whose subsets leave 000001.jpg out
        data = load_dataset("celeba", tmp_path, seed=seed, **options)
        if not any("000001" in n for s in ("train", "val", "test")
                   for n in data.source_names(s)):
            break
    else:
        pytest.fail("no seed left 000001.jpg out")
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").unlink()
    for channels in (None, 3, 1):
        kept = load_dataset("celeba", tmp_path, seed=seed, channels=channels, **options)
        assert kept.image_shape == (channels or 3, 8, 8)
        if channels != 1:
            for s in ("train", "val", "test"):
                assert torch.equal(kept.pixels(s), data.pixels(s))


def test_a_cached_entry_does_not_skip_celebas_size_check(tmp_path):
    """An entry written with CELEBA_CROP given explicitly (no size check) had the key of the
    default load, which then returned 256 × 256 files cropped where no face is instead of
    refusing them as it does without the cache."""
    folder = write_celeba(tmp_path)
    for image in (folder / "img_align_celeba").iterdir():
        Image.new("RGB", (256, 256), (9, 9, 9)).save(image)
    options = dict(cache=True, cache_dir=tmp_path / "cache", image_size=8)
    assert load_dataset("celeba", tmp_path, crop=CELEBA_CROP, **options).sizes["test"] == 1
    with pytest.raises(ValueError, match=r"is 256 × 256 pixels, not the 178 × 218"):
        load_dataset("celeba", tmp_path, **options)


def _same_looking_projects(tmp_path, write):
    """``projA/imgs`` and ``projB/imgs`` whose files have the same names, sizes and
    modification times (as an archive's extraction sets them) but other pixels."""
    for project, value in (("projA", 10), ("projB", 200)):
        for path in write(tmp_path / project):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="PPM")
            os.utime(path, ns=(1_600_000_000_000_000_000,) * 2)


def test_a_relative_root_keys_the_cache_on_its_folder_not_its_spelling(tmp_path, monkeypatch):
    """load_dataset('folder', 'imgs', cache=True) from two working directories reused one
    cache entry: project B got project A's pixels. The same for a relative $MFA_DATA_DIR."""

    def images(project):
        (project / "imgs").mkdir(parents=True)
        return [project / "imgs" / f"{i}.ppm" for i in range(6)]

    _same_looking_projects(tmp_path, images)
    options = dict(cache=True, cache_dir=tmp_path / "cache", **WHOLE)
    for project, value in (("projA", 10), ("projB", 200), ("projA", 10)):
        monkeypatch.chdir(tmp_path / project)
        assert (load_dataset("folder", "imgs", **options).train_pixels == value).all()
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 2

    def celeba(project):
        folder = write_celeba(project)  # (its JPEGs, replaced by PPMs of one byte size)
        return sorted((folder / "img_align_celeba").iterdir())

    _same_looking_projects(tmp_path / "faces", celeba)
    monkeypatch.setenv("MFA_DATA_DIR", ".")
    options = dict(crop=(0, 0, 8, 8), cache=True, cache_dir=tmp_path / "cache")
    for project, value in (("projA", 10), ("projB", 200)):
        monkeypatch.chdir(tmp_path / "faces" / project)
        assert (load_dataset("celeba", **options).train_pixels == value).all()
