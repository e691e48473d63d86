"""Training curves: :func:`plot_training_curve`, re-exported by :mod:`mfa.viz` (kept apart
from the image grids to keep both modules short). Plots use matplotlib's Agg canvas directly
(no pyplot, no display, no global state)."""

from __future__ import annotations

import math
import os
import textwrap
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
    run_labels: Mapping[int, str] | None = None,
    markers: Sequence[tuple[float, str]] = (),
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
        run_labels: ``{run: label}`` of runs drawn apart (default ``"run <n>"``; EM's
            re-seeding rounds are runs after its restarts).
        markers: ``(x, text)`` pairs drawn as dotted vertical lines, each text once in the
            legend (e.g. where EM's noise prior changed, which lowers the train curve).

    Every key's unit must agree (``*log_likelihood*`` and ``*objective``: nats per row,
    ``*bits_per_dim*``: bits per dimension); one run's lines share a colour (one run: a
    colour a key), one key's lines a line style. The
    y-limits leave out the first point of a line of 3 or more whose first point lies
    further outside the range of the line's other points than that range is wide (EM's
    first validation score, under the weakest prior, flattened the rest of the curve); the
    figure then says so below the axes ("first point off scale: <key> <value>"), where the
    legend cannot cover it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(keys, str):  # (its characters were taken for keys: a "no data" figure)
        raise TypeError(f"keys must be a sequence of record keys, got the string {keys!r}; "
                        f"pass [{keys!r}]")
    offsets = _check_offsets(x_offsets, keys)
    y_label = _unit(keys)
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
    lines, all_x = [], []  # (label, ys) of every line drawn; every x drawn
    for k, key in enumerate(keys):
        offset = offsets.get(key, 0)
        for g, (run, records) in enumerate(groups):
            colour = f"C{(g if len(groups) > 1 else k) % 10}"  # (one run: a colour a key)
            points = [
                (record.get(x_key, i) if x_key else i, float(record[key]))
                for i, record in enumerate(records)  # (numpy numbers too)
                if is_real_number(record.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                xs = [x + offset for x in xs] if offset else xs
                name = None if run is None else (run_labels or {}).get(run, f"run {run}")
                label = key if name is None else f"{key} ({name})"
                axes.plot(xs, ys, marker="o", markersize=3, label=label, color=colour,
                          linestyle=_STYLES[k % len(_STYLES)])
                lines.append((label, ys))
                all_x += list(xs)
    named = set()
    for x, text in markers:
        axes.axvline(x, color="0.5", linestyle=":", linewidth=1,
                     label=None if text in named else text)
        named.add(text)
    notes = _leave_out_far_first_points(axes, lines)
    if lines:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    if all_x and all(float(x).is_integer() for x in all_x):
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # (epochs drew 1.5)
    axes.set_xlabel(x_label or x_key or "record")
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    if title:  # (wrapped: a long one was cut at both edges)
        axes.set_title(textwrap.fill(str(title), 70), fontsize=10)
    if notes:
        figure.text(0.99, 0.01, "\n".join(notes), ha="right", va="bottom", fontsize=8,
                    color="0.3")
    figure.tight_layout(rect=(0, 0.045 * len(notes), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = path.suffix[1:].lower() or "png"  # (matplotlib's default)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format))
    return path


#: Line styles of the keys, in order (a run's lines share its colour).
_STYLES = ("-", "--", "-.", ":")


def _unit(keys: Sequence[str]) -> str:
    """The y-axis label of ``keys``, refused where they mix nats and bits per dimension
    (one axis labelled in nats showed a bits/dim line)."""
    units = {"log-likelihood per sample (nats)" if "log_likelihood" in key
             or key.endswith("objective")  # (EM's train_objective: nats a row too)
             else "bits per dimension" if "bits_per_dim" in key else "value" for key in keys}
    if len(units) > 1 and units != {"value"}:
        raise ValueError(f"keys {list(keys)} mix units ({', '.join(sorted(units))}): one "
                         "axis cannot show them; plot them in separate figures")
    return units.pop() if units else "value"


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


def _leave_out_far_first_points(axes, lines: list[tuple[str, Sequence[float]]]) -> list[str]:
    """Set the y-limits without the first point of a line (3 points or more) that lies
    further outside the range of its other points than that range is wide; the notes that
    name those points (none when no line has one)."""
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
        return []
    low, high = min(kept), max(kept)
    margin = 0.05 * (high - low) if high > low else max(0.5, 0.05 * abs(high))
    low, high = low - margin, high + margin
    far = [(label, y) for label, y in far if not low <= y <= high]
    if far:  # (a first point within the others' margin stays in view, unnamed)
        axes.set_ylim(low, high)
    return [f"first point off scale: {label} {y:.4g}" for label, y in far]
