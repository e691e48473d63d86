"""A trained run as the ``mfa`` per-run commands read it: the run and its data
(:func:`load_run`), its device, the figure settings a command takes from it by default
(:func:`from_run`), and where a command writes (:func:`output`: nothing replaced unasked)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES", "RUN_SETTINGS", "data_only", "default_out", "device", "from_run",
    "image_out", "load_run", "output", "run_checkpoint", "same_split", "scale",
    "warn_edited_config", "warn_unfinished",
]


#: The settings of a run that its per-run commands (sample, inpaint, outliers, evaluate,
#: visualize) take from its checkpoint, besides every ``data.*`` key.
RUN_SETTINGS = ("seed", "device", "output.n_samples", "output.grid_nrow", "output.image_scale",
                "output.n_inpaint", "output.inpaint_samples", "output.mask_image",
                "output.n_factor_components")


def warn_edited_config(ckpt, checkpoint: str) -> None:
    """Say where the run folder's ``config.yaml`` differs from the config the checkpoint
    holds in :data:`RUN_SETTINGS` or ``data.*``: a command takes the checkpoint's (an edit
    of the file, which ``mfa train --resume`` reads, was ignored without a word)."""
    from mfa.config import config_to_dict, load_config
    from mfa.config_text import dotted_leaves
    from mfa.resume_rules import _spelled_alike
    from mfa.run_folder import CHECKPOINT_NAME, config_lost

    path = None if ckpt.path is None else Path(ckpt.path)
    if ckpt.run_config is None or path is None or path.name != CHECKPOINT_NAME:
        return  # (a checkpoint of another name: its folder's config.yaml is not its run's)
    file = path.parent / "config.yaml"
    if not file.is_file() or config_lost(path.parent):
        return
    try:
        edited = dotted_leaves(config_to_dict(load_config(file)))
    except (OSError, ValueError, TypeError, KeyError) as error:
        print(f"warning: {file} cannot be read ({error}); {checkpoint}: this uses the config "
              "its checkpoint holds", file=sys.stderr)
        return
    saved = dotted_leaves(config_to_dict(ckpt.run_config))
    # (a device in two spellings, cpu and cpu:0, is one: a resume kept the file's)
    keys = [key for key in sorted({*saved, *edited})
            if (key in RUN_SETTINGS or key.startswith("data."))
            and _spelled_alike(key, saved.get(key)) != _spelled_alike(key, edited.get(key))]
    if keys:
        values = ", ".join(f"{key} ({edited.get(key)!r} there, {saved.get(key)!r} in the "
                           "checkpoint)" for key in keys)
        print(f"warning: {file} differs from the config its checkpoint holds in {values}: "
              "this command uses the checkpoint's values, not the file's (which `mfa train "
              "--resume` reads); give others with this command's options (see its --help)",
              file=sys.stderr)


def warn_unfinished(ckpt, checkpoint: str) -> None:
    """A command on an interrupted run, or one still training, says so (it used its last
    checkpoint silently); and where the run folder's config.yaml was edited
    (:func:`warn_edited_config`)."""
    from mfa.folder_lock import holder_of
    from mfa.run_folder import is_unfinished

    warn_edited_config(ckpt, checkpoint)
    if not is_unfinished(ckpt):
        return
    holder = None if ckpt.path is None else holder_of(Path(ckpt.path).parent)
    if holder is not None:  # (its advice to resume was refused: the folder is held)
        print(f"warning: {checkpoint} is in use by {holder}, still training: this uses its last "
              "checkpoint's model; the run draws its own figures when it ends",
              file=sys.stderr)
    else:
        from mfa.run_folder import CHECKPOINT_NAME

        path = None if ckpt.path is None else Path(ckpt.path)
        how = (f"continue it with `mfa train --resume {shlex.quote(checkpoint)}`"
               if path is None or path.name == CHECKPOINT_NAME else
               f"to continue it, copy it as {CHECKPOINT_NAME} into an empty folder and "
               "`mfa train --resume` that folder")
        print(f"warning: {checkpoint} is an unfinished run (stopped before its training "
              f"ended): this uses its last checkpoint's model; {how}", file=sys.stderr)


def run_checkpoint(checkpoint: str, resume: bool = False) -> Path:
    """A per-run command's ``checkpoint`` argument → its checkpoint file. A folder that is not
    a run folder (no ``checkpoint.pt`` and no ``config.yaml``), such as ``runs`` itself, is
    refused naming the run folders it holds (it said "checkpoint runs/checkpoint.pt does not
    exist"); for ``--resume`` (``resume``) also those stopped before their first checkpoint,
    and no checkpoint file (``--resume`` takes none)."""
    from mfa.run_folder import CHECKPOINT_NAME, resolve_checkpoint

    folder = Path(checkpoint)
    if (not folder.is_dir() or (folder / CHECKPOINT_NAME).exists()
            or (folder / "config.yaml").exists()):  # (a run stopped before its first one)
        return resolve_checkpoint(checkpoint)
    runs = sorted(p for p in folder.iterdir() if (p / CHECKPOINT_NAME).is_file()
                  or resume and _unstarted(p))
    held = (f"it holds {len(runs)} run folder{'s' * (len(runs) > 1)}: give one, e.g. "
            + " or ".join(str(p) for p in runs[-2:]) if runs
            else "give a run folder (e.g. runs/001-embedded-mnist)"
            + ("" if resume else " or a checkpoint file"))
    raise SystemExit(f"error: {checkpoint} is not a run folder (it has no {CHECKPOINT_NAME}); "
                     + held)


def _unstarted(folder: Path) -> bool:
    """Whether ``folder`` is a run stopped before its first checkpoint: its config.yaml and
    a trace of the run (:data:`mfa.run_folder.RUN_TRACES`; a config.yaml alone is a
    user's)."""
    from mfa.run_folder import RUN_TRACES

    return (folder / "config.yaml").is_file() and any(
        os.path.lexists(folder / name) for name in RUN_TRACES)


def load_run(checkpoint: str, overrides: list[str]):
    from mfa.checkpoint import load_checkpoint
    from mfa.config import apply_overrides
    from mfa.workflow import check_same_pools, load_data

    data_only(overrides, "--set")
    ckpt = load_checkpoint(run_checkpoint(checkpoint))
    warn_unfinished(ckpt, checkpoint)
    if ckpt.run_config is None:
        raise SystemExit(f"error: {checkpoint} holds no run config; cannot tell which data to use")
    config = apply_overrides(ckpt.run_config, overrides) if overrides else ckpt.run_config
    same_split(ckpt.run_config, config)

    def load(config):
        data = load_data(config)
        if data.n_features != ckpt.model.n_features:
            changed = [o for o in overrides if o.startswith("data.")]
            raise SystemExit(
                f"error: the data ({data.name}, image shape {tuple(data.image_shape)}) has "
                f"{data.n_features} features but the run's model has "
                f"{ckpt.model.n_features}" + (f" (check {', '.join(changed)})" if changed
                                              else ""))
        check_same_pools((ckpt.metrics or {}).get("pools"), data)
        return data

    return ckpt, config, load


def device(config, args):
    """``--device``; by default the run's own ``device`` setting (``auto``: CUDA where there
    is one), where training drew its figures (the CPU for a checkpoint without a run
    config)."""
    from mfa.config import resolve_device

    device = args.device or getattr(config, "device", "cpu")
    try:
        return resolve_device(device)
    except (RuntimeError, ValueError) as error:  # (torch's own for an unknown device type)
        if isinstance(error, RuntimeError):
            error = (f"device {device!r} is not a device: use cpu, cuda, cuda:N or auto")
        message = str(error).replace("use device=cpu or device=auto",
                                     "use --device cpu or --device auto")
        raise SystemExit(f"error: {message}" + ("" if args.device else
                         " (the run's device setting; pass --device cpu)")) from None


def scale(config, args) -> int:
    """``--scale``; by default the run's ``output.image_scale`` (2 without a run config), so
    a command redraws a figure at the size training drew it."""
    return from_run(args.scale, config, "image_scale", 2)


def dequantized(config) -> bool:
    """Whether the run's data were dequantised (``data.dequantize``), so its model's values
    are drawn as the pixels ``floor(256·x)`` they stand for (``False`` without a run config:
    ``pixel/255`` data, ``round(255·x)``; see :func:`mfa.viz.to_pixels`)."""
    return config is not None and bool(config.data.dequantize)


def from_run(value, config, name: str, fallback):
    """An option's ``value``; unset, the run's ``output.<name>`` (``seed``: the run's seed),
    as the run drew its own figures, or ``fallback`` without a run config or where the run
    drew none (0)."""
    if value is not None:
        return value
    if config is None:
        return fallback
    run = config.seed if name == "seed" else getattr(config.output, name)
    return fallback if run == 0 and name in ("n_samples", "n_inpaint") else run


def data_only(overrides: list[str] | None, flag: str) -> list[str]:
    """Commands that use a trained run read only its data settings: refuse other keys (they
    would be accepted and ignored) and overrides that are not ``KEY=VALUE`` (a mapping,
    ``data={limit: 5}``, sets the keys inside it: it was refused as not data.*). Returns
    the dotted keys set."""
    from mfa.config_text import override_keys

    keys = []
    for text in overrides or []:
        try:
            keys += override_keys(text)
        except ValueError as error:
            raise SystemExit(f"error: {flag} {text}: {error}") from None
    other = [k for k in keys if not k.startswith("data.")]
    if other:
        raise SystemExit(f"error: {flag} takes data.* settings only here (the trained model "
                         f"is used as it is), got {', '.join(other)}")
    return keys


def same_split(saved, config) -> None:
    """:func:`mfa.run_folder.check_same_split`, as the command's error."""
    from mfa.run_folder import check_same_split

    try:
        check_same_split(saved, config)
    except ValueError as error:
        raise SystemExit(f"error: --set {error}") from None


def given_path(text: str, option: str) -> Path:
    """A path option's value; an empty one is refused (``-o ""`` was taken for no ``-o``:
    nothing was written, and the command said nothing)."""
    if not text.strip():
        raise SystemExit(f"error: {option} is empty: give a path")
    return Path(text)


def check_writable(folder: Path, option: str | None, elsewhere: str = "-o") -> None:
    """Refuse, before the work, an output folder the command cannot write into (read-only,
    not permitted, or a file in the way): the error came after the work and named the
    temporary file of the atomic write. ``option``: the option that gave the path, or
    ``None`` for a default place; ``elsewhere``: the command's option that gives another
    (``mfa outliers`` has ``--out-dir`` and no ``-o``)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    hint = f"pass another {option}" if option else f"pass {elsewhere} to write elsewhere"
    if not existing.is_dir():
        raise SystemExit(f"error: {existing} is a file, not a folder; {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot write into {existing} (read-only or not permitted); "
                         f"{hint}")
    # os.access says yes to root on special filesystems (/proc, /sys), where creating a file
    # fails: there the error came after the work, naming the atomic write's temporary file.
    # A probe file, created and removed, settles it.
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mfa-write-probe-")
    except OSError as error:
        raise SystemExit(f"error: cannot write into {existing} ({error.strerror}); "
                         f"{hint}") from None
    os.close(fd)
    os.unlink(probe)


def image_out(out: str) -> Path:
    """``-o`` of a command that writes an image: refused, naming it, when it is a folder or
    has no image suffix (PIL's error was "unknown file extension: ", after the work)."""
    path = given_path(out, "-o")
    if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SystemExit(f"error: -o {out} must be an image file name ending in one of "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    return path


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def output(path: Path, args, explicit: str | None, companions: tuple[str, ...] = ()):
    """Where a command writes ``path`` (and ``path`` with each suffix in ``companions``):
    ``path`` itself when nothing is there or with ``--overwrite``; else a default name moves
    on to the first free ``<stem>-2``, ``-3``, … (a run's own figures are kept) and a path
    the user gave (``explicit``: the option that gave it) is refused before any work.

    Returns the path and the ``if_exists`` of its write
    (:func:`mfa._temporaries.write_atomically`): a file that another command wrote there
    meanwhile (two commands started together chose the same free name) is not replaced
    unasked either: a default name moves on again, a path given is refused. The command
    prints the path its write returns."""

    from mfa._temporaries import free_path, next_free
    from mfa.folder_lock import holder_of

    check_writable(path.parent, explicit or None,
                   "--out-dir" if hasattr(args, "out_dir") else "-o")  # (outliers: no -o)
    skip = None
    if not explicit and not args.overwrite and holder_of(path.parent) is not None:
        skip = path  # a run still training draws its figures under these names when it ends
    free = free_path(path, companions, skip=skip)
    if args.overwrite:
        return path, "replace"
    if explicit and free != path:
        taken = next((p for p in (path, *(path.with_suffix(c) for c in companions))
                      if os.path.lexists(p)), path)
        raise SystemExit(f"error: {taken} already exists; pass --overwrite to replace it, "
                         f"or another {explicit}")
    return free, "refuse" if explicit else next_free(path, companions, skip)


def default_out(checkpoint: str, name: str) -> Path:
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / name
