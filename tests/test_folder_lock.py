"""mfa.folder_lock: the lock that keeps a second writer out of a folder in use."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

from mfa.folder_lock import LOCK_NAME, RunFolderInUse, hold_run_folder, holder_of


def test_holder_of_names_the_holder_and_creates_nothing(tmp_path):
    assert holder_of(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()
    with hold_run_folder(tmp_path, command="mfa select"):
        assert holder_of(tmp_path) == f"`mfa select` (pid {os.getpid()})"
    assert holder_of(tmp_path) is None  # released


def test_a_lock_held_for_a_moment_is_waited_for(tmp_path):
    """holder_of takes the lock (shared) for a moment: a training starting then was refused,
    naming the last trainer's pid, long gone."""
    (tmp_path / LOCK_NAME).write_text("1 mfa train\n")
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_SH)  # as holder_of holds it

    def release():
        time.sleep(0.05)
        fcntl.flock(descriptor, fcntl.LOCK_UN)

    thread = threading.Thread(target=release)
    thread.start()
    try:
        with hold_run_folder(tmp_path):
            assert holder_of(tmp_path) == f"`mfa train` (pid {os.getpid()})"
    finally:
        thread.join()
        os.close(descriptor)


def test_a_lock_held_on_is_refused_naming_the_holder(tmp_path):
    with hold_run_folder(tmp_path, command="mfa train"):
        started = time.monotonic()
        with pytest.raises(RunFolderInUse, match=rf"in use by `mfa train` \(pid {os.getpid()}\)"):
            with hold_run_folder(tmp_path, command="mfa select"):
                pass
        assert time.monotonic() - started < 5  # (a bounded wait)


def test_a_lock_file_that_is_a_link_or_another_tools_file_is_left_as_it_is(tmp_path):
    """The lock was opened through a symbolic link and truncated: a user's notes that a
    `.lock` link pointed at (or a `.lock` of another tool in an --out folder) were replaced
    by "<pid> mfa select". Both are refused now, the file untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes: do not lose\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / LOCK_NAME).symlink_to(notes)
    with pytest.raises(OSError, match=r"\.lock is a symbolic link, where `mfa select` keeps"):
        with hold_run_folder(linked, command="mfa select"):
            pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / LOCK_NAME).write_text("another tool's lock: job 17\n")
    with pytest.raises(OSError, match=r"\.lock holds a file mfa did not write"):
        with hold_run_folder(foreign):
            pass
    assert notes.read_text() == "my notes: do not lose\n"
    assert (foreign / LOCK_NAME).read_text() == "another tool's lock: job 17\n"
    ours = tmp_path / "ours"  # an earlier holder's record (or a bare pid) is taken over
    ours.mkdir()
    for earlier in ("123 mfa train\n", "123", ""):
        (ours / LOCK_NAME).write_text(earlier)
        with hold_run_folder(ours):
            assert (ours / LOCK_NAME).read_text() == f"{os.getpid()} mfa train\n"


def test_a_folder_that_cannot_be_written_says_what_to_do(tmp_path, monkeypatch):
    """A read-only mount (or a `.lock` left by root) gave "[Errno 30] Read-only file system:
    '.../.lock'" and no hint."""
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match=r"`mfa train` writes in .*, which cannot be written here "
                                      r"\(Read-only file system: .*\): copy the folder"):
        with hold_run_folder(tmp_path):
            pass


def test_a_process_that_does_not_write_the_folder_takes_no_lock(tmp_path):
    """held=False (a rank other than 0): neither refused by the holder nor making a .lock."""
    bare = tmp_path / "bare"
    bare.mkdir()
    with hold_run_folder(bare, held=False):
        assert not (bare / LOCK_NAME).exists()
    with hold_run_folder(tmp_path, command="mfa train"):
        with hold_run_folder(tmp_path, held=False, command="mfa select"):
            assert holder_of(tmp_path) == f"`mfa train` (pid {os.getpid()})"
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} mfa train\n"


def test_a_longer_earlier_record_is_replaced_whole(tmp_path):
    """The holder's record is written over the earlier one: a longer one's tail stayed, and
    the next refusal named a command nobody ran."""
    (tmp_path / LOCK_NAME).write_text("4294967 mfa select --out a folder with a long name\n")
    with hold_run_folder(tmp_path, command="mfa train"):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} mfa train\n"
        assert holder_of(tmp_path) == f"`mfa train` (pid {os.getpid()})"


def test_holder_of_sees_no_holder_while_another_command_looks_too(tmp_path):
    """holder_of locks shared: a second command looking at the same moment (its own shared
    lock) is no holder, whereas an exclusive lock is one."""
    (tmp_path / LOCK_NAME).write_text("4321")  # a pid alone (a lock file of an older mfa)
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # the other command's holder_of, now
        assert holder_of(tmp_path) is None
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # a holder that recorded its pid alone
        assert holder_of(tmp_path) == "`mfa train` (pid 4321)"
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_a_lock_file_without_permission_says_what_to_do(tmp_path, monkeypatch, code):
    """A `.lock` left by another user (EACCES/EPERM) gets the read-only folder's advice."""
    real_open = os.open

    def refused(path, flags, *args):
        if str(path).endswith(LOCK_NAME):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(OSError, match=r"`mfa select` writes in .*, which cannot be written "
                                      r"here .*: copy the folder"):
        with hold_run_folder(tmp_path, command="mfa select"):
            pass


def test_holder_of_on_a_file_system_without_locks_is_no_holder(tmp_path, monkeypatch):
    """flock failing otherwise than "held" (ENOLCK on some network mounts) tells nothing:
    holder_of says no holder rather than failing the command that asked."""
    (tmp_path / LOCK_NAME).write_text("123 mfa train\n")

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert holder_of(tmp_path) is None
