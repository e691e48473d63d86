"""Training curves: :func:`plot_training_curve`, re-exported by :mod:`mfa.viz` (kept apart
from the image grids to keep both modules short). Plots use matplotlib's Agg canvas directly
(no pyplot, no display, no global state)."""

from __future__ import annotations

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
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(keys, str):  # (its characters were taken for keys: a "no data" figure)
        raise TypeError(f"keys must be a sequence of record keys, got the string {keys!r}; "
                        f"pass [{keys!r}]")
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
    drawn = False
    for key in keys:
        for run, records in groups:
            points = [
                (record.get(x_key, i) if x_key else i, float(record[key]))
                for i, record in enumerate(records)  # (numpy numbers too)
                if is_real_number(record.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                label = key if run is None else f"{key} (run {run})"
                axes.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn = True
    if drawn:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(x_key or "record")
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
