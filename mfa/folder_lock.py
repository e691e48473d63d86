"""The lock that keeps a second writer out of a folder in use: ``mfa train`` holds its run
folder, ``mfa select`` its ``--out`` folder (:func:`hold_run_folder`); :func:`holder_of`
tells another command that a folder is being written now."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderInUse", "hold_run_folder", "holder_of"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"  # held by the process that writes the folder (hold_run_folder)

#: ``flock`` errors of a file system that cannot lock: the run goes on unlocked, warned.
_NO_LOCKS = frozenset(getattr(errno, name) for name in ("ENOLCK", "ENOSYS", "EOPNOTSUPP",
                                                         "ENOTSUP") if hasattr(errno, name))


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder (:func:`hold_run_folder`)."""


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, *, held: bool = True,
                    command: str = "mfa train") -> Iterator[None]:
    """Hold ``run_dir`` for one ``mfa train`` while it writes there: an exclusive advisory
    lock (``flock``) on ``run_dir/.lock``, which also records the holder's pid; the
    operating system releases it when the process ends, however it ends. Two trainings
    of one folder (a ``--resume`` of a run still training) wrote its checkpoint, metrics
    and ``config.yaml`` in turn and left them disagreeing.

    Raises:
        RunFolderInUse: another process holds the folder (naming its command and pid),
            still after :data:`RETRY_SECONDS`.

    With ``held=False`` (a process that does not write the folder), and where ``fcntl``
    does not exist (Windows), nothing is locked. ``command``: recorded with the pid, so a
    refused command names what holds the folder (``mfa select`` holds its ``--out`` folder
    the same way).
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or not held:
        yield
        return
    descriptor = _open_lock(run_dir, command)
    try:
        try:
            _lock_within(fcntl, descriptor, RETRY_SECONDS)
        except BlockingIOError:
            raise RunFolderInUse(
                f"the folder {run_dir} is in use by {_recorded(descriptor)}: wait for it to "
                "end, or stop it, and run this again") from None
        except OSError as error:  # a file system without locks (some network mounts)
            if error.errno not in _NO_LOCKS:
                raise
            logger.warning("cannot lock %s (%s): a second `%s` of this folder would not be "
                           "refused", run_dir / LOCK_NAME, error.strerror, command)
            yield
            return
        _check_ours(descriptor, run_dir)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def _open_lock(run_dir: Path, command: str) -> int:
    """The descriptor of ``run_dir/.lock``, made if missing; not through a symbolic link (it
    was truncated and overwritten wherever the link pointed)."""
    path = run_dir / LOCK_NAME
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link, where `{command}` keeps its lock file: "
                          "remove or rename it") from None
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OSError(f"`{command}` writes in {run_dir}, which cannot be written here "
                          f"({error.strerror}: {path}): copy the folder to a writable place "
                          "and run this on the copy") from None
        raise


def _check_ours(descriptor: int, run_dir: Path) -> None:
    """Refuse a ``.lock`` that holds something else than a holder's ``"<pid> <command>"``
    (another tool's file of that name, which the lock would overwrite)."""
    text = os.pread(descriptor, 4096, 0).decode(errors="replace")
    first, *rest = text.split("\n", 1) if text else [""]
    pid, _, _ = first.partition(" ")
    if text and not (pid.isdigit() and (not rest or not rest[0].strip())):
        raise OSError(f"{run_dir / LOCK_NAME} holds a file mfa did not write (it keeps its "
                      "lock there and would overwrite it): move it away, or use another "
                      "folder")


#: How long :func:`hold_run_folder` waits for a lock that is held (a :func:`holder_of` of
#: another command holds it for a moment).
RETRY_SECONDS = 0.2


def _lock_within(fcntl, descriptor: int, seconds: float) -> None:
    """``LOCK_EX`` on ``descriptor``, tried until ``seconds`` have passed (BlockingIOError
    then)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _recorded(descriptor: int) -> str:
    """What the holder wrote: ``"`mfa train` (pid 123)"`` (a pid alone from a lock file
    written before the command was recorded)."""
    text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    pid, _, command = text.partition(" ")
    return f"`{command or 'mfa train'}` (pid {pid or 'unknown'})"


def holder_of(folder: Path) -> str | None:
    """Who holds ``folder`` (:func:`hold_run_folder`) now, as recorded (``"`mfa train` (pid
    123)"``), or ``None``: not held, no lock file, or a system without ``flock``. Nothing is
    created; the lock is tried shared and released at once."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        descriptor = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _recorded(descriptor)
        except OSError:
            return None
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
