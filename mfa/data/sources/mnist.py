"""The ``"mnist"`` and ``"fashion-mnist"`` sources: the four idx files, read by torchvision.

``root`` holds torchvision's layout (``root/MNIST/raw/<idx files>``; ``.gz`` files there are
extracted in place, as torchvision does) or a flat folder of the four files, ``.gz`` or not,
such as Debian's :data:`FASHION_MNIST_DEBIAN_DIR`; a flat folder is extracted or copied once
into ``cache_dir/idx`` in torchvision's layout. The official test split is the test split.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch

from mfa.data.locations import DOWNLOAD_HINT, DatasetNotFoundError, default_data_root
from mfa.data.sources.pools import Pools

__all__ = ["FASHION_MNIST_DEBIAN_DIR", "MNIST_FILES", "mnist_pools"]

#: Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST idx files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The idx files of MNIST and Fashion-MNIST (each may also be ``.gz``).
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

#: The first ten training labels of each dataset's real files. The two share their files'
#: names, so a flat folder (an explicit root) is told apart by these: Debian's
#: Fashion-MNIST folder given as mnist's root trained on clothing, recorded as mnist.
_FIRST_LABELS = {"mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
                 "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5)}


def _first_labels(path: Path) -> tuple[int, ...] | None:
    """The first ten labels of an idx label file (``.gz`` or not), ``None`` if unreadable."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(18)
    except (OSError, EOFError, zlib.error):
        return None
    return tuple(head[8:18]) if len(head) == 18 else None


def _check_not_the_other(key: str, base: Path, files: dict[str, Path]) -> None:
    """Refuse a flat folder whose files are the other dataset's (by their first labels)."""
    first = _first_labels(files["train-labels-idx1-ubyte"])
    other = next((name for name, labels in _FIRST_LABELS.items()
                  if name != key and labels == first), None)
    if other is not None:
        raise ValueError(
            f"{base} holds {other}'s idx files (its first training labels are {other}'s), "
            f"not {key}'s: the two share their files' names; use data.name={other}, or a "
            f"root that holds {key} (e.g. <root>/{_MNIST_CLASS[key]}/raw)")


def _idx_file(folder: Path, base: str) -> Path | None:
    """``folder/base``, or its ``.gz`` where only that is there or it is newer than the
    uncompressed file (replaced since it was extracted: extracting it again is due; an
    uncompressed file newer than its ``.gz`` is the user's and is read as it is)."""
    plain, packed = folder / base, folder / f"{base}.gz"
    if plain.is_file():
        if packed.is_file() and packed.stat().st_mtime_ns > plain.stat().st_mtime_ns:
            return packed
        return plain
    return packed if packed.is_file() else None


def _idx_files(folder: Path, absent: dict[str, list[str]]) -> dict[str, Path] | None:
    """The four idx files in ``folder``, or ``None`` (recording in ``absent[folder]`` the
    names of those that are not there) unless all are."""
    found = {b: _idx_file(folder, b) for b in MNIST_FILES}
    missing = [b for b, path in found.items() if path is None]
    if missing:
        absent[str(folder)] = missing
        return None
    return found  # type: ignore[return-value]


def _absent(folder: str, missing: list[str]) -> str:
    """``folder`` and which idx files it lacks, for the not-found error."""
    if len(missing) == len(MNIST_FILES):
        return f"{folder} (which has none of them)"
    return f"{folder} (which lacks {' and '.join(missing)})"


def _fresh(dest: Path, src: Path) -> bool:
    try:
        return dest.stat().st_mtime_ns == src.stat().st_mtime_ns and dest.stat().st_size > 0
    except OSError:
        return False


def _materialise(files: dict[str, Path], raw: Path) -> None:
    """Put uncompressed copies (or links) of ``files`` into ``raw`` under their idx names."""
    raw.mkdir(parents=True, exist_ok=True)
    for base, src in files.items():
        dest = raw / base
        if src == dest or _fresh(dest, src):
            continue
        tmp = raw / f".{base}.tmp{os.getpid()}"
        try:
            if src.suffix == ".gz":
                with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            else:
                shutil.copyfile(src, tmp)
            st = src.stat()
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dest)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # the file, not the folder
            raise ValueError(f"{src} is not a valid gzip file (a truncated or corrupt "
                             f"download?): {type(err).__name__}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)  # nothing half-written is left in the user's folder


def _unusable_cache(key: str, source: Path, mirror: Path, cache_dir: Path,
                   err: OSError) -> None:
    """Raise ``err`` as an error naming ``cache_dir`` and how to choose another, where it is
    the cache that failed (a bare NotADirectoryError or PermissionError escaped); an error
    reading ``source``'s own files is re-raised as it is."""
    # (the source's folder, not a string prefix of cache_dir: the default data root lies
    # inside the default cache dir, and an unreadable source file was blamed on the cache;
    # the copies' folder, cache_dir and its parents first: they may lie inside the source's)
    where = None if err.filename is None else Path(os.fspath(err.filename))
    if (where is not None and where.is_relative_to(source)
            and not where.is_relative_to(mirror.parent) and not cache_dir.is_relative_to(where)):
        raise err
    raise OSError(
        f"{key}: the idx files in {source} are read from an extracted copy in cache_dir, but "
        f"{mirror} cannot be written ({type(err).__name__}: {err}); make cache_dir "
        f"({cache_dir}) a writable folder, or choose another with load_dataset(cache_dir=...) "
        "or (for the mfa CLI too) the environment variable $MFA_CACHE_DIR"
    ) from err


def _mnist_root(key: str, root: Path | None, download: bool,
                cache_dir: Path) -> tuple[Path, Path | None]:
    """A folder ``R`` with ``R/<Class>/raw/<idx files>`` uncompressed, for torchvision, and
    the folder the files came from when ``R`` is a copy of them in the cache (else ``None``)."""
    cls = _MNIST_CLASS[key]
    # (folder, whether the idx files may lie directly in it). MNIST and Fashion-MNIST share
    # their idx files' names, so only a folder that names one dataset (an explicit root, the
    # Debian package's) is read flat; the shared default root only as <root>/<Class>/raw.
    if root is not None:
        candidates = [(root, True)]
    else:
        candidates = [(default_data_root(), False)]
        if key == "fashion-mnist":
            candidates.append((FASHION_MNIST_DEBIAN_DIR, True))
    absent: dict[str, list[str]] = {}  # folder looked in → the idx files it lacks
    for base, flat in candidates:
        raw = base / cls / "raw"
        files = _idx_files(raw, absent)
        if files is not None:
            if all(p.suffix != ".gz" for p in files.values()):
                return base, None
            try:  # extract next to the .gz files, as torchvision's download() would
                _materialise(files, raw)
                return base, None
            except OSError:
                pass  # read-only: use the cache below
        elif flat:
            files = _idx_files(base, absent)
            if files is not None:
                _check_not_the_other(key, base, files)
        if files is not None:
            tag = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:12]
            mirror = cache_dir / "idx" / f"{key}-{tag}"
            source = next(iter(files.values())).parent
            try:
                _materialise(files, mirror / cls / "raw")
            except OSError as err:
                _unusable_cache(key, source, mirror, cache_dir, err)
            return mirror, source
    if download:
        return (root if root is not None else default_data_root()), None
    names = ", ".join(MNIST_FILES)
    partial = [f for f, missing in absent.items() if len(missing) < len(MNIST_FILES)]
    fix = (f"Put the missing ones in {partial[0]} (from the download the others came from), "
           "or pass" if partial else "Pass")
    raise DatasetNotFoundError(
        f"{key} not found: looked for its idx files ({names}, optionally .gz) in "
        f"{' and '.join(_absent(f, m) for f, m in absent.items())}. {fix} {DOWNLOAD_HINT} to "
        f"fetch it with torchvision into {root or default_data_root()}, or put the four files in "
        f"<root>/{cls}/raw/ (or directly in a folder passed as the root)"
        + (
            " (Debian/Ubuntu: apt-get install dataset-fashion-mnist puts them in "
            f"{FASHION_MNIST_DEBIAN_DIR})"
            if key == "fashion-mnist"
            else ""
        )
        + "."
    )


def mnist_pools(key: str, root: Path | None, download: bool, cache_dir: Path) -> Pools:
    """The official train and test splits of ``key`` as uint8 images ``[N, 1, 28, 28]``."""
    import torchvision.datasets as tvd
    from torchvision.datasets.mnist import read_image_file, read_label_file

    base, source = _mnist_root(key, root, download, cache_dir)
    cls = getattr(tvd, _MNIST_CLASS[key])
    raw = Path(base) / _MNIST_CLASS[key] / "raw"
    images, labels, origins = {}, {}, {}
    for pool, train in (("train", True), ("test", False)):
        if download:  # (torchvision fetches the files; they are read below)
            try:
                cls(str(base), train=train, download=True)
            except RuntimeError as err:
                raise DatasetNotFoundError(
                    f"{key}: torchvision could not load or download it into {base}: {err}"
                ) from err
        # The idx files themselves: torchvision's class loads an old download's
        # processed/*.pt instead, where those exist.
        prefix = "train" if train else "t10k"
        try:
            data = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))
            targets = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
        except (RuntimeError, AssertionError, ValueError, TypeError, struct.error,
                OSError) as bad:  # its idx reader (TypeError: another element type)
            where = raw if source is None else f"{source} (read from their copy in {raw})"
            raise ValueError(
                f"{key}: the {pool} idx files ({prefix}-images-idx3-ubyte and "
                f"{prefix}-labels-idx1-ubyte) in {where} are not valid idx files (a truncated "
                f"or corrupt download?): {type(bad).__name__} {bad}".rstrip()
            ) from bad
        if data.shape[0] != targets.shape[0]:  # (Pools.check would name neither file)
            where = raw if source is None else f"{source} (read from their copies in {raw})"
            raise ValueError(
                f"{key}: the {pool} idx files in {where} disagree: "
                f"{prefix}-images-idx3-ubyte holds {data.shape[0]} images but "
                f"{prefix}-labels-idx1-ubyte {targets.shape[0]} labels (not a pair from one "
                "download, or one cut short); replace both with the files of one download, "
                f"or delete them and pass {DOWNLOAD_HINT} to fetch them again")
        if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) <= 9:
            bad = int(targets[(targets < 0) | (targets > 9)][0])
            labels_file = f"{prefix}-labels-idx1-ubyte"  # (the user's file, not the cache's)
            where = (raw / labels_file if source is None
                     else f"{labels_file} in {source} (read from its copy in {raw})")
            raise ValueError(f"{key}: {where} has a label {bad}; the labels are the ten "
                             "classes 0 to 9")
        images[pool] = data.unsqueeze(1).contiguous()
        origins[pool] = str(raw / f"{prefix}-images-idx3-ubyte") if source is None else (
            f"{prefix}-images-idx3-ubyte in {source}")
        labels[pool] = targets.to(torch.int64)
    return Pools(
        kind="train-test",
        images=images,
        labels=labels,
        classes=tuple(cls.classes),
        metadata={"root": str(base)},
        origins=origins,
    )
