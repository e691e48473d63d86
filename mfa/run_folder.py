"""Run folders: their names, the log file, the checkpoint path, the config a resume
continues with (:func:`run_config_of`, by the rules of :mod:`mfa.resume_rules`, whose
names are re-exported here: :data:`RESUME_SAFE_KEYS`, :func:`check_can_extend`), the lock that
keeps a second ``mfa train`` out of a folder in use (:func:`hold_run_folder`, from
:mod:`mfa.folder_lock`), and what a
failed run leaves (:func:`clean_up_failed`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mfa._temporaries import (
    clean_stale_temporaries,
    free_path,
    next_free,
    write_text_atomically,
)
from mfa.config import (
    RunConfig,
    apply_overrides,
    load_config,
)
from mfa.folder_lock import LOCK_NAME, RunFolderInUse, hold_run_folder, holder_of
from mfa.resume_rules import (
    RESUME_SAFE_KEYS,
    check_can_extend,
    check_resume_changes,
    check_stage_changes,
)
from mfa.run_log import attach_log

if TYPE_CHECKING:
    from mfa.checkpoint import Checkpoint
    from mfa.data import ImageData

__all__ = [
    "CHECKPOINT_NAME",
    "FAILED_NAME",
    "LOCK_NAME",
    "RESUME_SAFE_KEYS",
    "RunFolderInUse",
    "RUN_DATA_KEYS",
    "RUN_TRACES",
    "WRITTEN_THROUGH",
    "attach_log",
    "check_can_extend",
    "check_resume_changes",
    "check_resume_folder",
    "check_same_pools",
    "check_same_split",
    "clean_up_failed",
    "config_lost",
    "figure_place",
    "free_path",
    "next_free",
    "hold_run_folder",
    "holder_of",
    "is_unfinished",
    "make_run_dir",
    "resolve_checkpoint",
    "resume_checkpoint",
    "run_config_of",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FAILED_NAME = "FAILED"

#: The data settings a command on a trained run may change: where the files are and how many
#: of each split's images it reads (a seeded subset of the same split).
RUN_DATA_KEYS = ("root", "download", "num_workers", "limit")


def check_same_split(saved: RunConfig, config: RunConfig) -> None:
    """Refuse data settings of ``config`` that would change which images are in each of the
    ``saved`` run's splits or how they are read: scores on the "test" split would then
    include images the model trained on (ValueError naming the keys)."""
    changed = [f"data.{f.name}" for f in dataclasses.fields(saved.data)
               if f.name not in RUN_DATA_KEYS
               and getattr(saved.data, f.name) != getattr(config.data, f.name)]
    if changed:
        allowed = ", ".join(f"data.{key}" for key in RUN_DATA_KEYS)
        raise ValueError(
            f"{', '.join(changed)} would change which images the run's splits hold or how "
            "they are read, so the scores would not be those of the data the run was trained "
            f"and held out on (its test split could hold training images); of the data "
            f"settings only {allowed} may differ from the run's")


def check_same_pools(recorded: dict | None, data: ImageData) -> None:
    """Refuse data whose pools are not those a run recorded (``metrics["pools"]``: image
    counts and, for image files, a digest of their paths below the folder they share, from
    :meth:`mfa.data.sources.pools.Pools.fingerprint`): its seeded splits would hold other
    images, and a "test" score could include training images. A run saved before the record
    existed (``None``: by an mfa before 2026-12-06) cannot be checked: a ``UserWarning``
    says so, and how its splits may differ (it was used silently, on other "test" images).

    Raises:
        ValueError: naming each pool that differs."""
    current = data.metadata.get("pools")
    if not recorded and current is not None:
        warnings.warn(_unrecorded(data), UserWarning, stacklevel=2)
    if not recorded or current is None or _as_lists(recorded) == _as_lists(current):
        return
    differ = []
    for pool in sorted(set(recorded) | set(current)):
        was, now = recorded.get(pool), current.get(pool)
        if was is None or now is None:
            differ.append(f"pool {pool!r} {'is new' if was is None else 'is gone'}")
        elif list(was)[0] != list(now)[0]:
            differ.append(f"pool {pool!r} has {now[0]} images, the run's had {was[0]}")
        elif list(was) != list(now):
            differ.append(f"pool {pool!r} lists other image files ({now[1]} against the "
                          f"run's {was[1]})")
    raise ValueError(
        f"the {data.name} data is not the data the run was trained on: {'; '.join(differ)}. "
        "Its seeded splits would hold other images (the test split could hold training "
        "images); point data.root at the images the run used")


def _unrecorded(data: ImageData) -> str:
    """What a run that records no pools (saved before 2026-12-06) risks on ``data``: before
    2026-12-05 a dataset of one pool (embedded-mnist, folder) was split val first, test next
    (a0b8db0 takes test first), so its splits here are not the run's."""
    one_pool = set(data.metadata["pools"]) == {"all"}
    how = (": if it was saved before 2026-12-05, when a dataset of one pool was split val "
           "first, its val and test images here are not the run's, the test split holding "
           "images it validated on (and trained on, where val_fraction differs from "
           "test_fraction)" if one_pool else "")
    return (f"the run predates the record of its data's pools (it was saved by an mfa before "
            f"2026-12-06), so the {data.name} data cannot be checked to be the data it was "
            f"trained on, and its splits may hold other images than the run's{how}; its "
            "held-out scores may then include images it saw: train it again to be sure")


def _as_lists(pools: dict) -> dict:
    return {pool: list(value) for pool, value in pools.items()}


def is_unfinished(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is a run's checkpoint from before its training ended (an interrupted
    run): only the final one records the run's metrics (``method`` among them)."""
    return ckpt.run_config is not None and "method" not in (ckpt.metrics or {})


def figure_place(path: Path, companions: tuple[str, ...] = (), *, replace: bool) -> dict:
    """The ``path`` and ``if_exists`` of a run's figure meant for ``path``: replacing it, or
    (``replace=False``) at :func:`free_path`'s name, moving on again if that is taken
    meanwhile (:func:`next_free`)."""
    if replace:
        return {"path": path, "if_exists": "replace"}
    return {"path": free_path(path, companions), "if_exists": next_free(path, companions)}


_RUN_NUMBER = re.compile(r"^(\d+)-")


def absolute_data_root(config: RunConfig) -> RunConfig:
    """``config`` with a relative ``data.root`` (and ``output.mask_image``) resolved against
    the working directory (``~`` expanded): the run folder's config then reads the same files
    from anywhere (``--resume``,
    ``evaluate``, ``inpaint``); saved relative, it found nothing from another directory, or
    other files that lay at that path there."""
    root, mask = config.data.root, config.output.mask_image
    if root is not None and not Path(root).is_absolute():
        data = dataclasses.replace(config.data, root=str(Path(root).expanduser().resolve()))
        config = dataclasses.replace(config, data=data)
    if mask is not None and not Path(mask).is_absolute():
        output = dataclasses.replace(config.output,
                                     mask_image=str(Path(mask).expanduser().resolve()))
        config = dataclasses.replace(config, output=output)
    return config


def make_run_dir(config: RunConfig, *, exist_ok: bool = False) -> Path:
    """Create and return the run folder.

    ``output.dir/output.name`` when a name is given (``exist_ok`` as in ``Path.mkdir``);
    otherwise the next free numbered folder ``output.dir/NNN-<data.name>`` (one more than the
    highest number there), e.g. ``runs/001-embedded-mnist``; two runs started at once take
    two numbers.
    """
    parent = Path(config.output.dir).expanduser()
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"output.dir {parent} is a file, not a folder for run folders")
    try:  # (it said "[Errno 2] No such file or directory: '/proc/foo'", naming no setting)
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(f"output.dir {parent} cannot be made ({error.strerror}): set "
                          "output.dir to a folder you can write, --set output.dir=DIR") from None
    if config.output.name is not None:
        run_dir = parent / config.output.name
        try:
            run_dir.mkdir(exist_ok=exist_ok)
        except FileExistsError:
            raise FileExistsError(
                f"the run folder {run_dir} already exists: choose another output.name, remove "
                f"it, or continue it with `mfa train --resume {shlex.quote(str(run_dir))}`"
            ) from None
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder → its ``checkpoint.pt``; a file → itself."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def resume_checkpoint(resume: str | Path) -> Path:
    """The checkpoint a resumed run continues: a run folder's ``checkpoint.pt``. A checkpoint
    file of another name is refused: resuming writes ``checkpoint.pt``, metrics and figures
    into its folder, which is then not its run's."""
    if not str(resume).strip():  # (Path("") is the working folder)
        raise ValueError("--resume is empty: give a run folder")
    if not Path(resume).exists():
        raise FileNotFoundError(f"--resume: {resume} does not exist")
    path = resolve_checkpoint(resume)
    if path.suffix.lower() in (".yaml", ".yml"):  # (not a checkpoint: copying it would fail)
        run = (f"resume its run with --resume {shlex.quote(str(path.parent))}, or "
               if (path.parent / CHECKPOINT_NAME).is_file() else "")
        raise ValueError(
            f"--resume takes a run folder (or its {CHECKPOINT_NAME}); {path} is a config "
            f"file: {run}start a new run from it with --config {shlex.quote(str(path))}")
    if path.name != CHECKPOINT_NAME:
        raise ValueError(
            f"--resume takes a run folder (or its {CHECKPOINT_NAME}); {path} is a "
            f"checkpoint file of another name, and resuming writes {CHECKPOINT_NAME}, "
            f"metrics and figures beside it: copy it as {CHECKPOINT_NAME} into an empty "
            "folder and resume that")
    return path


#: What a run leaves beside its ``config.yaml`` before its first checkpoint: the lock it
#: takes before writing config.yaml (:func:`hold_run_folder`), its log, the note of a failed
#: run, a hierarchical run's finished stages. A folder with a config.yaml and none of them is
#: not a run's (a user's folder of a hand-written config).
RUN_TRACES = (LOCK_NAME, "train.log", FAILED_NAME, "hierarchy")

#: The files of a run folder that a resume writes through a symbolic link (the checkpoint is
#: saved to the link's target, the log appended to it), and the hierarchical stages' folder,
#: whose files are saved the same way. The others (config.yaml, metrics, figures) are
#: replaced whole, link and all.
WRITTEN_THROUGH = (CHECKPOINT_NAME, "train.log", LOCK_NAME, "hierarchy")


def check_resume_folder(folder: str | Path) -> None:
    """Refuse, before a resume takes or writes anything in ``folder`` (ValueError):

    * a symbolic link among :data:`WRITTEN_THROUGH` (or in ``hierarchy/``): the resume
      would write through it into its target, another run's file when the folder is a copy
      made of links (``cp -rs A B``: resuming B rewrote A's checkpoint and log, and A could
      not be resumed). The message names each link, its target, and the command that makes
      it a file of its own;
    * a ``config.yaml`` without a checkpoint and without any of :data:`RUN_TRACES`: a
      user's folder, not a run killed before its first checkpoint (it was trained there
      and its config.yaml rewritten, comments lost)."""
    folder = Path(folder)
    links = [folder / name for name in WRITTEN_THROUGH if (folder / name).is_symlink()]
    stages = folder / "hierarchy"
    if stages.is_dir() and not stages.is_symlink():
        links += sorted(p for p in stages.iterdir() if p.is_symlink())
    if links:
        named = [_link_advice(link) for link in links[:4]]
        if len(links) > 4:
            named.append(f"and {len(links) - 4} more in {stages} (each: cp "
                         "--remove-destination TARGET LINK)")
        raise ValueError(
            f"cannot resume {folder}: " + "; ".join(named) + ". A resume writes through "
            "these links into the files they point to (those of another run, where the "
            "folder is a copy made of links): make them files of their own, then resume")
    if ((folder / "config.yaml").is_file() and not os.path.lexists(folder / CHECKPOINT_NAME)
            and not any(os.path.lexists(folder / name) for name in RUN_TRACES)):
        raise ValueError(
            f"{folder} holds a config.yaml but no {CHECKPOINT_NAME} and no trace of an mfa "
            f"run ({', '.join(RUN_TRACES)}): it is not a run folder, and resuming it would "
            "train there and rewrite its config.yaml; start a new run from it with "
            f"`mfa train --config {shlex.quote(str(folder / 'config.yaml'))}`")


def _link_advice(link: Path) -> str:
    """``link`` and its target, and the command that replaces it by a copy of the target."""
    target = os.path.realpath(link)
    quoted = f"{shlex.quote(target)} {shlex.quote(str(link))}"
    if link.name == LOCK_NAME:
        fix = f"rm {shlex.quote(str(link))}: a lock file need not be copied"
    elif not os.path.exists(target):
        fix = f"its target does not exist: rm {shlex.quote(str(link))}"
    elif os.path.isdir(target):
        fix = f"rm {shlex.quote(str(link))} && cp -r {quoted}"
    else:
        fix = f"cp --remove-destination {quoted}"
    return f"{link} is a symbolic link to {target} ({fix})"


def unstarted_run(resume: str | Path) -> Path | None:
    """``resume`` when it is a run folder that holds its ``config.yaml`` but no
    ``checkpoint.pt`` (its process was killed before the first checkpoint, so nothing was
    cleaned up): there is nothing to continue, and resuming starts it over there. A folder
    that also holds other files (metrics, figures: a finished run whose checkpoint is gone)
    is refused (ValueError), as is one that shows no trace of a run
    (:func:`check_resume_folder`)."""
    path = Path(resume)
    if path.is_dir() and not (path / CHECKPOINT_NAME).exists() and (
            path / "config.yaml").is_file():
        check_resume_folder(path)
        # What a run writes before its first checkpoint (a hierarchical run's finished
        # stages are reused); anything else is a finished run's output, which starting over
        # would replace. The temporary of a first checkpoint whose writer was killed is not.
        clean_stale_temporaries(path / CHECKPOINT_NAME)
        results = sorted(p.name for p in path.iterdir()
                         if p.name not in ("config.yaml", "train.log", FAILED_NAME, "hierarchy",
                                           LOCK_NAME))
        if results:
            raise ValueError(
                f"{path} holds no {CHECKPOINT_NAME} but holds results ({', '.join(results[:5])}"
                f"): resuming would start the run over and replace them; put its "
                f"{CHECKPOINT_NAME} back, or train a new run from its config.yaml")
        return path
    return None


def run_config_of(config: RunConfig | None, resume: str | Path | None,
                  overrides: Sequence[str]) -> tuple:
    """:func:`mfa.workflow.train`'s config, the checkpoint it resumes (or ``None``), the
    folder it starts over (or ``None``) and the keys a resume changes (a restart's: against
    the folder's config.yaml, which it rewrites only then)."""
    restart = unstarted_run(resume) if resume is not None else None
    if restart is not None:  # killed before its first checkpoint: start it over there
        if config_lost(restart):
            raise ValueError(
                f"{restart / 'config.yaml'} is empty (damaged, e.g. cut off by a crash while it "
                f"was written) and {restart} holds no {CHECKPOINT_NAME}: nothing holds the "
                "run's config to start it over from; train a new run")
        saved = load_config(restart / "config.yaml")
        config = absolute_data_root(apply_overrides(saved if config is None else config,
                                                    overrides))
        # The same rules as any resume; none changed, its config.yaml is kept as it is
        changed = check_resume_changes(saved, config)
        if saved.train.method == "hierarchical" and _holds_stages(restart / "hierarchy"):
            # (finished stages are reused: refused here, before config.yaml is rewritten,
            # as where a checkpoint holds them; their files refused the change after it)
            check_stage_changes(changed)
        return config, None, restart, changed
    if resume is None:  # a validated copy whose folder's config reads the same files anywhere
        return absolute_data_root(apply_overrides(config, overrides)), None, None, []
    from mfa.checkpoint import load_checkpoint

    ckpt_path = resume_checkpoint(resume)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.run_config is None:
        raise ValueError(f"{ckpt_path} holds no run config, so it cannot be resumed")
    if ckpt.trainer_state is None:  # (a fit would start over and overwrite the file)
        raise ValueError(f"{ckpt_path} holds no trainer state (a model saved on its own), "
                         "so there is nothing to resume; train a new run from its config")
    folder_config = ckpt_path.parent / "config.yaml"
    from_folder = config is None and not config_lost(ckpt_path.parent)
    if config is None and folder_config.exists() and not from_folder:
        logger.warning("%s is empty (damaged, e.g. cut off by a crash while it was written): "
                       "resuming with the run's config that %s holds, which is written there "
                       "again", folder_config, ckpt_path)
    if from_folder:  # its edits count as a --config's
        config = load_config(folder_config)
    config = absolute_data_root(
        apply_overrides(ckpt.run_config if config is None else config, overrides))
    try:
        changed = check_resume_changes(ckpt.run_config, config)
    except ValueError:
        if from_folder:  # the --set values alone refused: theirs is the error; else the file's
            check_resume_changes(ckpt.run_config, absolute_data_root(
                apply_overrides(ckpt.run_config, overrides)))
            try:
                check_resume_changes(ckpt.run_config,
                                     absolute_data_root(load_config(folder_config)))
            except ValueError as error:
                raise ValueError(f"{folder_config}: {error} (this file differs from the "
                                 "checkpoint's config, and a resume reads it as a --config: "
                                 "make them agree to resume)") from None
        raise
    check_can_extend(ckpt, config, changed)
    return config, ckpt, None, changed


def _holds_stages(folder: Path) -> bool:
    """Whether a hierarchical run's stage folder holds a finished stage's file."""
    return folder.is_dir() and any(
        path.name in ("root.pt", "model.pt") or re.fullmatch(r"child-\d+\.pt", path.name)
        for path in folder.iterdir())


def config_lost(run_dir: Path) -> bool:
    """Whether ``run_dir/config.yaml`` is missing or empty (no byte but white space). An
    empty one is damaged (e.g. cut off by a crash while it was written), not a config of
    defaults (read as one, a resume refused it as a change of every key): a resume takes the
    checkpoint's config, as where the file is gone, and writes the file again. A file of
    comments or ``{}`` is the user's and is read as written (it was overwritten)."""
    try:
        return not (run_dir / "config.yaml").read_bytes().strip()
    except FileNotFoundError:
        return True
    except OSError:  # unreadable: not lost, and refused where it is read
        return False


def clean_up_failed(run_dir: Path, error: BaseException, *, created: bool) -> None:
    """A new run that failed before its first checkpoint with nothing but the files this
    module wrote there: remove its folder. Otherwise, for an error (not Ctrl-C), write
    ``FAILED``. A folder that cannot be cleaned up or marked (read-only, a full disk) is a
    warning, not an error: the run's own ``error`` is the one its caller reports."""
    try:
        if created and _removed_if_own(run_dir):
            return
        # Something else is in there (a hierarchical run's finished stages): the folder stays
        # whole, config.yaml and train.log included, so `--resume` starts it over and reuses
        # them.
        if isinstance(error, Exception):
            write_text_atomically(run_dir / FAILED_NAME, (
                f"{type(error).__name__}: {error}\nsee train.log; continue with "
                f"`mfa train --resume {shlex.quote(str(run_dir))}` once the cause is fixed (a "
                "resume may change only iterations, checkpoints, progress, device, figures and "
                "data location: a cause in another setting, such as a learning rate, needs a new "
                "run)\n"))
    except OSError as failure:
        logger.warning("cannot clean up or mark the failed run %s: %s", run_dir, failure)


def _removed_if_own(run_dir: Path) -> bool:
    """Remove ``run_dir`` when it holds no checkpoint and only the files this module wrote
    there; whether it is gone."""
    own = {"config.yaml", "train.log", LOCK_NAME}
    if (run_dir / CHECKPOINT_NAME).exists() or not {p.name for p in run_dir.iterdir()} <= own:
        return False
    for name in own:
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
        return True
    except OSError:
        return False  # something else came in meanwhile: leave it, marked
