"""Run folders: their names, the log file, the checkpoint path, and which config changes a
resumed run may make (:data:`RESUME_SAFE_KEYS`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from mfa.config import OutputConfig, RunConfig, config_to_dict

__all__ = [
    "CHECKPOINT_NAME",
    "FAILED_NAME",
    "RESUME_SAFE_KEYS",
    "attach_log",
    "check_resume_changes",
    "make_run_dir",
    "resolve_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
FAILED_NAME = "FAILED"

#: What a resumed run may change: how long it runs, how often it saves, whether it shows
#: progress, what it draws, and where its data files are; not what it computes.
RESUME_SAFE_KEYS: frozenset[str] = frozenset({
    "train.em.max_iter", "train.sgd.epochs",
    "train.em.checkpoint_every", "train.sgd.checkpoint_every", "output.checkpoint_every",
    "train.em.progress", "train.sgd.progress",
    *(f"train.hierarchical.{stage}.progress" for stage in ("root_em", "child_em", "final_em")),
    "data.root", "data.download", "data.num_workers",
    *(f"output.{f.name}" for f in fields(OutputConfig)
      if f.name not in ("dir", "name", "checkpoint_every")),
})


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.update(_leaves(value, f"{path}.") if isinstance(value, Mapping) else {path: value})
    return out


def check_resume_changes(saved: RunConfig, new: RunConfig) -> list[str]:
    """The dotted keys where ``new`` differs from ``saved`` (the config of the run resumed).

    Raises:
        ValueError: a differing key is not in :data:`RESUME_SAFE_KEYS` (naming the first).
    """
    old, now = _leaves(config_to_dict(saved)), _leaves(config_to_dict(new))
    changed = [key for key in now if now[key] != old.get(key)]
    for key in changed:
        if key not in RESUME_SAFE_KEYS:
            raise ValueError(
                f"cannot change {key} when resuming a run (saved {old.get(key)!r}, given "
                f"{now[key]!r}): it would change what the run computes; start a new run. A "
                "resume may change the iterations/epochs, checkpoint cadence, progress, "
                "figures and the data location"
            )
    return changed


_RUN_NUMBER = re.compile(r"^(\d+)-")


def make_run_dir(config: RunConfig, *, exist_ok: bool = False) -> Path:
    """Create and return the run folder.

    ``output.dir/output.name`` when a name is given (``exist_ok`` as in ``Path.mkdir``);
    otherwise the next free numbered folder ``output.dir/NNN-<data.name>`` (one more than the
    highest number there), e.g. ``runs/001-embedded-mnist``. Safe against two runs starting
    at once: creation is retried with the next number if the folder appeared meanwhile.
    """
    parent = Path(config.output.dir)
    parent.mkdir(parents=True, exist_ok=True)
    if config.output.name is not None:
        run_dir = parent / config.output.name
        run_dir.mkdir(exist_ok=exist_ok)
        return run_dir
    numbers = [int(m.group(1)) for p in parent.iterdir() if (m := _RUN_NUMBER.match(p.name))]
    number = max(numbers, default=0) + 1
    while True:
        run_dir = parent / f"{number:03d}-{config.data.name}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            number += 1


def attach_log(run_dir: Path) -> logging.Handler:
    """Send the ``mfa`` loggers' records (INFO and up) to ``run_dir/train.log``."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mfa")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder → its ``checkpoint.pt``; a file → itself."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path
