"""mfa.run_log: a run folder's train.log gets the ``mfa`` loggers' INFO records and up, whatever
the console shows (``mfa -v``: DEBUG too), the reason a run ended, and the ``mfa`` logger is
left as it was."""

from __future__ import annotations

import logging

import pytest

from mfa.run_log import attach_log, detach_log, log_ending


@pytest.fixture
def levels():
    """Sets the root and ``mfa`` loggers' levels for a test and puts them back after."""
    root, mfa = logging.getLogger(), logging.getLogger("mfa")
    before = root.level, mfa.level

    def set_levels(root_level: int, mfa_level: int) -> None:
        root.setLevel(root_level)
        mfa.setLevel(mfa_level)

    yield set_levels
    root.setLevel(before[0])
    mfa.setLevel(before[1])


def log_lines(run_dir) -> list[str]:
    """train.log's lines without their time stamp: "LEVEL name: message"."""
    return [line.split(" ", 2)[2] for line in (run_dir / "train.log").read_text().splitlines()
            if line[:1].isdigit()]


@pytest.mark.parametrize("root_level, shown", [
    (logging.WARNING, False),  # a program that set no level: info records reach the log only
    (logging.INFO, False),
    (logging.DEBUG, True),  # mfa -v: debug records reach the console (not the log)
])
def test_the_log_takes_info_and_up_and_the_console_keeps_its_level(tmp_path, levels, caplog,
                                                                   root_level, shown):
    levels(root_level, logging.NOTSET)
    em = logging.getLogger("mfa.em")
    handler = attach_log(tmp_path)
    try:
        em.debug("iteration detail")
        em.info("iteration done")
        em.warning("iteration warned")
        # the console (caplog: a handler of the root logger) gets what its level asks for
        assert em.isEnabledFor(logging.DEBUG) is shown
    finally:
        detach_log(handler)
    assert log_lines(tmp_path) == ["INFO mfa.em: iteration done",
                                   "WARNING mfa.em: iteration warned"]
    assert ("iteration detail" in caplog.messages) is shown
    assert logging.getLogger("mfa").level == logging.NOTSET  # as it was: it stayed at INFO
    assert handler.stream is None  # its file closed


def test_a_level_set_on_the_mfa_logger_is_kept(tmp_path, levels):
    levels(logging.WARNING, logging.ERROR)  # quieter: the log still gets INFO while attached
    handler = attach_log(tmp_path)
    logging.getLogger("mfa.em").info("news")
    detach_log(handler)
    assert log_lines(tmp_path) == ["INFO mfa.em: news"]
    assert logging.getLogger("mfa").level == logging.ERROR


def test_the_log_says_why_a_run_ended(tmp_path, levels, caplog):
    """An error: its type, message and traceback in the log; Ctrl-C: the advice to resume,
    once a checkpoint exists (before it, nothing: no run to resume)."""
    levels(logging.WARNING, logging.NOTSET)
    checkpoint = tmp_path / "checkpoint.pt"
    handler = attach_log(tmp_path)
    try:
        try:
            raise FloatingPointError("EM diverged")
        except FloatingPointError as error:
            log_ending(handler, error, checkpoint)
        log_ending(handler, KeyboardInterrupt(), checkpoint)  # no checkpoint yet: nothing
        checkpoint.write_bytes(b"")
        log_ending(handler, KeyboardInterrupt(), checkpoint)
    finally:
        detach_log(handler)
    text = (tmp_path / "train.log").read_text()
    lines = log_lines(tmp_path)
    assert lines[0] == "ERROR mfa: the run failed: FloatingPointError: EM diverged"
    assert "Traceback (most recent call last)" in text and 'raise FloatingPointError("EM' in text
    assert lines[1:] == [f"WARNING mfa: interrupted: {tmp_path} keeps its last checkpoint; "
                         f"continue with `mfa train --resume {tmp_path}`"]
    log_ending(None, ValueError("x"), checkpoint)  # a process without a log: nothing to do
    detach_log(None)
