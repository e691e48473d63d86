"""The ``mfa select`` command: a model-selection sweep (:func:`mfa.selection.sweep_models`)
on a run config's data with its trainer, its table and plot saved in a folder, and resumed
from there (:mod:`mfa.selection_resume` says what must match)."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mfa.folder_lock import LOCK_NAME
from mfa.selection import SelectionSweep, _grid, sweep_models

logger = logging.getLogger(__name__)

__all__ = ["select_run"]


def select_run(config: Any, components: Sequence[int], factors: Sequence[int],
               out_dir: str | Path | None = None, *, method: str | None = None,
               overwrite: bool = False, resume: bool = False
               ) -> tuple[SelectionSweep, list[Path]]:
    """``mfa select``: a sweep on a run config's data with its trainer, saved to ``out_dir``.

    Every model is built as :func:`mfa.workflow.train` builds one (the config's noise type,
    ``min_noise``, seed and device) and fitted on the train split with the validation split
    as the trainer's validation data, both fed as ``mfa train`` feeds them (uint8 rows made
    float per batch above :data:`mfa.workflow.STREAM_ABOVE` values); no run folder or
    checkpoint is written. The rows so far are saved after each fit (``"complete": false``
    in ``selection.json``), each file written whole or left as it was, so an interrupted
    sweep keeps its finished fits, and ``resume=True`` fits only the rest.

    ``selection.json`` also records the settings that decide what a fit computes
    (:func:`mfa.selection_resume.sweep_settings`: the data settings, the model's noise, the
    seeds, the trainer's section, the device type) and a digest of the training and
    validation images. A resume refuses a sweep where any of them differs (naming each
    key), or that records none (saved before sweeps could resume). Its grid may differ:
    saved cells in the new grid are read back as they were saved (fit seconds included),
    failed ones and new ones are fitted, and saved cells outside it are kept in the JSON's
    ``outside_grid`` (not in the table, bests, CSV or plot) for a later resume. With no
    ``selection.json`` in ``out_dir`` a resume fits every cell (logging so), unless other
    ``selection.*`` files are there.

    Args:
        config: a :class:`~mfa.config.RunConfig`.
        components, factors: the grid.
        out_dir: where the table and plot go; ``None``: ``<output.dir>/select-<data.name>``.
        method: ``"em"`` or ``"sgd"`` to override ``train.method``.
        overwrite: replace the ``selection.*`` files of an earlier sweep in ``out_dir``
            (otherwise refused before anything is fitted).
        resume: continue the sweep saved in ``out_dir`` (see above); not with ``overwrite``.

    Returns:
        The sweep and the paths of the files written.

    Raises:
        ValueError: an invalid grid, a hierarchical method, no validation split, a
            ``(K, L)`` the data cannot take (``L > D`` or ``K`` above the training rows), or
            an earlier sweep's files in ``out_dir`` without ``overwrite`` or ``resume`` (or
            ``out_dir`` a file or empty), ``data.missing`` set, a trainer device this machine
            does not have, ``resume`` with ``overwrite``, or a saved sweep ``resume`` cannot
            continue (other settings or images, or a ``selection.json`` that cannot be read).
        OSError: ``out_dir`` cannot be made (checked before any fit).
        mfa.folder_lock.RunFolderInUse: another ``mfa select`` (or ``mfa train``) holds
            ``out_dir``.
    """
    from mfa.config import apply_overrides, check_trainer_devices, resolve_device
    from mfa.folder_lock import hold_run_folder
    from mfa.selection_resume import data_digest, sweep_settings
    from mfa.workflow import load_data

    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the sweep "
                         "saved in the folder, overwrite replaces it; pass one")
    if out_dir is not None and not str(out_dir).strip():  # (Path("") is the working folder)
        raise ValueError("out_dir is empty: give a folder, or None for the default")
    if method is not None:
        config = apply_overrides(config, [f"train.method={method}"])
    if config.train.method not in ("em", "sgd"):
        raise ValueError(f"mfa select trains flat models with em or sgd, not train.method="
                         f"{config.train.method!r}; pass --method em or --method sgd")
    ks, ls = _grid(components, "components", 1), _grid(factors, "factors", 0)
    if config.data.missing.kind != "none":
        raise ValueError(f"mfa select compares models on complete images; data.missing.kind="
                         f"{config.data.missing.kind!r} is not supported here (use mfa train)")
    device = resolve_device(config.device)
    trainer_config = config.trainer_config()
    check_trainer_devices(config.train.method, trainer_config)
    data = load_data(config)
    n, d = data.train_pixels.shape
    if data.val_pixels.shape[0] == 0:
        raise ValueError(f"the data {data.name} has no validation split; set "
                         "data.val_fraction > 0")
    if max(ls) > d:
        raise ValueError(f"factors {[v for v in ls if v > d]} exceed the {d} features of "
                         f"{data.name}")
    if max(ks) > n:
        raise ValueError(f"components {[v for v in ks if v > n]} exceed the {n} training "
                         f"images of {data.name}")
    rows = min(n, getattr(trainer_config, "init_samples", n))  # (as mfa train checks it)
    if getattr(trainer_config, "init", "none") != "none" and max(ks) > rows:
        raise ValueError(f"components {[v for v in ks if v > rows]} exceed the {rows} training "
                         f"images the initialisation gets (train.{config.train.method}."
                         "init_samples)")
    meta = {"dataset": data.name, "method": config.train.method,
            "image_shape": list(data.image_shape), "sizes": data.sizes,
            "grid": {"components": ks, "factors": ls},
            "settings": sweep_settings(config, device),
            "data_digest": data_digest(data.train_pixels, data.val_pixels)}
    out_dir = (Path(config.output.dir) / f"select-{data.name}" if out_dir is None
               else Path(out_dir)).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; pass a folder (--out) for the sweep's files")
    made = _make_folders(out_dir)  # (an unusable folder was found after every fit)
    lock_made, held = not (out_dir / LOCK_NAME).exists(), False
    try:
        with hold_run_folder(out_dir, command="mfa select"):  # (two sweeps: one replaced the
            held = True  # other's files)
            earlier = sorted(q.name for q in out_dir.glob("selection.*"))
            finished = None
            if resume:
                finished = _finished(out_dir, earlier, meta)
            elif earlier and not overwrite:
                raise ValueError(f"{out_dir} already holds an earlier sweep "
                                 f"({', '.join(earlier)}); pass another --out folder, "
                                 "--resume to continue it, or --overwrite to replace it")
            sweep = _select(config, data, ks, ls, device, out_dir, meta, finished)
            return sweep, sweep.save(out_dir, metadata=meta)
    except BaseException:
        # Only a sweep that held the folder removes what it made there: one refused
        # (RunFolderInUse) removed the .lock and the folder of the sweep that held them,
        # which it had found missing a moment before that sweep made them.
        if held:
            _remove_own(out_dir, made, lock_made)
        raise


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; those this call made, innermost first (one
    another process made meanwhile is not). A failure removes them again."""
    made = []
    try:
        for path in reversed([q for q in (folder, *folder.parents) if not q.exists()]):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue
            made.insert(0, path)
    except BaseException:
        _remove_own(folder, made, False)
        raise
    return made


def _remove_own(folder: Path, made: list[Path], lock_made: bool) -> None:
    """Remove ``folder``'s lock where this sweep made it (``lock_made``; a refused sweep left
    it in the user's folder) and the folders it ``made`` that stay empty."""
    if lock_made:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink()
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir()


def _finished(out_dir: Path, earlier: list[str], meta: dict) -> SelectionSweep | None:
    """The sweep saved in ``out_dir`` that a resume continues, checked against the run's
    ``meta`` (:func:`select_run`); ``None`` where there is none (``earlier``: the
    ``selection.*`` files there)."""
    from mfa.selection_resume import check_same_sweep

    path = out_dir / "selection.json"
    if not path.is_file():
        if earlier:
            raise ValueError(f"cannot resume in {out_dir}: it holds {', '.join(earlier)} but "
                             "no selection.json, the record a resume reads; pass --overwrite "
                             "(or another --out folder) to start a new sweep")
        logger.info("nothing to resume in %s (no selection.json): fitting every (K, L)",
                    out_dir)
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume from {path}: it is not a sweep's JSON record "
                         f"({error}); pass --overwrite to start a new sweep") from None
    check_same_sweep(record, meta["settings"],
                     meta["data_digest"], str(out_dir))
    finished = SelectionSweep.load(path)
    grid = {(k, lat) for lat in meta["grid"]["factors"] for k in meta["grid"]["components"]}
    saved = [(r["K"], r["L"], r["error"]) for r in [*finished.rows, *finished.outside_grid]]
    reused = sum((k, lat) in grid and error is None for k, lat, error in saved)
    outside = [f"K={k}, L={lat}" for k, lat, _ in saved if (k, lat) not in grid]
    logger.info("resuming the sweep in %s: %d of the %d (K, L) read back, %d to fit", out_dir,
                reused, len(grid), len(grid) - reused)
    if outside:
        logger.info("%d saved (K, L) not in this grid (%s) stay in selection.json's "
                    "outside_grid, out of the table", len(outside), "; ".join(outside))
    return finished


def _select(config: Any, data: Any, ks: list[int], ls: list[int], device: torch.device,
            out_dir: Path, meta: dict, finished: SelectionSweep | None) -> SelectionSweep:
    """The sweep of :func:`select_run` (its checks done), continuing ``finished``; the rows
    so far are saved in ``out_dir`` with ``meta`` after each fit (``complete: false`` in the
    JSON), so a failure or Ctrl-C keeps the finished fits."""
    from mfa.em import ConvergenceWarning, EMTrainer
    from mfa.model import MixtureOfFactorAnalyzers
    from mfa.sgd import SGDTrainer
    from mfa.workflow import _training_data

    d = data.train_pixels.shape[1]
    # As mfa train feeds them: above STREAM_ABOVE values uint8 rows made float per batch (for
    # Adam, rows it draws its own batches from; a loader of EM's batch size gave it batches
    # of 4,096 rows instead of its 256)
    train, val = _training_data(data, config, device)
    mc = config.model
    trainer_cls = EMTrainer if config.train.method == "em" else SGDTrainer

    def fit(k: int, lat: int):
        model = MixtureOfFactorAnalyzers(k, d, lat, mc.noise, min_noise=mc.min_noise,
                                         generator=torch.Generator().manual_seed(config.seed),
                                         device=device)
        trainer = trainer_cls(config.trainer_config())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            trainer.fit(model, train, val)
        for warning in caught:
            logger.warning("K=%d, L=%d: %s", k, lat, warning.message)
        logger.info("K=%d, L=%d fitted", k, lat)
        return model

    if trainer_cls is SGDTrainer:  # (the first Adam imports torch._dynamo: 1.5-3.7 s that
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first fit was charged)
    return sweep_models(train, val, ks, ls, fit, scale=256 if data.dequantize else None,
                        on_row=lambda partial: partial.save(out_dir, metadata=meta),
                        finished=finished, n_features=d)
