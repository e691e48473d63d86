"""What a saved ``mfa select`` sweep records so that it can be resumed, and a resume's checks.

``selection.json`` is the sweep's source of truth (:meth:`mfa.selection.SelectionSweep.save`):
besides its rows it records the settings that decide what a fit computes
(:func:`sweep_settings`) and a digest of the training and validation images
(:func:`data_digest`). :func:`mfa.run_select.select_run` with ``resume=True`` reads it back
(:meth:`mfa.selection.SelectionSweep.load`, whose rows :func:`rows_by_cell` checks) and
refuses it where a setting or the images differ (:func:`check_same_sweep`, naming each
difference): its rows would not compare with the rows fitted now.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FREE_KEYS", "check_same_sweep", "data_digest", "rows_by_cell", "sweep_settings"]

#: Config keys a resume may change: where the data files are and how they are read, and the
#: grid's own sizes (``--components`` and ``--factors`` set them). Also free: ``output.*``,
#: ``data.missing.*`` (a sweep refuses missing data), the other trainers' sections, and the
#: chosen trainer's ``progress`` and ``checkpoint_every`` (a sweep saves no checkpoint).
FREE_KEYS = frozenset({"data.root", "data.download", "data.num_workers",
                       "model.n_components", "model.n_factors"})

_NUMBERS = ("n_params", "train_log_likelihood", "val_log_likelihood", "val_bits_per_dim",
            "bic", "aic", "fit_seconds")
_FLAGS = ("best_val", "best_bic")


def sweep_settings(config: Any, device: torch.device) -> dict[str, Any]:
    """The dotted keys of ``config`` (a :class:`~mfa.config.RunConfig`) that decide what a
    sweep's fits compute, with their values: ``data.*``, ``model.noise``, ``model.min_noise``,
    ``seed``, ``train.method`` and its trainer's section, but :data:`FREE_KEYS` and the keys
    listed with them; ``device`` and the trainer's ``device`` are the device types the fits
    ran on (``"cpu"``, ``"cuda"``: a CPU's and a GPU's sums round differently, and their fit
    times are not comparable), ``device`` given as resolved by
    :func:`mfa.config.resolve_device`."""
    from mfa.config import config_to_dict, resolve_device
    from mfa.config_text import dotted_leaves

    method = config.train.method
    section = f"train.{method}."
    settings = {}
    for key, value in dotted_leaves(config_to_dict(config)).items():
        if (key in FREE_KEYS or key.startswith(("output.", "data.missing."))
                or key in (f"{section}progress", f"{section}checkpoint_every")
                or (key.startswith("train.") and key != "train.method"
                    and not key.startswith(section))):
            continue
        settings[key] = value
    settings["device"] = device.type
    own = settings.get(f"{section}device")
    settings[f"{section}device"] = device.type if own is None else resolve_device(own).type
    return json.loads(json.dumps(settings))  # (as read back: tuples are lists)


def data_digest(train_pixels: torch.Tensor, val_pixels: torch.Tensor) -> str:
    """SHA-256 (hex) of the training and validation images, uint8 ``[N, D]`` each: their
    shapes and pixels, the rows a sweep fits and scores (with ``data.seed``, which the
    settings hold, they fix the dequantised rows too)."""
    digest = hashlib.sha256()
    for pixels in (train_pixels, val_pixels):
        digest.update(repr(tuple(pixels.shape)).encode())
        digest.update(pixels.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def check_same_sweep(record: Any, settings: dict[str, Any], digest: str, where: str) -> None:
    """Refuse to resume the sweep ``record`` (``selection.json``, read from ``where``) with
    the run's ``settings`` (:func:`sweep_settings`) and image ``digest`` (:func:`data_digest`)
    where they differ from the recorded ones, or where it records none (saved before a sweep
    could be resumed).

    Raises:
        ValueError: naming each differing key with its saved and current value; or
            ``record`` not a JSON object, its settings missing or not a mapping, its
            ``data_digest`` not a string (each said so).
    """
    how = ("; rerun with the saved values, or pass --overwrite (or another --out folder) to "
           "start a new sweep")
    start = "; pass --overwrite (or another --out folder) to start a new sweep"
    if not isinstance(record, dict):
        kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean"
                }.get(type(record), "a number")
        raise ValueError(f"cannot resume the sweep in {where}: its selection.json holds "
                         f"{kind}, not a sweep's record (a JSON object){start}")
    saved = record.get("settings")
    if saved is None:
        raise ValueError(f"cannot resume the sweep in {where}: it records no settings (saved "
                         "before mfa select could resume?), so its rows cannot be checked "
                         f"against this run's{start}")
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume the sweep in {where}: its settings are "
                         f"{saved!r:.60}, not a mapping of config keys, so its rows cannot be "
                         f"checked against this run's{start}")
    if not isinstance(record.get("data_digest"), str):
        raise ValueError(f"cannot resume the sweep in {where}: its data_digest is "
                         f"{record.get('data_digest')!r:.60}, not a SHA-256 hex string, so "
                         f"its images cannot be checked against this run's{start}")
    missing = object()
    keys = sorted({*saved, *settings})
    if saved.get("train.method") != settings.get("train.method"):  # then every key of both
        keys = [key for key in keys  # trainers' sections differs too: ~55 were listed
                if key == "train.method" or not key.startswith("train.")]
    differ = [f"{key} (saved {_shown(saved, key)}, now {_shown(settings, key)})"
              for key in keys if saved.get(key, missing) != settings.get(key, missing)]
    if differ:
        raise ValueError(f"cannot resume the sweep in {where}: it was fitted with other "
                         f"settings, so its rows would not compare with fits made now: "
                         f"{'; '.join(differ)}{how}")
    if record["data_digest"] != digest:
        raise ValueError(f"cannot resume the sweep in {where}: its settings match, but the "
                         "training or validation images are not those it was fitted on (did "
                         f"the files under data.root change?){how}")


def _shown(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "not set"


def rows_by_cell(rows: Sequence[Any], where: str) -> dict[tuple[int, int], dict]:
    """``{(K, L): row}`` of a finished sweep's rows (dicts with the keys of
    :data:`mfa.selection.COLUMNS`; a missing key is ``None``), each checked.

    Raises:
        ValueError: naming ``where`` and the row: not a mapping, ``K`` not an int >= 1, ``L``
            not an int >= 0, ``n_params`` neither an int nor ``None``, a score neither a
            number nor ``None``, ``fit_seconds`` not a
            number, ``error`` neither text nor ``None``, or two rows of one ``(K, L)`` (a
            ``fit_fn`` that returned other sizes than asked: not matched to a grid).
    """
    from mfa.selection import COLUMNS

    cells: dict[tuple[int, int], dict] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is a {type(row).__name__}, not a mapping")
        row = dict.fromkeys(COLUMNS) | {key: row.get(key) for key in COLUMNS}
        k, lat = row["K"], row["L"]
        if type(k) is not int or k < 1 or type(lat) is not int or lat < 0:
            raise ValueError(f"{where}: row {i} has K={k!r}, L={lat!r}; K must be an int >= "
                             "1 and L an int >= 0")
        bad = [key for key in _NUMBERS if row[key] is not None
               and (isinstance(row[key], bool) or not isinstance(row[key], (int, float)))]
        if type(row["n_params"]) is float:  # (3137.0: the table formats it as an int)
            bad.insert(0, "n_params")
        bad += [key for key in _FLAGS if not isinstance(row[key], bool)]
        if row["fit_seconds"] is None:
            bad.append("fit_seconds")
        if row["error"] is not None and not isinstance(row["error"], str):
            bad.append("error")
        if bad:
            raise ValueError(f"{where}: the row of K={k}, L={lat} has invalid values for "
                             f"{', '.join(bad)}")
        if (k, lat) in cells:
            raise ValueError(f"{where}: two rows have K={k}, L={lat} (a fit_fn that returned "
                             "other sizes than asked?); its rows cannot be matched to a grid")
        cells[(k, lat)] = row
    return cells
