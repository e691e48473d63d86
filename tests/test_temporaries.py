"""Atomic writes (mfa._temporaries): the data reaches the disk before the rename names it."""

import errno
import os
import re

import pytest

from mfa import _temporaries
from mfa._temporaries import write_atomically, write_text_atomically


def test_write_atomically_fsyncs_the_data_before_the_rename_and_the_folder_after(
        tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(_temporaries.os, "fsync", fsync)
    monkeypatch.setattr(_temporaries.os, "replace", replace)
    target = tmp_path / "metrics.json"
    write_text_atomically(target, "{}")
    assert target.read_text() == "{}"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".metrics.json."))  # the temporary's data
    assert events[2][1] == str(tmp_path)  # then the folder holding the new name


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("before")

    def fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_a_full_disk_is_an_oserror_naming_the_destination(tmp_path):
    """A write's ENOSPC named no file ("[Errno 28] No space left on device")."""
    target = tmp_path / "metrics.json"
    target.write_text("before")

    def full(temporary):
        temporary.write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(target))}: No space left "
                                      "on device") as caught:
        write_atomically(target, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.__cause__ is not None
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
