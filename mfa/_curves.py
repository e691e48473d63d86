"""Training curves: :func:`plot_training_curve`, re-exported by :mod:`mfa.viz` (kept apart
from the image grids to keep both modules short). Plots use matplotlib's Agg canvas directly
(no pyplot, no display, no global state)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mfa._temporaries import write_atomically
from mfa._validation import is_real_number

__all__ = ["plot_training_curve"]


def plot_training_curve(
    history: Sequence[Mapping[str, object]],
    path: str | os.PathLike[str],
    keys: Sequence[str] = ("train_log_likelihood", "val_log_likelihood"),
    *,
    x_key: str | None = None,
    title: str | None = None,
    x_offsets: Mapping[str, float] | None = None,
    x_label: str | None = None,
) -> Path:
    """Plot ``keys`` of a trainer's ``history`` against the iteration or epoch; save a PNG.

    Args:
        history: records such as ``{"iteration": 3, "train_log_likelihood": -512.0, ...}``.
            Missing or ``None`` values are skipped. Records with several values of ``"run"``
            (EM restarts, ``n_init > 1``) are drawn as one line per run.
        path: the output file (format from the suffix, normally ``.png``).
        keys: the record keys to draw, one line each.
        x_key: the x-axis key; default ``"iteration"`` or ``"epoch"`` when the records have
            it, else the record index.
        title: the figure title.
        x_offsets: ``{key: offset}``: ``key``'s points are drawn at ``x + offset`` (other
            keys at ``x``). EM records score the training data with the parameters *before*
            the iteration's M-step and the validation data with those *after* it, so
            ``{"train_log_likelihood": -1}`` puts both at the count of M-steps applied to
            the parameters they score (:func:`mfa.figures.training_curve`).
        x_label: the x-axis label; default ``x_key`` (``"record"`` without one).

    The y-limits leave out the first point of a line of 3 or more whose first point lies
    further outside the range of the line's other points than that range is wide (EM's
    first validation score, under the weakest prior, flattened the rest of the curve); the
    figure then says so ("first point off scale: <key> <value>").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(keys, str):  # (its characters were taken for keys: a "no data" figure)
        raise TypeError(f"keys must be a sequence of record keys, got the string {keys!r}; "
                        f"pass [{keys!r}]")
    offsets = _check_offsets(x_offsets, keys)
    history = list(history)
    if x_key is None:
        first = history[0] if history else {}
        x_key = next((k for k in ("iteration", "epoch") if k in first), None)
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    runs = sorted({r["run"] for r in history if isinstance(r.get("run"), int)})
    groups = [(None, history)] if len(runs) < 2 else [
        (run, [r for r in history if r.get("run") == run]) for run in runs
    ]
    lines = []  # (label, ys) of every line drawn
    for key in keys:
        offset = offsets.get(key, 0)
        for run, records in groups:
            points = [
                (record.get(x_key, i) if x_key else i, float(record[key]))
                for i, record in enumerate(records)  # (numpy numbers too)
                if is_real_number(record.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                xs = [x + offset for x in xs] if offset else xs
                label = key if run is None else f"{key} (run {run})"
                axes.plot(xs, ys, marker="o", markersize=3, label=label)
                lines.append((label, ys))
    _leave_out_far_first_points(axes, lines)
    if lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(x_label or x_key or "record")
    axes.set_ylabel("log-likelihood per sample (nats)" if any("log_likelihood" in k
                                                               for k in keys) else "value")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = path.suffix[1:].lower() or "png"  # (matplotlib's default)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format))
    return path


def _check_offsets(x_offsets: object, keys: Sequence[str]) -> dict[str, float]:
    if x_offsets is None:
        return {}
    if not isinstance(x_offsets, Mapping):
        raise TypeError(f"x_offsets must be a mapping {{key: offset}}, got "
                        f"{type(x_offsets).__name__}")
    for key, offset in x_offsets.items():
        if key not in keys:
            raise ValueError(f"x_offsets names {key!r}, which is not one of keys {list(keys)}")
        if not is_real_number(offset) or not math.isfinite(offset):
            raise TypeError(f"x_offsets[{key!r}] must be a finite number, got {offset!r}")
    return dict(x_offsets)


def _leave_out_far_first_points(axes, lines: list[tuple[str, Sequence[float]]]) -> None:
    """Set the y-limits without the first point of a line (3 points or more) that lies
    further outside the range of its other points than that range is wide, and name it on
    the figure; nothing when no line has one."""
    kept, far = [], []
    for label, ys in lines:
        finite = [y for y in ys[1:] if math.isfinite(y)]
        if len(ys) >= 3 and len(finite) >= 2 and math.isfinite(ys[0]):
            low, high = min(finite), max(finite)
            if ys[0] < low - (high - low) or ys[0] > high + (high - low):
                kept += finite
                far.append((label, ys[0]))
                continue
        kept += [y for y in ys if math.isfinite(y)]
    if not far:
        return
    low, high = min(kept), max(kept)
    margin = 0.05 * (high - low) if high > low else max(0.5, 0.05 * abs(high))
    low, high = low - margin, high + margin
    far = [(label, y) for label, y in far if not low <= y <= high]
    if far:  # (a first point within the others' margin stays in view, unnamed)
        axes.set_ylim(low, high)
        axes.text(0.99, 0.01, "\n".join(f"first point off scale: {label} {y:.4g}"
                                         for label, y in far),
                  transform=axes.transAxes, ha="right", va="bottom", fontsize=8, color="0.3")
