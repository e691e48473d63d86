"""Atomic writes (mfa._temporaries): the data reaches the disk before the rename names it."""

import os

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
