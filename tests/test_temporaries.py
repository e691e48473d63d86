"""Atomic writes (mfa._temporaries): the data reaches the disk before the rename names it."""

import errno
import os
import re

import pytest

from mfa import _temporaries
from mfa._temporaries import free_path, next_free, write_atomically, write_text_atomically


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


@pytest.mark.parametrize("if_exists", ["refuse", "next"])
def test_a_write_that_must_not_replace_keeps_a_file_that_appeared_meanwhile(tmp_path,
                                                                           if_exists):
    """The name was chosen free, then another process wrote it before this write ended: its
    os.replace replaced that file. The last step is a link now, which fails where a file is
    (FileExistsError, or on to the next free name, which is returned)."""
    (tmp_path / "samples.png").write_text("the run's")
    target = tmp_path / "samples-2.png"

    def write(temporary):
        temporary.write_text("mine")
        target.write_text("theirs")  # the other command, first

    how = "refuse" if if_exists == "refuse" else next_free(tmp_path / "samples.png")
    if if_exists == "refuse":
        with pytest.raises(FileExistsError, match=rf"cannot write {re.escape(str(target))}: "
                                                  "a file of that name exists"):
            write_atomically(target, write, if_exists=how)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-2.png", "samples.png"]
    else:
        written = write_atomically(target, write, if_exists=how)
        assert written == tmp_path / "samples-3.png" and written.read_text() == "mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-2.png", "samples-3.png",
                                                              "samples.png"]
    assert target.read_text() == "theirs"


def test_a_free_name_skips_a_dangling_link_and_the_companions(tmp_path):
    (tmp_path / "outliers.png").symlink_to(tmp_path / "gone.png")  # a link to nothing
    (tmp_path / "outliers-2.csv").write_text("kept")
    assert free_path(tmp_path / "outliers.png", (".csv",)) == tmp_path / "outliers-3.png"
