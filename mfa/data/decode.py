"""Decoding image files (CelebA, ``"folder"``) into uint8 rows, with an optional cache.

Files are decoded in batches by a :class:`~torch.utils.data.DataLoader` (optionally with worker
processes) straight into one uint8 tensor per split; no PIL image outlives its batch. With a
cache folder the decoded splits are saved as ``<cache>/decoded/<name>-<fingerprint>.pt`` and
reused while the files (paths, sizes, modification times) and the options are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from mfa.data.locations import DatasetNotFoundError
from mfa.data.splits import SPLITS
from mfa.data.transforms import check_crop_fits, transform

logger = logging.getLogger(__name__)

__all__ = ["DecodeFiles", "decode_splits"]

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
#: Greyscale modes of more than 8 bits, which ``Image.convert`` would clip at 255.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _eight_bit(im: Image.Image, path) -> Image.Image:
    """``im`` itself, or for a 16-bit greyscale image (``I;16*``, or ``I`` with values in
    ``[0, 65535]``, as PNG decoders give) the same image scaled to 8 bits
    (``round(v·255/65535)``). Other wide images (``F``, ``I`` beyond 16 bits) have no
    defined pixel scale and are refused."""
    if im.mode not in _WIDE_MODES:
        return im
    values = np.asarray(im)
    if im.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise ValueError(
            f"{path}: a mode-{im.mode} image with values in [{values.min()}, {values.max()}] "
            "has no defined 8-bit scale; only 8-bit and 16-bit images are read (convert it "
            "to an 8-bit or 16-bit PNG)"
        )
    scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), "L")


class DecodeFiles(Dataset):
    """Decodes image files to uint8 ``[C, H, W]`` tensors (used inside a DataLoader)."""

    def __init__(self, paths, mode, crop, size, expected=None, grey_from=None,
                 source_size=None):
        self.paths, self.mode, self.crop, self.size = paths, mode, crop, size
        self.expected = expected
        # (width, height) every file must have: a fixed crop box placed for that size (the
        # aligned CelebA face box) cropped no face from a 1024 × 1024 image, silently
        self.source_size = source_size
        # the greyscale first image that chose mode "L" (channels not given): a colour image
        # (not one whose channels are all equal) is refused rather than turned grey
        self.grey_from = grey_from

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                if self.source_size is not None and tuple(im.size) != self.source_size:
                    raise ValueError(
                        f"{path} is {im.width} × {im.height} pixels, not the "
                        f"{self.source_size[0]} × {self.source_size[1]} of the images the crop "
                        f"box {self.crop} is placed for (aligned CelebA); load other images "
                        "with load_dataset(..., crop=...) or as a 'folder' dataset")
                if self.crop is not None:
                    check_crop_fits(self.crop, im.height, im.width, str(path))
                if self.grey_from is not None and im.mode not in _GREY_MODES:
                    _check_grey(im, path, self.grey_from)
                img = transform(_eight_bit(im, path).convert(self.mode), self.crop, self.size)
                arr = np.array(img, dtype=np.uint8)  # a writable copy
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"image file {path} is missing") from err
        except _READ_ERRORS as err:
            raise _unreadable(path, err) from err
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.expected is not None and tuple(t.shape) != self.expected:
            raise ValueError(
                f"{path} gives an image of shape {tuple(t.shape)} (C, H, W) but the first "
                f"image gives {self.expected}; pass image_size= (CLI: --set data.image_size=S) "
                "to resize all images to one size"
            )
        return t


class _ErrorsAsValues(Dataset):
    """``files[i]``, or the exception it raised, returned rather than raised: a DataLoader
    worker wraps a raised error into a new one whose message holds the worker's traceback
    (``Caught OSError in DataLoader worker process 0. Original Traceback …``), while a returned
    one reaches the main process as it was (see :func:`_stack_or_error`)."""

    def __init__(self, files: DecodeFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor | Exception:
        try:
            return self.files[i]
        except Exception as err:  # noqa: BLE001 - re-raised by decode_splits
            return err if get_worker_info() is None else _portable(err)


def _portable(err: Exception) -> Exception:
    """``err``, if it survives pickling (as a worker's result must: one that does not is
    lost, and the main process waits for it forever), else its message as the nearest base
    class that does (a ``ValueError`` for a ``ValueError`` subclass defined in a function)."""
    for cls in type(err).__mro__:
        try:
            candidate = err if cls is type(err) else cls(str(err))
            if type(pickle.loads(pickle.dumps(candidate))) is cls:
                return candidate
        except Exception:  # noqa: BLE001 - not this class: try its base
            continue
    return RuntimeError(f"{type(err).__name__}: {err}")  # pragma: no cover


def _stack_or_error(items: list[Tensor | Exception]) -> Tensor | Exception:
    """The images ``[B, C, H, W]`` of a batch, or the first error among them."""
    for item in items:
        if isinstance(item, Exception):
            return item
    return default_collate(items)  # (in a worker: straight into shared memory)


#: What PIL raises for a damaged file: OSError, ValueError (a PPM/PGM header cut short) and
#: DecompressionBombError (a header claiming too many pixels), which name no file.
_READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _unreadable(path: Path, err: Exception) -> Exception:
    """``err`` as an error naming ``path`` (as it is, when it names it already)."""
    if str(path) in str(err):
        return err
    return OSError(f"cannot read image {path}: {err}")


def _check_grey(im: Image.Image, path, first) -> None:
    """Refuse a colour image among greyscale ones (its channels differ somewhere)."""
    rgb = np.asarray(im.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return  # grey content stored as colour: nothing is lost
    raise ValueError(
        f"{path} is a colour image, but the first image ({first}) is greyscale, which makes "
        "every image greyscale (channels 1); read them all in colour with channels=3 "
        "(load_dataset's argument; data.channels in a config, e.g. --set data.channels=3), or "
        "all as greyscale with channels=1, or remove or convert the odd file")


def _first_mode(path: Path) -> str:
    """``"L"`` for a greyscale first image, else ``"RGB"``."""
    try:
        with Image.open(path) as im:
            return "L" if im.mode in _GREY_MODES else "RGB"
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"image file {path} is missing") from err
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err


def _default_workers(n: int) -> int:
    """0 for fewer than 2,000 files, else ``min(8, CPUs)``."""
    if n < 2000:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


#: Part of every cache fingerprint: raised when decoding changes, so older caches are not
#: reused (2: 16-bit greyscale scaled to 8 bits, no longer clipped; 3: CelebA's files checked
#: to be 178 × 218 under the default face box, which entries written before skipped).
DECODER_VERSION = 3


def _fingerprint(files: dict[str, list[Path]], key: dict, first: Path | None = None) -> str:
    """A hash of the decoder's version, the options ``key`` and every file's path, size and
    modification time, and those of ``first`` (the file whose mode sets the channels)."""
    h = hashlib.sha256(f"decoder {DECODER_VERSION}|".encode())
    h.update(json.dumps(key, sort_keys=True, default=str).encode())
    for s, paths in [*((s, files[s]) for s in SPLITS), ("first", [first] if first else [])]:
        h.update(f"|{s}|".encode())
        for p in paths:
            try:
                st = p.stat()
                entry = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError:
                entry = f"{p}\0missing\n"
            # (surrogateescape: a name that is not UTF-8 keeps the bytes it was read from)
            h.update(entry.encode(errors="surrogateescape"))
    return h.hexdigest()[:24]


def decode_splits(
    files: dict[str, list[Path]],
    *,
    channels: int | None,
    crop,
    size,
    num_workers: int | None,
    batch_size: int,
    progress: bool,
    cache: Path | None,
    cache_key: dict,
    first: Path | None = None,
    source_size: tuple[int, int] | None = None,
    missing_advice: str = "",
) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
    """Decode ``files`` (per split) into uint8 rows ``{split: [N, D]}`` and their ``(C, H, W)``.

    ``channels`` 1 or 3 converts to greyscale/RGB (``None``: as the image ``first``, the
    dataset's first file, whatever the split or subset; default: the first of ``files``);
    every image must come out with the shape of that image (with ``channels`` given: of the
    first of ``files``; ``first`` is then not opened). ``source_size`` is the
    ``(width, height)`` every file must have (``None``: any). ``cache`` (a folder or ``None``)
    keeps the result under a fingerprint of ``cache_key``, ``source_size`` and the files; a
    cache that cannot be written is logged and skipped. Missing files raise a
    :class:`DatasetNotFoundError` that ends with ``missing_advice`` (the source's fix).

    An image that cannot be decoded raises the same error with worker processes as without.
    """
    cache_file = None
    if cache is not None:
        # (the size every file must have: an entry decoded without that check, e.g. with the
        # same crop given explicitly, is not an answer for a load that makes it)
        key = dict(cache_key, source_size=source_size)
        fingerprint = _fingerprint(files, key, first)
        cache_file = cache / "decoded" / f"{cache_key['name']}-{fingerprint}.pt"
        if cache_file.is_file():
            try:
                saved = torch.load(cache_file, weights_only=True)
                return {s: saved[s] for s in SPLITS}, tuple(saved["image_shape"])
            except Exception as err:  # noqa: BLE001 - a damaged entry is decoded again
                logger.warning("decoded-image cache %s is unreadable (%s: %s): decoding the "
                               "images again", cache_file, type(err).__name__, err)

    everything = [p for s in SPLITS for p in files[s]]
    missing = [p for p in everything if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(_missing(missing, len(everything), missing_advice))
    first = everything[0] if first is None else first
    mode = "L" if channels == 1 else "RGB" if channels == 3 else _first_mode(first)
    # the shape of the image that chose the mode, or (channels given) of the first selected
    # one: a dataset's first file outside a limited selection need not exist
    probe = DecodeFiles([first if channels is None else everything[0]], mode, crop, size)[0]
    shape = tuple(int(v) for v in probe.shape)
    d = shape[0] * shape[1] * shape[2]
    workers = _default_workers(len(everything)) if num_workers is None else num_workers

    out: dict[str, Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(everything), desc="decoding images", unit="img")
    try:
        for s in SPLITS:
            paths = files[s]
            pix = torch.empty((len(paths), d), dtype=torch.uint8)
            if paths:
                loader = DataLoader(
                    _ErrorsAsValues(DecodeFiles(
                        paths, mode, crop, size, expected=shape,
                        grey_from=first if channels is None and mode == "L" else None,
                        source_size=source_size)),
                    batch_size=batch_size,
                    num_workers=workers if len(paths) > batch_size else 0,
                    collate_fn=_stack_or_error,
                    generator=torch.Generator(),  # (its workers' seeds: not the global RNG's)
                )
                pos = 0
                for batch in loader:
                    if isinstance(batch, Exception):
                        raise batch  # as decoding in this process raises it
                    b = batch.shape[0]
                    pix[pos : pos + b] = batch.reshape(b, d)
                    pos += b
                    if bar is not None:
                        bar.update(b)
            out[s] = pix
    finally:
        if bar is not None:
            bar.close()

    if cache_file is not None:
        _save_cache(cache_file, {**out, "image_shape": list(shape)})
    return out, shape  # type: ignore[return-value]


def _missing(missing: list[Path], total: int, advice: str) -> str:
    """The error for ``missing`` of ``total`` files: where all are missing and the first one
    lies one folder deeper (``img_align_celeba/img_align_celeba/000001.jpg``: an archive
    unpacked into a folder of its own name), that they are to be moved up; else ``advice``."""
    head = f"{len(missing)} of {total} image files are missing, e.g. {missing[0]}"
    folder = missing[0].parent
    nested = folder / folder.name
    if len(missing) == total and (nested / missing[0].name).is_file():
        return (f"{head}: they are one folder too deep, in {nested}/ (an archive unpacked "
                f"into a folder of its own name); move the files of {nested} up into {folder} "
                "and remove the then empty folder")
    return f"{head}; {advice}" if advice else head


def _save_cache(cache_file: Path, entry: dict) -> None:
    """Write ``entry`` to ``cache_file`` atomically; a failure (a cache folder that is a file
    or read-only, a full disk) is logged, not raised: the images are decoded already."""
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    try:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(entry, tmp)  # (torch raises RuntimeError where it cannot write)
            os.replace(tmp, cache_file)
        finally:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
    except (OSError, RuntimeError) as err:
        logger.warning("decoded-image cache %s cannot be written (%s: %s): the decoded images "
                       "are used without it", cache_file, type(err).__name__, err)
