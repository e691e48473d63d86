"""Atomic writes (mfa._temporaries): the data reaches the disk before the rename names it."""

import errno
import os
import re
import time

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


def _link_missing(monkeypatch):
    """A file system without hard links (some FUSE and SMB mounts): os.link fails EPERM."""
    def link(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(_temporaries.os, "link", link)


def test_without_hard_links_a_file_that_appeared_meanwhile_is_still_kept(tmp_path,
                                                                        monkeypatch):
    """The fallback claims the name with an exclusive create: a plain create would let the
    rename replace the other command's file."""
    _link_missing(monkeypatch)
    target = tmp_path / "samples-2.png"

    def write(temporary):
        temporary.write_text("mine")
        target.write_text("theirs")

    with pytest.raises(FileExistsError, match="a file of that name exists"):
        write_atomically(target, write, if_exists="refuse")
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["samples-2.png"]
    written = write_atomically(tmp_path / "samples.png", lambda t: t.write_text("mine"),
                               if_exists="refuse")
    assert written.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-2.png", "samples.png"]


def test_without_hard_links_a_failed_rename_leaves_no_claim(tmp_path, monkeypatch):
    """The claim (an empty file) is removed when the rename after it fails."""
    _link_missing(monkeypatch)

    def replace(source, target):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_temporaries.os, "replace", replace)
    with pytest.raises(OSError, match="cannot write .*outliers.csv: Input/output error"):
        write_text_atomically(tmp_path / "outliers.csv", "rank,score\n", if_exists="refuse")
    assert list(tmp_path.iterdir()) == []


def test_a_name_kept_for_another_run_is_skipped(tmp_path):
    assert free_path(tmp_path / "samples.png", skip=tmp_path / "samples.png") == \
        tmp_path / "samples-2.png"
    assert free_path(tmp_path / "samples.png", skip=tmp_path / "samples-2.png") == \
        tmp_path / "samples.png"


def test_a_long_file_name_gets_a_temporary_a_folder_can_hold(tmp_path):
    """A temporary is the name and 20-odd characters more: a 240-byte name (the limit is
    255) failed with 'File name too long'."""
    target = tmp_path / ("n" * 236 + ".csv")
    write_text_atomically(target, "x\n")
    assert target.read_text() == "x\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def _dead_pid() -> int:
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_or_done_writers_go_and_live_ones_stay(tmp_path):
    """A dead writer's temporary is removed at once; a live writer's (another process, or
    one this process is writing now) is kept; this process's own that it no longer writes
    is removed."""
    target = tmp_path / "checkpoint.pt"
    dead = tmp_path / f".checkpoint.pt.{_dead_pid()}.0badf00d.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.0badf00d.tmp"
    other = tmp_path / f".other.pt.{_dead_pid()}.0badf00d.tmp"  # another file's
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    with _temporaries.reserved_temporary(target) as writing:
        writing.write_bytes(b"being written")
        assert _temporaries.clean_stale_temporaries(target) == [dead]
        assert writing.exists()
    assert _temporaries.clean_stale_temporaries(target) == [writing]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    old = time.time() - _temporaries.STALE_TEMPORARY_AGE - 60  # a pid reused since
    os.utime(live, (old, old))
    assert _temporaries.clean_stale_temporaries(target, by_pid=False) == [live]


@pytest.mark.parametrize("stop", [ValueError, KeyboardInterrupt])
def test_a_failed_command_removes_the_empty_folders_it_made(tmp_path, stop):
    """Every folder made for the output goes (innermost first, parents too), also on Ctrl-C;
    a folder that was there, or that holds a file now, stays."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(stop):
        with _temporaries.folder_for_output(tmp_path / "kept" / "a" / "b" / "c") as folder:
            assert folder.is_dir()
            raise stop()
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir())
    with pytest.raises(stop):
        with _temporaries.folder_for_output(tmp_path / "x" / "y") as folder:
            (tmp_path / "x" / "note").write_text("a file")
            raise stop()
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["note"]


def test_an_unknown_if_exists_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"if_exists must be 'replace', 'refuse' or a "
                                         r"function, got 'keep'"):
        write_text_atomically(tmp_path / "a.txt", "x", if_exists="keep")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_that_is_no_oserror_is_named_as_one():
    """torch.save's short write raises RuntimeError ("unexpected pos"): an OSError naming the
    file, asking whether the disk is full (its first line only)."""
    error = _temporaries.naming(RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 64\nframes"), "model.pt")
    assert type(error) is OSError and error.errno is None
    assert str(error) == ("cannot write model.pt: writing failed ([enforce fail at "
                          "inline_container.cc:672] . unexpected pos 64); is the disk full?")
