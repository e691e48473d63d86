"""A trained run's scores: the data a run config names (:func:`load_data`), held-out
log-likelihood and bits/dim (:func:`evaluate_model`), and :func:`evaluate`, what ``mfa
evaluate`` reports (with NDB, :mod:`mfa.run_ndb`, and outlier AUROC/AUPR against another
dataset, :mod:`mfa.run_outliers`). Re-exported by :mod:`mfa.workflow`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mfa.checkpoint import load_checkpoint
from mfa.config import RunConfig, apply_overrides
from mfa.data import DatasetNotFoundError, ImageData, load_dataset
from mfa.data.names import canonical_name
from mfa.metrics import bits_per_dim, mean_log_likelihood
from mfa.model import MixtureOfFactorAnalyzers
from mfa.outliers import SCORE_NAMES
from mfa.run_folder import check_same_pools, check_same_split, is_unfinished, resolve_checkpoint
from mfa.run_ndb import held_out_split, ndb_metrics
from mfa.run_outliers import check_outlier_data, outlier_metrics

__all__ = ["evaluate", "evaluate_model", "load_data"]

logger = logging.getLogger("mfa")


def load_data(config: RunConfig) -> ImageData:
    """The dataset a run config names (``mfa.data.load_dataset`` with ``config.data``)."""
    return load_dataset(**config.data.load_kwargs())


def evaluate_model(model: MixtureOfFactorAnalyzers, data: ImageData, splits) -> dict:
    """Mean held-out log-likelihood per split (nats per image) and, for dequantised data,
    bits/dim (otherwise the log says why there are none)."""
    out = {}
    for split in splits:
        if data.pixels(split).shape[0] == 0:
            continue
        loader = data.loader(split, batch_size=1024, dtype=model.dtype)
        ll = mean_log_likelihood(model, loader)
        out[f"{split}_log_likelihood"] = ll
        if data.dequantize:
            out[f"{split}_bits_per_dim"] = float(bits_per_dim(ll, data.n_features))
    if out and not data.dequantize:  # (the keys were left out without a word)
        logger.info("no bits/dim: data.dequantize is false, so the pixels are pixel/255 "
                    "floats, not 8-bit levels spread over their bins, and their density is "
                    "no probability of the 256 grey levels; set data.dequantize=true for "
                    "bits/dim")
    return out


def _other_data(config: RunConfig, name: str, overrides: Sequence[str]) -> ImageData:
    """The dataset ``name`` read with the run's data settings and ``overrides``: from the
    run's ``data.root`` where it is there (torchvision's layout holds several datasets), else,
    unless the overrides give a root, from its own default place (against mnist, a
    Fashion-MNIST run's flat folder was read again: the two share their files' names)."""
    settings = [f"data.name={name}", *overrides]
    try:
        return load_data(apply_overrides(config, settings))
    except (DatasetNotFoundError, ValueError):
        given = any(o.split("=", 1)[0].strip() == "data.root" for o in overrides)
        same = canonical_name(name) == canonical_name(config.data.name)
        if given or same or config.data.root is None:
            raise
    logger.info("%s is not in the run's data.root %s: read from its own default place",
                name, config.data.root)
    return load_data(apply_overrides(config, [f"data.name={name}", "data.root=null",
                                              *overrides]))


def evaluate(checkpoint: str | Path, *, splits=("test",), ndb_bins: int = 0,
             config: RunConfig | None = None, seed: int = 0,
             outliers_against: str | None = None, against_overrides: Sequence[str] = (),
             outlier_scores: Sequence[str] = SCORE_NAMES, device=None) -> dict:
    """Held-out log-likelihood, bits/dim and (``ndb_bins > 0``) NDB of model samples
    (clamped to the pixel range [0, 1]) against the training bins, with real held-out images
    (``ndb_reference``: the first listed split other than train, else val, else test, that
    has images) as the reference (:mod:`mfa.run_ndb`; a large training split fits the bins
    on a seeded subset, ``ndb_train_rows``). Every input is checked before anything is
    computed.

    ``config`` names the data (default: the checkpoint's own run config; one that would
    re-split the run's data is refused, :func:`mfa.run_folder.check_same_split`). With
    ``outliers_against`` (a dataset name), ``result["outliers"]`` holds the AUROC and AUPR of
    every score in ``outlier_scores`` for the run's test split against that dataset's test
    split (:func:`mfa.run_outliers.outlier_metrics`); the other dataset is read with the
    run's data settings, ``data.name`` replaced and ``against_overrides`` applied. ``device``:
    where the model computes (default: the CPU, where the checkpoint loads).
    """
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    if config is not None and ckpt.run_config is not None:  # (the CLI's --set rule)
        check_same_split(ckpt.run_config, config)
    config = config or ckpt.run_config
    if config is None:
        raise ValueError(f"{checkpoint} holds no run config: cannot tell which data to load")
    data = load_data(config)
    model = ckpt.model if device is None else ckpt.model.to(device)
    if data.n_features != model.n_features:
        raise ValueError(f"the data ({data.name}, image shape {tuple(data.image_shape)}) has "
                         f"{data.n_features} features but the run's model has "
                         f"{model.n_features}: check the data.* settings")
    check_same_pools((ckpt.metrics or {}).get("pools"), data)
    empty = [split for split in splits if data.pixels(split).shape[0] == 0]
    if empty:
        raise ValueError(f"the {', '.join(empty)} split of {data.name} is empty: nothing to "
                         "evaluate")
    other = None
    if outliers_against is not None:  # loaded and checked before anything is computed
        try:
            other = _other_data(config, outliers_against, against_overrides)
        except DatasetNotFoundError as error:  # its data settings come from --against-set
            raise type(error)(str(error).replace("--set data.", "--against-set data.")) from None
        except ValueError as error:  # e.g. a folder without data.root
            raise ValueError(f"{error} (its settings: CLI --against-set data.KEY=VALUE)") from None
        check_outlier_data(data, other, scores=outlier_scores)
    if ndb_bins:  # the reference: real held-out images, the first listed split not train
        held = held_out_split(data, splits, ndb_bins)
    result = evaluate_model(model, data, splits)
    if ndb_bins:
        result.update(ndb_metrics(model, data, held, ndb_bins, seed))
    if other is not None:
        result["outliers"] = outlier_metrics(model, data, other, scores=outlier_scores,
                                             seed=seed, checked=True)
    if is_unfinished(ckpt):  # (an interrupted run: its last checkpoint's model)
        result["unfinished"] = True
    return result
