"""The user's workflow as functions: train a run from a config, then draw samples, inpaint,
rank outliers, evaluate and visualise factors from its checkpoint (the figures themselves
are :mod:`mfa.figures`, re-exported here).

The ``mfa`` command (:mod:`mfa.cli`) is a thin argument parser over these functions; they are
importable for scripts and notebooks. A run folder holds::

    config.yaml      the resolved RunConfig
    train.log        the log of the run
    checkpoint.pt    model, config, trainer state and metrics (written atomically; resumable)
    hierarchy/       train.method hierarchical only: root.pt, child-#####.pt, model.pt
    metrics.json     held-out log-likelihoods, bits/dim, timing
    curve.png        the training curve
    samples.png, inpaint-<mask>.png, outliers.png, outliers.csv, factors.png
    FAILED           only after a run failed with a checkpoint to resume from: the error
    .lock            held by the `mfa train` writing the folder (a second one is refused)

Every value a run needs is checked before its folder is made: the config, the device, the
data (loaded first) and the model's sizes against the data. A run that fails before its
first checkpoint leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mfa import distributed
from mfa._temporaries import write_text_atomically
from mfa.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from mfa.config import (
    RunConfig,
    check_trainer_devices,
    resolve_device,
    save_config,
)
from mfa.data import ImageData
from mfa.em import ConvergenceWarning, EMTrainer
from mfa.figures import check_output, inpaint, outliers, sample, training_curve, visualize
from mfa.hierarchical_run import HIERARCHY_DIR, HierarchicalRunTrainer
from mfa.hierarchical_section import ignored_seeds_note
from mfa.masks import missing_mask
from mfa.model import MixtureOfFactorAnalyzers
from mfa.resume_rules import device_change_note
from mfa.run_evaluate import evaluate, evaluate_model, load_data
from mfa.run_folder import (
    CHECKPOINT_NAME,
    FAILED_NAME,
    attach_log,
    check_resume_folder,
    check_same_pools,
    clean_up_failed,
    config_lost,
    figure_place,
    free_path,
    hold_run_folder,
    is_unfinished,
    make_run_dir,
    resume_checkpoint,
    run_config_of,
)
from mfa.run_log import detach_log, log_ending
from mfa.sgd import SGDTrainer

__all__ = ["STREAM_ABOVE", "TrainResult", "draw_figures", "evaluate", "evaluate_model",
           "inpaint", "load_data", "missing_masks", "outliers", "sample", "train",
           "training_curve", "visualize"]

logger = logging.getLogger("mfa")

#: Above this many training values (N·D) the trainers get uint8 rows made float per batch
#: (see ``_training_data``) instead of one float tensor.
STREAM_ABOVE = 2**28


@dataclass
class TrainResult:
    run_dir: Path
    model: MixtureOfFactorAnalyzers
    metrics: dict


def _training_data(data: ImageData, config: RunConfig, device: torch.device):
    """The train and val data a run's trainer gets. Up to :data:`STREAM_ABOVE` values: float
    tensors on ``device``. Above (CelebA), never a float copy of the whole set: the uint8
    pixels as :class:`~mfa.data.QuantizedRows` on ``device`` for EM on CUDA and for Adam
    (made float per batch there; their dequantisation noise is hashed, not that of
    ``data.loader``), a streamed uint8 ``DataLoader`` for EM on the CPU (its noise is cheaper
    there), map-style datasets for the hierarchical trainer."""
    n, d = data.train_pixels.shape
    has_val = data.val_pixels.shape[0] > 0
    method = config.train.method
    if n * d <= STREAM_ABOVE:
        val = data.val if has_val else None
        return data.train.to(device), None if val is None else val.to(device)
    if method == "hierarchical":
        # the hierarchical trainer reads map-style datasets (children take subsets of rows)
        return data.dataset("train"), data.dataset("val") if has_val else None
    if method == "sgd" or device.type == "cuda":
        val = data.quantized("val", device=device) if has_val else None
        return data.quantized("train", device=device), val
    # EM on the CPU: uint8 on the host, float one batch at a time.
    batch = config.train.em.batch_size
    val = data.loader("val", batch_size=batch) if has_val else None
    return data.loader("train", batch_size=batch), val


def missing_masks(config: RunConfig, data: ImageData, split: str) -> torch.Tensor | None:
    """The observed masks (bool ``[N, D]``, CPU) that ``config.data.missing`` gives the rows
    of ``split`` (``"train"``: seed, ``"val"``: seed + 1), or ``None`` for kind ``"none"``."""
    mc = config.data.missing
    if mc.kind == "none":
        return None
    gen = torch.Generator().manual_seed(mc.seed + (split == "val"))
    try:
        return missing_mask(mc.kind, data.image_shape, data.pixels(split).shape[0], gen,
                            rate=mc.rate, block_size=mc.block_size)
    except ValueError as error:
        raise ValueError(f"invalid data.missing for {data.name}: {error}") from None


def _remove_pixels(config: RunConfig, data: ImageData, rows, split: str):
    """``rows`` (a tensor of ``split``) with the pixels ``data.missing`` hides set to NaN."""
    observed = missing_masks(config, data, split)
    if observed is None or rows is None:
        return rows
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"data.missing.kind={config.data.missing.kind!r} needs the training "
                         f"data in memory as floats, but {data.name} is kept as uint8 (more "
                         f"than {STREAM_ABOVE} values); lower data.limit")
    nan = torch.full((), float("nan"), dtype=rows.dtype, device=rows.device)
    return torch.where(observed.to(rows.device), rows, nan)


def train(
    config: RunConfig | None, *, resume: str | Path | None = None,
    overrides: Sequence[str] = (), figures: bool = True, callbacks: tuple = (),
) -> TrainResult:
    """Train the model a config describes, in a new run folder (or continue ``resume``).

    Args:
        config: the run. When resuming, ``None`` keeps the saved config; a config given may
            differ from the saved one only in :data:`RESUME_SAFE_KEYS`.
        resume: a run folder or checkpoint to continue from its last saved state; a run
            folder with its ``config.yaml`` but no checkpoint (killed before the first one)
            starts over there, from that config.
        overrides: ``"dotted.key=value"`` strings applied to ``config`` (when resuming
            without a config, to the saved one); on resume only :data:`RESUME_SAFE_KEYS`. A
            new run's relative ``data.root`` is saved resolved (absolute).
        figures: draw the sample, inpainting, outlier and factor figures at the end.
        callbacks: passed to the trainer's ``fit`` (``cb(trainer, model, record)``).

    Returns:
        The run folder, the trained model and the metrics written to ``metrics.json``.

    Raises: ValueError: an invalid config, device, data or model size (before any folder is
    made), or a change that a resumed run cannot take (naming the key).
    """
    if resume is None and config is None:
        raise ValueError("train needs a config, or a run to resume")
    # Under torch.distributed rank 0 alone makes, holds and writes the run folder (a second
    # `mfa train` of it is refused; a resumed one is held before it is read); the others
    # learn its path from rank 0.
    main = distributed.is_main_process()
    with contextlib.ExitStack() as held:
        folder = None if resume is None else resume_checkpoint(resume).parent
        if folder is not None:  # (links it would write through, before its .lock is taken)
            check_resume_folder(folder)
        # (a folder that is no run is refused below, and is left without a .lock)
        if folder is not None and ((folder / CHECKPOINT_NAME).exists()
                                   or (folder / "config.yaml").exists()):
            held.enter_context(hold_run_folder(folder, held=main))
        config, ckpt, restart, changed = run_config_of(config, resume, overrides)
        setup = _prepare(config, ckpt)
        run_dir = folder or distributed.broadcast_from_main(make_run_dir, config)
        try:
            if folder is None:
                held.enter_context(hold_run_folder(run_dir, held=main))
            # config.yaml: a new run's now; a resume's changes with its first checkpoint; a
            # lost file now; a restart's kept as it is unless it changes (a user's comments)
            if main:
                (run_dir / FAILED_NAME).unlink(missing_ok=True)
                if (ckpt is None and (restart is None or changed)) or config_lost(run_dir):
                    save_config(config, run_dir / "config.yaml")
            handler = attach_log(run_dir) if main else None
            try:
                seeds = ignored_seeds_note(config)
                if seeds:
                    logger.warning("%s", seeds)
                if restart is not None:
                    logger.warning("%s holds no %s (stopped before the first one): starting "
                                   "the run over from its config", run_dir, CHECKPOINT_NAME)
                if changed:
                    logger.info("%s with new values for %s", "resumed" if ckpt else "started "
                                "over", ", ".join(changed))
                    moved = (None if ckpt is None  # (a restart: nothing computed yet)
                             else device_change_note(ckpt.run_config, config, changed))
                    if moved:
                        logger.warning("%s", moved)
                return _train(config, run_dir, setup, ckpt, figures, callbacks,
                              bool(changed) and ckpt is not None)
            except BaseException as error:  # said in train.log too
                log_ending(handler, error, run_dir / CHECKPOINT_NAME)
                raise
            finally:
                detach_log(handler)
        except BaseException as error:
            if main:
                clean_up_failed(run_dir, error, created=folder is None)
            raise


#: The trainer class of each ``train.method``.
_TRAINERS = {"em": EMTrainer, "sgd": SGDTrainer, "hierarchical": HierarchicalRunTrainer}


def _fit_options(config: RunConfig, run_dir: Path, setup: _Setup) -> dict:
    """Extra ``fit`` arguments of a method: the hierarchical stages' checkpoint folder, and
    the model a new run starts from (a resumed run's root starts there again where the folder
    lost ``root.pt``: its checkpoint holds the fitted root)."""
    if config.train.method == "hierarchical":
        return {"checkpoint_dir": run_dir / HIERARCHY_DIR,
                "new_model": lambda: _new_model(config, setup.data, setup.device)}
    return {}


@dataclass
class _Setup:
    """What a run needs, built and checked before its folder exists."""

    device: torch.device
    data: ImageData
    model: MixtureOfFactorAnalyzers
    trainer: EMTrainer | SGDTrainer | HierarchicalRunTrainer
    train_data: object
    val_data: object


def _prepare(config: RunConfig, ckpt: Checkpoint | None) -> _Setup:
    device = resolve_device(config.device)
    trainer_config = config.trainer_config()
    check_trainer_devices(config.train.method, trainer_config)
    data = load_data(config)
    mc = config.model
    if ckpt is not None:
        model = ckpt.model.to(device)
        shape = (model.n_components, model.n_factors, model.noise)
        if config.train.method != "hierarchical" and shape != (mc.n_components, mc.n_factors,
                                                               mc.noise):
            raise CheckpointError(f"checkpoint {ckpt.path} holds a model with (K, L, noise) "
                                  f"= {shape}, but its run config says {mc}")
        if model.n_features != data.n_features:
            raise ValueError(
                f"the data ({data.name}, image shape {tuple(data.image_shape)}) has "
                f"{data.n_features} features but the run's model has {model.n_features}")
        check_same_pools((ckpt.metrics or {}).get("pools"), data)
    else:
        try:  # (K-means needs K rows: checked before the run folder is made)
            _check_rows(config, trainer_config, data.sizes["train"])
            model = _new_model(config, data, device)
        except ValueError as error:
            raise ValueError(f"the model config (model.n_components={mc.n_components}, "
                             f"model.n_factors={mc.n_factors}) does not fit the data "
                             f"{data.name} with {data.n_features} features: {error}") from None
    if config.data.missing.kind != "none":
        if not hasattr(trainer_config, "missing"):
            raise ValueError(f"data.missing needs train.method em or sgd, got "
                             f"{config.train.method!r}")
        trainer_config.missing = "allow"  # data.missing hides pixels: train on the rest
    trainer = _TRAINERS[config.train.method](trainer_config)
    if ckpt is not None and ckpt.trainer_state is not None:
        try:
            with warnings.catch_warnings():
                if not is_unfinished(ckpt):  # (not fitted again: how a fit would go is moot)
                    warnings.filterwarnings("ignore", "EMTrainer state saved before EMConfig."
                                            "min_delta", UserWarning)
                trainer.load_state_dict(ckpt.trainer_state)
        except (TypeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds a trainer state that {type(trainer).__name__} "
                f"cannot resume from: {error}") from None
    # The figures are drawn at the end: their sizes and the mask file are checked now.
    check_output(config.output, data.image_shape, None if config.train.method ==
                 "hierarchical" else config.model.n_components, config.model.n_factors)
    train_data, val_data = _training_data(data, config, device)
    train_data = _remove_pixels(config, data, train_data, "train")
    val_data = _remove_pixels(config, data, val_data, "val")
    return _Setup(device, data, model, trainer, train_data, val_data)


def _new_model(config: RunConfig, data: ImageData,
               device: torch.device) -> MixtureOfFactorAnalyzers:
    """The model a new run starts from: ``model.*`` over the data's features, seeded by the
    run's ``seed``."""
    mc = config.model
    return MixtureOfFactorAnalyzers(
        mc.n_components, data.n_features, mc.n_factors, mc.noise, min_noise=mc.min_noise,
        generator=torch.Generator().manual_seed(config.seed), device=device)


def _check_rows(config: RunConfig, trainer_config, n_train: int) -> None:
    """Refuse ``model.n_components`` above the training rows the fit's start reads: the
    initialisation's (``init_samples`` of them, none for ``init: none``), and for a
    hierarchical run the root's, which is fitted to every row whatever its init."""
    method, mc = config.train.method, config.model
    init, key = trainer_config, f"train.{method}.init_samples"
    if method == "hierarchical":  # the root's EM: root_em, train.em's copy when null
        init = trainer_config.root_em
        key = ("train.em.init_samples" if config.train.hierarchical.root_em is None
               else "train.hierarchical.root_em.init_samples")
        if mc.n_components > n_train:
            raise ValueError(_too_few_rows(config, n_train, n_train, key))
    rows = min(n_train, getattr(init, "init_samples", math.inf))
    if getattr(init, "init", "none") != "none" and mc.n_components > rows:
        raise ValueError(_too_few_rows(config, n_train, rows, key))


def _too_few_rows(config: RunConfig, n_train: int, rows: int, key: str) -> str:
    """K above the rows K-means reads (``rows``; a hierarchical root's fit, all ``n_train``):
    what caps them, and the setting that changes it (``key``: the ``init_samples`` read; the
    error said only "its initialisation gets 4000 training images")."""
    limit, root = config.data.limit, config.train.method == "hierarchical"
    if config.model.n_components <= n_train:  # (then init_samples is the cap)
        reads = "the root's initialisation reads" if root else "its initialisation reads"
        return (f"K must be at most the training images {reads}, {key}="
                f"{rows} of {n_train}: lower model.n_components or raise {key}")
    # (raising data.limit helps only where it binds: it caps each split's images)
    more = "raise data.limit" if limit is not None and limit <= n_train else "train on more images"
    reads = "the root's EM is fitted to" if root else "its initialisation reads"
    return (f"K must be at most the training images {reads}, the training "
            f"split's {n_train}" + (f" (data.limit={limit})" if limit is not None else "")
            + f": lower model.n_components or {more}")


def _train(config: RunConfig, run_dir: Path, setup: _Setup, ckpt: Checkpoint | None,
           figures: bool, callbacks: tuple = (), config_changed: bool = False):
    """Fit, evaluate, save; ``config_changed``: a resume's new values, written to config.yaml
    with its first checkpoint (a resume stopped before it keeps the checkpoint's)."""
    data, model, trainer = setup.data, setup.model, setup.trainer
    logger.info("run folder %s; device %s", run_dir, setup.device)
    logger.info("data %s: %s, image shape %s", data.name, data.sizes, data.image_shape)
    mc = config.model
    # (check_same_pools; a resumed run keeps its own record, and one saved before the record
    # existed none: the data it was trained on were not checked, and warned of)
    pools = data.metadata.get("pools") if ckpt is None else (ckpt.metrics or {}).get("pools")
    meta = {"image_shape": list(data.image_shape), "dataset": data.name, "pools": pools}
    # The fit's wall time over the run's sessions: the resumed checkpoint's, plus this one's
    # (none for a finished run resumed: no fit runs).
    earlier = float((ckpt.metrics or {}).get("train_seconds", 0.0)) if ckpt is not None else 0.0
    finished = ckpt is not None and not is_unfinished(ckpt)
    if finished:
        logger.info("the run had finished: nothing is left to fit; its saved model is "
                    "evaluated and its results are written again (train_seconds unchanged)")

    def save(model_, trainer_state, metrics):
        nonlocal config_changed
        if config_changed:  # first: a kill between the two leaves a --resume that re-applies
            save_config(config, run_dir / "config.yaml")  # the change (the file is read)
            config_changed = False
        save_checkpoint(run_dir / CHECKPOINT_NAME, model_, run_config=config,
                        trainer_state=trainer_state, metrics=metrics)

    def checkpoint(trainer_, model_):
        seconds = earlier + time.perf_counter() - started
        save(model_, trainer_.state_dict(), {**meta, "train_seconds": seconds})

    started = time.perf_counter()
    # A finished run is not fitted again: its checkpoint's model and trainer state are the
    # result (the fit of a state an older mfa saved, without the re-seeding rounds and the
    # tempered step, ran them and overwrote the saved model).
    if not finished:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = trainer.fit(model, setup.train_data, setup.val_data, callbacks=callbacks,
                                checkpoint_fn=checkpoint, **_fit_options(config, run_dir, setup))
        for warning in caught:
            logger.warning("%s", warning.message)
    seconds = earlier + (0.0 if finished else time.perf_counter() - started)
    if not distributed.is_main_process():  # rank 0 evaluates and writes the results
        return TrainResult(run_dir, model, {})
    metrics = {**meta, "method": config.train.method, "train_seconds": seconds,
               "iterations": len(trainer.history)}
    if config.train.method == "hierarchical":  # K is known only now
        metrics["n_components"] = model.n_components
    metrics.update(evaluate_model(model, data, ("train", "val", "test")))
    save(model, ckpt.trainer_state if finished else trainer.state_dict(), metrics)
    write_text_atomically(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomically(run_dir / "history.json", json.dumps(trainer.history, indent=2) + "\n")
    logger.info("metrics: %s", metrics)
    if config.output.plot and trainer.history and config.train.method != "hierarchical":
        # (a free name, as the other figures: a finished run resumed keeps its curve.png;
        # no other command writes curve*.png, and this run holds the folder)
        training_curve(trainer.history, free_path(run_dir / "curve.png"),
                       method=config.train.method,
                       title=f"{data.name}: K={mc.n_components}, L={mc.n_factors}",
                       n_init=config.train.em.n_init if config.train.method == "em" else None)
    if figures:  # keeping the files the per-run commands wrote meanwhile (new runs too)
        draw_figures(model, data, config, run_dir, replace=False)
    return TrainResult(run_dir, model, metrics)


def draw_figures(model: MixtureOfFactorAnalyzers, data: ImageData, config: RunConfig,
                 run_dir: Path, *, replace: bool = True) -> list[Path]:
    """The figures a run's config asks for, saved in ``run_dir``; with ``replace=False`` (a
    resumed run) a name that is taken moves on to ``<name>-2``, … (``mfa outliers`` and the
    other commands write the same default names into a run folder). ``output.n_samples``
    sizes the sample grid and the outlier grid (with its ``outliers.csv``); 0 draws
    neither."""
    out = config.output
    paths = []
    gen_seed = config.seed

    def at(name: str, *companions: str) -> dict:
        return figure_place(run_dir / name, companions, replace=replace)

    if out.n_samples:
        paths.append(sample(model, data.image_shape, **at("samples.png"), n=out.n_samples,
                            nrow=out.grid_nrow, seed=gen_seed, scale=out.image_scale,
                            dequantized=data.dequantize))
    held_out = data.pixels("test").shape[0] > 0  # the inpainting and outlier figures' split
    if not held_out and (out.n_inpaint or out.n_samples):
        logger.warning("the test split is empty (data.test_fraction=0?): no inpainting or "
                       "outlier figures")
    if out.n_inpaint and held_out:
        for kind in out.inpaint_masks:
            paths.append(inpaint(model, data, **at(f"inpaint-{kind}.png"), mask=kind,
                                 n=out.n_inpaint, n_samples=out.inpaint_samples, seed=gen_seed,
                                 scale=out.image_scale, mask_image=out.mask_image))
    if out.n_inpaint:
        observed = missing_masks(config, data, "train")
        if observed is not None:  # what training did not see, filled in by the model
            paths.append(inpaint(model, data, **at("inpaint-train-missing.png"),
                                 split="train", observed=observed[: out.n_inpaint],
                                 n=out.n_inpaint, n_samples=out.inpaint_samples,
                                 seed=gen_seed, scale=out.image_scale))
    if held_out and out.n_samples:  # (0: no sample grid, nor outlier grid and CSV)
        place = at("outliers.png", ".csv")
        paths.extend(outliers(model, data, run_dir, n=out.n_samples,
                              nrow=out.grid_nrow, scale=out.image_scale,
                              name=place["path"].stem, if_exists=place["if_exists"]))
    if out.n_factor_components:
        paths.append(visualize(model, data.image_shape, **at("factors.png"),
                               components=range(min(out.n_factor_components,
                                                    model.n_components)),
                               scale=out.image_scale, dequantized=data.dequantize))
    return paths
