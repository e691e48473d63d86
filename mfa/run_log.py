"""A run folder's ``train.log``: attached to the ``mfa`` loggers while a run trains
(:func:`attach_log`), told why the run ended (:func:`log_ending`), then detached
(:func:`detach_log`)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

__all__ = ["attach_log", "detach_log", "log_ending"]

logger = logging.getLogger("mfa")


def attach_log(run_dir: Path) -> logging.Handler:
    """Send the ``mfa`` loggers' records (INFO and up) to ``run_dir/train.log``: the ``mfa``
    logger lets INFO through while it is attached where it would not (a program that set
    no level), and keeps what it lets through where that is more (``mfa -v``: DEBUG on the
    console; it was set to INFO, so ``-v`` showed no debug record of a run)."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("mfa")
    root.addHandler(handler)
    handler.mfa_level = None  # the level of the ``mfa`` logger to put back on detaching
    if root.getEffectiveLevel() > logging.INFO:
        handler.mfa_level = root.level
        root.setLevel(logging.INFO)
    return handler


def log_ending(handler: logging.Handler | None, error: BaseException, checkpoint: Path) -> None:
    """Say in ``train.log`` (``handler``; ``None``: a process that writes no log) why the run
    ends: Ctrl-C after a ``checkpoint`` was written, as a warning (on the console too) naming
    the way on; an error, with its traceback, in the log only (the command prints it: the
    log held nothing of it, while ``FAILED`` said "see train.log")."""
    if handler is None:
        return
    if isinstance(error, KeyboardInterrupt):
        if checkpoint.exists():
            logger.warning("interrupted: %s keeps its last checkpoint; continue with `mfa train "
                           "--resume %s`", checkpoint.parent, shlex.quote(str(checkpoint.parent)))
    elif isinstance(error, Exception):
        handler.handle(logger.makeRecord(
            logger.name, logging.ERROR, __file__, 0, "the run failed: %s: %s",
            (type(error).__name__, error), (type(error), error, error.__traceback__)))


def detach_log(handler: logging.Handler | None) -> None:
    """Stop :func:`attach_log`'s handler (``None``: nothing to stop), close its file and put
    back the ``mfa`` logger's level it changed (it stayed at INFO after a run: a program
    that later configured WARNING logging got every INFO record of ``mfa``)."""
    if handler is not None:
        root = logging.getLogger("mfa")
        root.removeHandler(handler)
        handler.close()
        level = getattr(handler, "mfa_level", None)
        if level is not None and root.level == logging.INFO:  # (unless changed meanwhile)
            root.setLevel(level)
