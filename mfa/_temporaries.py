"""The temporary files of atomic writes, and removing those that killed writers left.

:func:`mfa.checkpoint.save_checkpoint` writes to ``.<name>.<pid>.<hex>.tmp`` beside the
destination (:func:`reserved_temporary`), fsyncs it and renames it over the destination. A
writer killed outright cannot remove its temporary; :func:`clean_stale_temporaries` removes
the ones whose writer is gone. A run's other results (metrics, history, figures, CSV files)
go through :func:`write_atomically`, which fsyncs them the same way: an interrupted write
leaves the earlier file, never a truncated one. A write that must not replace a file (the
per-run commands' default names, :func:`free_path`) ends with a hard link, which fails
where a file has that name, and moves on to the next free one (:func:`next_free`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

__all__ = [
    "STALE_TEMPORARY_AGE",
    "IfExists",
    "clean_stale_temporaries",
    "fsync_file",
    "fsync_folder",
    "folder_for_output",
    "free_path",
    "naming",
    "next_free",
    "reserved_temporary",
    "write_atomically",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)

STALE_TEMPORARY_AGE = 24 * 3600.0  # seconds; an untouched temporary this old is abandoned


_writing: set[str] = set()  # names of the temporaries this process is writing now
_writing_lock = threading.Lock()


def _tag(path: Path) -> str:
    """``path``'s name in its temporaries' names: the name itself, or where that would make a
    temporary's name longer than a folder entry may be (255 bytes), its first 100 characters
    (at most 100 bytes) and a hash of the whole."""
    name = path.name
    if len(name.encode()) <= 255 - 32:  # room for ".", ".<pid>.<8 hex>.tmp"
        return name
    head = name.encode()[:100].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """Names that ``save_checkpoint`` gives the temporaries of ``path``; group 1: the pid."""
    return re.compile(rf"\.{re.escape(_tag(path))}\.(\d+)\.[0-9a-f]+\.tmp")


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (True when it cannot be told)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return True
    return True


def clean_stale_temporaries(
    path: str | os.PathLike[str], max_age: float = STALE_TEMPORARY_AGE, by_pid: bool = True
) -> list[Path]:
    """Remove the temporaries that writers of ``path`` killed mid-write left behind.

    :func:`mfa.checkpoint.save_checkpoint` writes to ``.<name>.<pid>.<hex>.tmp`` beside
    ``path`` and renames it over ``path``; a writer killed outright (``kill -9``, the OOM
    killer) leaves that file, full-size. A temporary is removed when its writer is gone: its
    pid names no process (or names this process, which is not writing it), or it has not been
    modified for ``max_age`` seconds (a pid reused by another process). The temporary of a
    live writer is kept. ``save_checkpoint`` calls this; resume code may too. A pid is
    checked on this machine (in this PID namespace), so on a folder shared with other
    machines or containers call it only where the writers run; readers
    (``load_checkpoint``) pass ``by_pid=False`` and remove only temporaries ``max_age`` old:
    ``mfa sample`` on a run training in another container removed its live temporary, and
    the run failed at its rename.

    Args:
        path: the checkpoint file (it need not exist).
        max_age: seconds without a write after which a temporary counts as abandoned.
        by_pid: also remove younger temporaries whose pid names no process here.

    Returns:
        The removed files. Files that cannot be removed are logged and kept.
    """
    path = Path(path)
    folder, pattern = path.parent, _temporary_pattern(path)
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder, or not readable: nothing to clean
        return []
    removed = []
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        with _writing_lock:
            if entry.name in _writing:
                continue
        pid = int(match.group(1))
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if age < max_age and (not by_pid or (pid != os.getpid() and _process_exists(pid))):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        except OSError as error:
            logger.warning("cannot remove stale checkpoint temporary %s: %s", entry.path, error)
            continue
        logger.info("removed stale checkpoint temporary %s (writer %d gone)", entry.path, pid)
        removed.append(folder / entry.name)
    return removed


@contextlib.contextmanager
def reserved_temporary(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``path`` that no cleaner in this process removes while
    the ``with`` block runs (the caller creates, writes and renames the file)."""
    name = f".{_tag(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with _writing_lock:  # before the file exists, so no cleaner takes it for a stale one
        _writing.add(name)
    try:
        yield path.parent / name
    finally:
        with _writing_lock:
            _writing.discard(name)


def fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (a no-op where the file system cannot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def naming(error: BaseException, what: str, note: str = "") -> OSError:
    """A failed write's ``error`` as an OSError whose message says ``cannot write <what>``
    (its errno, and so its subclass, kept; ``note`` appended): a write's own error names no
    file ("[Errno 28] No space left on device") or names the temporary. Torch's RuntimeError
    of a short write ("[enforce fail at inline_container.cc:672] . unexpected pos ...")
    becomes one too."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or type(error).__name__
    else:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = f"writing failed ({first}); is the disk full?"
    message = f"cannot write {what}: {reason}{note}"
    code = getattr(error, "errno", None)
    return OSError(code, message) if code is not None else OSError(message)


#: How :func:`write_atomically` treats a file that is at its destination when the write
#: ends: ``"replace"`` it, ``"refuse"`` (FileExistsError), or a function of the taken path
#: giving the next name to try (e.g. :func:`next_free`'s).
IfExists = Literal["replace", "refuse"] | Callable[[Path], Path]


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object], *,
                     if_exists: IfExists = "replace") -> Path:
    """``write(temporary)`` to a temporary beside ``path``, fsync it, then one ``os.replace``
    onto it (and fsync the folder): a write interrupted or failed (Ctrl-C, a full disk, a
    power cut) leaves ``path`` as it was or the new file whole, never a truncated one.

    ``if_exists`` other than ``"replace"`` never replaces a file: the last step is a hard
    link of the temporary to ``path``, which fails where a file has that name (one another
    process wrote since ``path`` was chosen free); ``"refuse"`` then raises, and a function
    gives the name to try next. (On a file system without hard links, an exclusive create
    claims the name just before the rename: a process killed between the two leaves an empty
    file there.) Returns the path written.

    Raises:
        OSError: the write failed, naming ``path`` (the original error is its cause);
            FileExistsError: ``if_exists="refuse"`` and a file is at ``path``.
    """
    path = Path(path)
    if not (if_exists in ("replace", "refuse") or callable(if_exists)):
        raise ValueError(f"if_exists must be 'replace', 'refuse' or a function, "
                         f"got {if_exists!r}")
    with reserved_temporary(path) as temporary:
        try:
            write(temporary)
            fsync_file(temporary)  # (a rename can reach the disk before the data it names)
            if if_exists == "replace":
                os.replace(temporary, path)
            else:
                path = _link_free(temporary, path, if_exists)
        except OSError as error:
            raise naming(error, str(path)) from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    fsync_folder(path.parent)
    return path


def _link_free(temporary: Path, path: Path, if_exists: IfExists) -> Path:
    """Give ``temporary`` the name ``path``, or where a file has it (FileExistsError with
    ``if_exists="refuse"``) the next that ``if_exists(path)`` gives; the name given."""
    for _ in range(1000):
        try:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system: claim the name, then rename
                # (a process killed between the two leaves the claim: an empty file)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    os.close(fd)
                    os.replace(temporary, path)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            return path
        except FileExistsError:
            if not callable(if_exists):
                raise FileExistsError(errno.EEXIST, "a file of that name exists; it is kept, "
                                      "not replaced") from None
            path = Path(if_exists(path))
    raise FileExistsError(errno.EEXIST, "every name tried was taken meanwhile")


def write_text_atomically(path: str | os.PathLike[str], text: str, *,
                          if_exists: IfExists = "replace") -> Path:
    """:func:`write_atomically` of ``text`` (UTF-8)."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"),
                            if_exists=if_exists)


def free_path(path: Path, companions: tuple[str, ...] = (), skip: Path | None = None) -> Path:
    """``path`` when neither it nor ``path`` with any suffix in ``companions`` exists, else the
    first free ``<stem>-2``, ``<stem>-3``, … beside it (nothing there is replaced; a dangling
    link is taken too); ``skip``: a name taken even when free (kept for the run that will
    write it). Another process may take the name before it is written: write with
    ``if_exists=next_free(...)`` (:func:`write_atomically`)."""

    def taken(p: Path) -> bool:
        return p == skip or any(os.path.lexists(q) for q in (
            p, *(p.with_suffix(s) for s in companions)))

    i, candidate = 2, path
    while taken(candidate):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        i += 1
    return candidate


def next_free(path: Path, companions: tuple[str, ...] = (),
              skip: Path | None = None) -> Callable[[Path], Path]:
    """``if_exists`` of a write to :func:`free_path`'s name: where that name was taken
    meanwhile (two commands chose it at once), the next free one, and never a file's."""
    return lambda taken: free_path(path, companions, skip)


@contextlib.contextmanager
def folder_for_output(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (and missing parents) before a command's work, so that an unusable
    path fails first; when the work raises, remove the folders it made that are still
    empty (a failed command leaves nothing behind)."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                path.rmdir()
        raise
