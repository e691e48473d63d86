"""Model selection sweeps over ``(K, L)``: validation bits/dim, BIC, size and fit time.

One model is fitted per pair of a grid ``components × factors`` (by
:func:`mfa.metrics.select_model`, which scores it on the training data for BIC and on the
validation data); the sweep keeps one row per model and marks the best by validation
likelihood (the choice to make: it measures generalisation directly) and the best by BIC
(``−2 log L + p log N`` on the training rows, the classical penalised choice, which needs no
held-out data). For dequantised 8-bit images (``x = (pixel + u)/256``) the validation score is
also given in bits/dim (:func:`mfa.metrics.bits_per_dim`); lower bits/dim is a higher
log-likelihood, so the two rank the same.

* :func:`sweep_models`: the library function (tensors or loaders, any ``fit_fn``); given a
  ``finished`` sweep it fits only the cells that sweep lacks.
* :func:`mfa.run_select.select_run`: the ``mfa select`` command: a run config's data and
  trainer, the table saved as CSV, markdown and JSON and a plot of validation score against
  ``K`` per ``L``; ``resume=True`` continues the sweep its ``selection.json`` records
  (:mod:`mfa.selection_resume`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mfa._temporaries import write_atomically, write_text_atomically
from mfa._validation import check_positive_int
from mfa.data.quantized import QuantizedRows
from mfa.metrics import bits_per_dim, select_model
from mfa.training import check_reiterable

logger = logging.getLogger(__name__)

__all__ = ["SelectionSweep", "sweep_models"]

#: Columns of the saved table, in order.
COLUMNS = ("K", "L", "n_params", "train_log_likelihood", "val_log_likelihood",
           "val_bits_per_dim", "bic", "aic", "fit_seconds", "best_val", "best_bic", "error")

#: What a fit may raise and the sweep records as that row's failure (an error of the data or
#: the grid is refused before the first fit).
FIT_ERRORS = (RuntimeError, ValueError, FloatingPointError)


@dataclass
class SelectionSweep:
    """The outcome of :func:`sweep_models`.

    Attributes:
        rows: one dict per ``(K, L)`` in grid order (``L`` outer, ``K`` inner) with the keys
            of :data:`COLUMNS`: parameter count, mean train and validation log-likelihood
            (nats per row), validation bits/dim (``None`` unless a ``scale`` was given), BIC
            and AIC on the training rows, fit seconds (``fit_fn`` alone, not the scoring passes
            after it), ``best_val`` / ``best_bic``
            marking the best row by each criterion, and ``error`` (``None``, or the message
            of a fit that raised: its scores are ``None``).
        best_by_val: the row with the highest finite validation log-likelihood; ``None``
            when no row has one (every fit failed: the rows still say why, and are saved).
        best_by_bic: the row with the lowest finite BIC (``None`` when none is finite).
        best_model: the fitted model of ``best_by_val`` (the other models are not kept);
            ``None`` when that row was read back from a ``finished`` sweep, or the sweep
            from a file (:meth:`load`).
        n_features: ``D`` (``None`` only for a sweep of loaders whose fits all failed,
            given no ``n_features``, or read back from one).
        scale: :func:`sweep_models`' ``scale`` (``val_bits_per_dim`` is reported when set).
        complete: ``False`` for the partial sweeps passed to ``on_row`` before the last fit.
        outside_grid: rows of a ``finished`` sweep whose ``(K, L)`` is not in this grid: kept
            (saved in the JSON, read back by :meth:`load` and reused by a later resume whose
            grid has them) but not in the table, the bests, the CSV or the plot.
        n_reused: how many of ``rows`` were read back from a ``finished`` sweep, not fitted.
    """

    rows: list[dict]
    best_by_val: dict | None
    best_by_bic: dict | None
    best_model: Any
    n_features: int | None
    complete: bool = True
    scale: float | None = None  # of sweep_models: validation bits/dim reported when set
    outside_grid: list[dict] = field(default_factory=list)
    n_reused: int = 0

    @property
    def failed(self) -> list[dict]:
        """The rows whose fit raised."""
        return [r for r in self.rows if r.get("error") is not None]

    @property
    def has_bits_per_dim(self) -> bool:
        # (a sweep built by hand, without scale, reports them when its rows hold them)
        return self.scale is not None or self.rows[0].get("val_bits_per_dim") is not None

    def table(self, markdown: bool = False) -> str:
        """The rows as a text (or markdown) table; the best rows are marked."""
        score = "val bits/dim" if self.has_bits_per_dim else "val log-lik"
        head = ["K", "L", "params", score, "BIC", "train s", "best"]
        lines = []
        for r in self.rows:
            value = r["val_bits_per_dim"] if self.has_bits_per_dim else r["val_log_likelihood"]
            marks = [name for name, key in (("val", "best_val"), ("BIC", "best_bic")) if r[key]]
            note = " ".join(f"<- {m}" for m in marks)
            if r.get("error") is not None:
                note = "failed: " + r["error"].replace("|", "/")[:120]
            lines.append([str(r["K"]), str(r["L"]), _text(r["n_params"], "d"),
                          _text(value, ".4f"), _text(r["bic"], ".1f"),
                          f"{r['fit_seconds']:.2f}", note])
        if markdown:
            rule = ["---:"] * (len(head) - 1) + [":---"]
            return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, rule, *lines])
        widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) if i < len(head) - 1 else c
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
                         .rstrip() for cells in [head, *lines])

    def save(self, out_dir: str | Path, *, metadata: dict | None = None,
             stem: str = "selection") -> list[Path]:
        """``<stem>.csv``, ``<stem>.md``, ``<stem>.json`` (``metadata``, the rows, bests,
        ``scale`` and :attr:`outside_grid`: the record :meth:`load` reads back) and
        ``<stem>.png`` (:meth:`plot`) in ``out_dir``; returns their paths. Each file is
        written whole or left as it was; the JSON first."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{stem}.{ext}" for ext in ("csv", "md", "json", "png")]
        def write_csv(temporary: Path) -> None:
            with open(temporary, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows({key: row.get(key) for key in COLUMNS} for row in self.rows)

        def pair(row: dict | None) -> dict | None:
            return None if row is None else {"K": row["K"], "L": row["L"]}

        def plain(rows: list[dict]) -> list[dict]:
            return [{key: _finite_or_none(row.get(key)) for key in COLUMNS} for row in rows]

        record = {**(metadata or {}), "n_features": self.n_features, "scale": self.scale,
                  "complete": self.complete, "best_by_val": pair(self.best_by_val),
                  "best_by_bic": pair(self.best_by_bic), "rows": plain(self.rows),
                  "outside_grid": plain(self.outside_grid)}
        # (strict JSON: a non-finite score is null, not NaN/Infinity). First: a resume reads
        # it, and a kill between two files then leaves the newest rows there.
        write_text_atomically(paths[2], json.dumps(record, indent=2, allow_nan=False) + "\n")
        write_atomically(paths[0], write_csv)  # (each file whole or as it was)
        write_text_atomically(paths[1], self.table(markdown=True) + "\n")
        self.plot(paths[3])
        return paths

    @classmethod
    def load(cls, path: str | Path) -> SelectionSweep:
        """The sweep a ``selection.json`` of :meth:`save` records, to pass to
        :func:`sweep_models` as ``finished``; no model (``best_model`` is ``None``). A score
        that was not finite was saved as ``null`` and reads back as ``None``.

        Raises:
            ValueError: the file is not such a record (naming it and what is wrong).
        """
        from mfa.selection_resume import rows_by_cell

        try:
            record = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a sweep's JSON record: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
            raise ValueError(f"{path} is not a sweep's JSON record (no list of rows)")
        d, scale = record.get("n_features"), record.get("scale")
        if (not (d is None or (type(d) is int and d >= 1))
                or not (scale is None or type(scale) in (int, float))):
            raise ValueError(f"{path}: n_features={d!r} and scale={scale!r}; they must be an "
                             "int >= 1 (or null where every fit failed) and a number or null")
        outside = record.get("outside_grid") or []
        if not isinstance(outside, list):
            raise ValueError(f"{path}: outside_grid is not a list of rows")
        cells = list(rows_by_cell([*record["rows"], *outside], str(path)).values())
        if d is None and any(row["error"] is None for row in cells):
            raise ValueError(f"{path}: n_features is null but some of its fits succeeded; "
                             "it must be their int D")
        rows, outside = cells[:len(record["rows"])], cells[len(record["rows"]):]
        best = _best_by_val(rows)  # (None where every fit failed: a resume fits them again)
        return _marked(rows, (best, None), d, scale, complete=record.get("complete") is True,
                       outside_grid=outside)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Validation bits/dim (or −log-likelihood per row) against ``K``, one line per
        ``L``; the best by validation is circled. Saved with matplotlib's Agg backend."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        bpd = self.has_bits_per_dim

        def value(r: dict) -> float:
            return r["val_bits_per_dim"] if bpd else -r["val_log_likelihood"]

        scored = [r for r in self.rows if r.get("error") is None  # (None: a non-finite score
                  and r["val_log_likelihood"] is not None]  # read back from a saved sweep)
        for lat in sorted({r["L"] for r in scored}):
            line = sorted((r for r in scored if r["L"] == lat), key=lambda r: r["K"])
            axes.plot([r["K"] for r in line], [value(r) for r in line], "o-", label=f"L={lat}")
        best = self.best_by_val
        if best is not None:  # (None: every fit failed, an empty plot)
            axes.plot([best["K"]], [value(best)], "o", markersize=14, markerfacecolor="none",
                      markeredgecolor="black", label=f"best: K={best['K']}, L={best['L']}")
        ks = sorted({r["K"] for r in self.rows})
        if len(ks) > 1:
            axes.set_xscale("log")
        axes.set_xticks(ks, [str(k) for k in ks])
        axes.minorticks_off()
        axes.set_xlabel("K (components)")
        axes.set_ylabel("validation bits/dim" if bpd else "validation −log p per row (nats)")
        axes.set_title(title or "model selection (lower is better)")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_format = path.suffix[1:].lower() or "png"
        write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format))
        return path


def _text(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _grid(values: Sequence[int], name: str, minimum: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    values = [check_positive_int(v, name, minimum=minimum) for v in values]
    if not values:  # (checked first: True == 1 and 2.0 == 2 were dropped as duplicates)
        raise ValueError(f"{name} must not be empty")
    return list(dict.fromkeys(values))  # duplicates once, order kept


def _check_rows(train: Any, train_name: str, validation: Any, val_name: str,
                ks: Sequence[int] = (), ls: Sequence[int] = ()) -> int | None:
    """Refuse, before any fit, what the sweep would fail on after one: a one-shot iterator
    (read once per model), tensors that are not finite ``[N, D]`` with one ``D``, and for a
    training tensor (or :class:`~mfa.data.QuantizedRows`), ``ks`` above its rows or ``ls``
    above its features. Returns the rows' ``D`` (``None`` when neither is a tensor or
    ``QuantizedRows``)."""
    if isinstance(train, (Tensor, QuantizedRows)) and len(train.shape) == 2:
        n, d = train.shape
        if ls and max(ls) > d:
            raise ValueError(f"factors {[v for v in ls if v > d]} exceed the {d} features of "
                             f"{train_name}")
        if ks and max(ks) > n:
            raise ValueError(f"components {[v for v in ks if v > n]} exceed the {n} rows of "
                             f"{train_name}")
    width = None
    for rows, name in ((train, train_name), (validation, val_name)):
        if isinstance(rows, Tensor):
            if rows.dim() != 2 or rows.shape[0] == 0:
                raise ValueError(f"{name} must be a tensor [N, D] with N > 0, got shape "
                                 f"{tuple(rows.shape)}")
            if not rows.is_floating_point() or not bool(torch.isfinite(rows).all()):
                raise ValueError(f"{name} must hold finite floating-point values (dtype "
                                 f"{rows.dtype}; NaN or inf present or not a float tensor)")
        else:
            check_reiterable(rows, name)
            if not isinstance(rows, QuantizedRows):
                continue
        if width is not None and rows.shape[1] != width:
            raise ValueError(f"{train_name} has {width} features but {name} has "
                             f"{rows.shape[1]}")
        width = int(rows.shape[1])
    return width


def sweep_models(
    train: Tensor | Iterable,
    validation: Tensor | Iterable,
    components: Sequence[int],
    factors: Sequence[int],
    fit_fn: Callable[[int, int], Any],
    *,
    scale: float | None = None,
    on_row: Callable[[SelectionSweep], None] | None = None,
    finished: SelectionSweep | None = None,
    n_features: int | None = None,
) -> SelectionSweep:
    """Fit one model per ``(K, L)`` in ``components × factors`` and compare them.

    A fit that raises (:data:`FIT_ERRORS`, e.g. Adam diverging) is logged and recorded as a
    failed row (its ``error`` set, its scores ``None``); the sweep goes on. Rows whose
    validation score is not finite are never the best; where no row has a finite one (every
    fit failed), the sweep has no best (``best_by_val`` is ``None``, a warning says why).

    Args:
        train: the training rows (``[N, D]`` tensor or iterable of batches; images
            ``[N, C, H, W]`` are flattened to rows) that ``fit_fn`` fits; BIC and AIC are
            computed on them.
        validation: held-out rows, same forms; the main criterion.
        components: the ``K`` values (ints >= 1; duplicates are dropped).
        factors: the ``L`` values (ints >= 0).
        fit_fn: ``fit_fn(K, L) -> model``, the fitted model (see
            :func:`mfa.metrics.select_model`).
        scale: for dequantised images, the divisor of :func:`mfa.metrics.bits_per_dim`
            (256) to report validation bits/dim; ``None``: no bits/dim.
        on_row: called after each fit but the last with the sweep so far
            (``complete=False``): to save it as it goes (failed rows included).
        finished: an earlier sweep of the same data and ``fit_fn`` (a partial one given to
            ``on_row``, or :meth:`SelectionSweep.load` of its JSON) to resume: its rows
            (and :attr:`~SelectionSweep.outside_grid`) whose ``(K, L)`` is in the grid are
            taken as they are (bits/dim recomputed for ``scale``), only the other cells are
            fitted, failed rows included; its rows outside the grid are returned in
            ``outside_grid``. Cells are matched by the ``(K, L)`` a row records, so
            ``fit_fn`` must return the sizes asked for. Whether the settings match is the
            caller's to check (:func:`mfa.run_select.select_run` does).
        n_features: the data's ``D``, where ``train`` and ``validation`` are loaders (a
            tensor's or :class:`~mfa.data.QuantizedRows`' is read from it): saved with the
            sweep, so that one whose fits all failed can be resumed; ``None``: learnt from
            the first model a fit returns.

    Returns:
        A :class:`SelectionSweep`, rows in grid order.

    Raises:
        ValueError: a bad grid or data (before any fit), an ``n_features`` other than the
            data's, a ``finished`` sweep of another ``D``, or a fit of other sizes than asked
            while resuming.
    """
    from mfa.selection_resume import rows_by_cell

    ks = _grid(components, "components", 1)
    ls = _grid(factors, "factors", 0)
    if validation is None:
        raise ValueError("sweep_models needs validation data (the main criterion)")
    # images [N, C, H, W] as rows, as the trainers and the metrics take them
    train, validation = (rows.flatten(1) if isinstance(rows, Tensor) and rows.dim() > 2
                         else rows for rows in (train, validation))
    width = _check_rows(train, "train", validation, "validation", ks, ls)
    if n_features is not None:
        check_positive_int(n_features, "n_features")
        if width is not None and n_features != width:
            raise ValueError(f"n_features={n_features} but the data have {width} features")
    n_features = width if n_features is None else int(n_features)
    if scale is not None:
        bits_per_dim(0.0, 1, scale=scale)  # a bad scale refused before any fit, not after all
    candidates = [(k, lat) for lat in ls for k in ks]
    done: dict[tuple[int, int], dict] = {}  # the rows of the cells fitted or read back
    outside: list[dict] = []
    if finished is not None:
        if not isinstance(finished, SelectionSweep):
            raise TypeError(f"finished must be a SelectionSweep, got {type(finished).__name__}")
        if (n_features is not None and finished.n_features is not None
                and finished.n_features != n_features):
            raise ValueError(f"the finished sweep has {finished.n_features} features but the "
                             f"data have {n_features}")
        n_features = n_features or finished.n_features  # (None: its fits all failed)
        pool = rows_by_cell([*finished.rows, *finished.outside_grid], "finished")
        for cell, row in pool.items():  # (copies: the finished sweep's rows stay as they are)
            if cell not in candidates:  # (no marks: they are not in this sweep's table)
                outside.append(row | {"best_val": False, "best_bic": False})
            elif row["error"] is None:
                val = row["val_log_likelihood"]
                done[cell] = row | {"val_bits_per_dim": None if scale is None or val is None
                                    else float(bits_per_dim(val, n_features, scale=scale))}
    n_reused = len(done)
    fitted: tuple[dict, Any] | None = None  # the best row by validation fitted now, its model
    fitting: list[float] = []  # the fit's own seconds (not the scoring passes after it)

    def timed_fit(k: int, lat: int):
        started = time.perf_counter()
        try:
            return fit_fn(k, lat)
        finally:
            fitting.append(time.perf_counter() - started)

    def sweep(rows: list[dict], complete: bool) -> SelectionSweep:
        best = _best_by_val(rows)
        model = fitted[1] if fitted is not None and best is fitted[0] else None
        if not complete:  # marked on copies: a later marking rewrote a partial sweep's rows
            copies = [dict(r) for r in rows]
            best = next((c for c, r in zip(copies, rows, strict=True) if r is best), None)
            rows = copies
        return _marked(rows, (best, model), n_features, scale, complete,
                       outside_grid=list(outside), n_reused=n_reused)

    for k, lat in (cell for cell in candidates if cell not in done):
        fitting.clear()
        started = time.perf_counter()
        try:
            result = select_model(train, [(k, lat)], timed_fit, criterion="val_log_lik",
                                  validation=validation)
        except FIT_ERRORS as error:  # recorded; the sweep goes on
            logger.warning("K=%d, L=%d failed: %s: %s", k, lat, type(error).__name__, error)
            done[k, lat] = dict.fromkeys(COLUMNS) | {
                "K": k, "L": lat,
                "fit_seconds": fitting[0] if fitting else time.perf_counter() - started,
                "best_val": False, "best_bic": False,
                "error": f"{type(error).__name__}: {(str(error) or '-').splitlines()[0]}"}
        else:
            r, model = result.rows[0], result.best_model
            if finished is not None and (r["K"], r["L"]) != (k, lat):
                raise ValueError(f"fit_fn({k}, {lat}) returned a model of K={r['K']}, "
                                 f"L={r['L']}: a resumed sweep matches rows to cells by size")
            if n_features is not None and int(model.n_features) != n_features:
                raise ValueError(f"fit_fn({k}, {lat}) returned a model of "
                                 f"{model.n_features} features; the finished sweep has "
                                 f"{n_features}")
            n_features = n_features or int(model.n_features)
            bpd = None if scale is None else float(
                bits_per_dim(r["val_log_lik"], n_features, scale=scale))
            done[k, lat] = {"K": r["K"], "L": r["L"], "n_params": r["n_params"],
                            "train_log_likelihood": r["mean_log_lik"],
                            "val_log_likelihood": r["val_log_lik"], "val_bits_per_dim": bpd,
                            "bic": r["bic"], "aic": r["aic"], "fit_seconds": fitting[0],
                            "best_val": False, "best_bic": False, "error": None}
            score = r["val_log_lik"]
            if math.isfinite(score) and (fitted is None
                                         or score > fitted[0]["val_log_likelihood"]):
                fitted = (done[k, lat], model)
        if on_row is not None and len(done) < len(candidates):
            on_row(sweep([done[c] for c in candidates if c in done], complete=False))
    rows = [done[c] for c in candidates]
    result = sweep(rows, complete=True)
    if result.best_by_val is None:  # (it raised, and `mfa select` kept none of the rows)
        logger.warning("no (K, L) of the sweep gave a finite validation log-likelihood: %s",
                       "; ".join(f"K={r['K']}, L={r['L']}: {r['error'] or 'not finite'}"
                                 for r in rows))
    return result


def _best_by_val(rows: list[dict]) -> dict | None:
    """The row of the highest finite validation log-likelihood (ties: the first)."""
    scored = [r for r in rows if r["val_log_likelihood"] is not None
              and math.isfinite(r["val_log_likelihood"])]
    return max(scored, key=lambda r: r["val_log_likelihood"]) if scored else None


def _marked(rows: list[dict], best: tuple[dict | None, Any], n_features: int, scale: float | None,
            complete: bool, **extra: Any) -> SelectionSweep:
    """The sweep of ``rows`` with ``best`` (the best row by validation, its model) and the
    lowest finite BIC marked (ties: the first in grid order); ``extra``: the sweep's other
    fields."""
    for r in rows:
        r["best_val"] = r is best[0]
        r["best_bic"] = False
    finite_bic = [r for r in rows if r["bic"] is not None and math.isfinite(r["bic"])]
    best_bic = min(finite_bic, key=lambda r: r["bic"]) if finite_bic else None
    if best_bic is not None:
        best_bic["best_bic"] = True
    return SelectionSweep(list(rows), best[0], best_bic, best[1], n_features,
                          complete=complete, scale=scale, **extra)
