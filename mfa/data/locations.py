"""Where datasets and derived files live by default; the error for a dataset not found and the
advice its messages give for downloading."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DOWNLOAD_HINT", "DatasetNotFoundError", "default_cache_dir", "default_data_root"]


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for; the message says where."""


def default_data_root() -> Path:
    """Where datasets live when ``root`` is not given: ``$MFA_DATA_DIR`` (resolved, as a
    given root is: a relative one names other files from another working directory), else
    ``~/.cache/mfa/datasets``."""
    env = os.environ.get("MFA_DATA_DIR")
    return (Path(env).expanduser().resolve() if env
            else Path.home() / ".cache" / "mfa" / "datasets")


def default_cache_dir() -> Path:
    """Where derived files go (extracted idx files, decoded-image caches): ``$MFA_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/mfa``, else ``~/.cache/mfa``."""
    env = os.environ.get("MFA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mfa"


#: How to ask for a download, from Python and from the ``mfa`` CLI (a config override).
DOWNLOAD_HINT = "download=True (CLI: --set data.download=true)"
