"""Resuming a sweep: the checks of a finished sweep's rows before they are reused
(:func:`rows_by_cell`, for :func:`mfa.selection.sweep_models`' ``finished`` and
:meth:`mfa.selection.SelectionSweep.load`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["rows_by_cell"]

_NUMBERS = ("n_params", "train_log_likelihood", "val_log_likelihood", "val_bits_per_dim",
            "bic", "aic", "fit_seconds")
_FLAGS = ("best_val", "best_bic")


def rows_by_cell(rows: Sequence[Any], where: str) -> dict[tuple[int, int], dict]:
    """``{(K, L): row}`` of a finished sweep's rows (dicts with the keys of
    :data:`mfa.selection.COLUMNS`; a missing key is ``None``), each checked.

    Raises:
        ValueError: naming ``where`` and the row: not a mapping, ``K`` not an int >= 1, ``L``
            not an int >= 0, a score neither a number nor ``None``, ``fit_seconds`` not a
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
