"""mfa.folder_lock: the lock that keeps a second writer out of a folder in use."""

from __future__ import annotations

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
