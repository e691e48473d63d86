"""What the two trainers (:mod:`mfa.em`, :mod:`mfa.sgd`) share: the convergence warning (and
the stage of a larger fit named in it: :func:`stage_warnings`), the streamed evaluation of
a model on data, the hold-out split, the TF32 switch of a fit, their progress bars (from
:mod:`mfa.progress`), the resumable-state helpers and the non-finite checks.

Neither trainer imports the other; both import this module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from mfa import distributed, linalg, missing, parameters, progress
from mfa._checkpoint_checks import check_generator_state
from mfa._data_stream import DEFAULT_BATCH_SIZE, DataSource
from mfa.data.quantized import QuantizedRows
from mfa.model import MixtureOfFactorAnalyzers
from mfa.progress import progress_bar as progress_bar  # (the trainers' bars)

__all__ = [
    "ConvergenceWarning",
    "stage_warnings",
    "check_finite_params",
    "check_fit_inputs",
    "check_params_match",
    "check_reiterable",
    "check_resumed_config",
    "clone_params",
    "evaluate",
    "hold_out",
    "tf32_enabled",
    "tf32_matmul",
    "with_config_tf32",
    "restore_state",
    "save_state",
]


class ConvergenceWarning(UserWarning):
    """EM or SGD stopped at its iteration limit before meeting its tolerance."""


def evaluate(model: MixtureOfFactorAnalyzers, source: DataSource | Iterable, *,
             across_processes: bool = False) -> float:
    """Mean log-likelihood per row (nats) of ``model`` over a data source.

    Args:
        model: the model to score.
        source: a :class:`DataSource`, or anything it accepts (a tensor ``[N, D]``, a
            ``Dataset`` or a ``DataLoader``), streamed in batches.
        across_processes: under :mod:`torch.distributed`, the mean over every process's
            rows (one all-reduce; call it on every process), each process passing its own:
            its ``DataLoader`` over ``ShardSampler(dataset)``, as ``fit`` takes validation
            data. Without it a process scores the rows it is given, so such a loader gives
            the mean of this process's shard only. Rows given to every process alike (a
            tensor) need neither: each process then scores all of them.

    Each row's log-density is the model's exact one (as in ``model.log_prob``; the plain
    Woodbury form, ~20 % cheaper, was 3 nats a row off for a float32 component with one noise
    variance at 1e-9). Batch totals are accumulated in float64 on the CPU. A source that
    allows missing entries (NaN) is scored by the observed-data likelihood
    (:func:`mfa.missing.row_log_prob`).
    """
    if not isinstance(source, DataSource):
        source = DataSource(source, model, DEFAULT_BATCH_SIZE, "data")
    total = torch.zeros((), dtype=torch.float64)
    count, observed = 0, torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        terms = model.component_terms()
        for batch in source:
            if source.allow_missing:
                log_p = missing.row_log_prob(model, batch)
                observed += (~torch.isnan(batch)).sum().cpu()
            else:
                log_p = linalg.logsumexp(model._component_log_prob(batch, terms,
                                                                   near_rows_only=True))
            total += log_p.double().sum().cpu()
            count += batch.shape[0]
    reduced = source.sharded or across_processes  # every process's rows
    if reduced:
        total, count, observed = distributed.sum_across_processes(total, count, observed)
    name = getattr(source, "name", "data")
    if count == 0:  # (a mean of 0.0 would score it as a fit)
        raise ValueError(f"{name} is empty (0 rows)")
    if source.allow_missing and observed == 0:  # (every model would score 0.0 on it)
        raise ValueError(f"{name} has no observed entry: all of its {int(count)} rows are NaN "
                         "(missing), so it cannot score a model")
    return total / count if reduced else (total / count).item()


def observed_per_row(source: DataSource) -> float:
    """The mean number of observed (not NaN) features per row of ``source`` (one pass; every
    process's rows under torch.distributed); ``nan`` for a source without rows."""
    count, observed = 0, torch.zeros((), dtype=torch.int64)
    for batch in source:
        observed += (~torch.isnan(batch)).sum().cpu()
        count += batch.shape[0]
    if source.sharded:
        count, observed = distributed.sum_across_processes(count, observed)
    return float(observed) / float(count) if float(count) else math.nan


def hold_out(data: Tensor | Dataset | Iterable, model: MixtureOfFactorAnalyzers,
             fraction: float, seed: int, batch_size: int, *, allow_missing: bool = False):
    """``(train, validation)``: a seeded ``fraction`` of a tensor's or Dataset's rows held out
    for validation, the same rows on every process; ``(data, None)`` for any other iterable,
    for ``fraction == 0``. Both trainers hold out validation data this way when none is
    given. A ``fraction`` that rounds to every row is refused (nothing would be left to
    train on); one that rounds to no row warns and returns ``(data, None)``.

    Args:
        data: a tensor ``[N, D]`` or :class:`~mfa.data.QuantizedRows` (checked and moved as a
            :class:`DataSource` would; quantized rows are split as uint8), a ``Dataset`` or
            another iterable.
        allow_missing: rows may hold NaN (a trainer with ``missing="allow"``).
    """
    if isinstance(data, (Tensor, QuantizedRows)):
        data = DataSource(data, model, batch_size, "data", allow_missing=allow_missing).tensor
    elif not isinstance(data, Dataset) or isinstance(data, IterableDataset):
        return data, None  # a stream (an IterableDataset has no rows to choose from)
    n = len(data)
    n_val = int(round(n * fraction))
    if fraction > 0 and n and n_val == n:
        raise ValueError(f"val_fraction={fraction} holds out all {n} rows, leaving none to "
                         "train on; use a smaller val_fraction or pass validation data")
    if n_val == 0:
        if fraction > 0 and n:
            warnings.warn(f"val_fraction={fraction} of {n} rows holds out none: fitting "
                          "without validation data (no early stopping, no validation-chosen "
                          "settings); pass validation data or use more rows", stacklevel=3)
        return data, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if isinstance(data, QuantizedRows):
        return data.subset(perm[n_val:]), data.subset(perm[:n_val])
    if isinstance(data, Tensor):
        perm = perm.to(data.device)
        return data[perm[n_val:]], data[perm[:n_val]]
    return Subset(data, perm[n_val:].tolist()), Subset(data, perm[:n_val].tolist())


@contextlib.contextmanager
def stage_warnings(stage: str) -> Iterator[None]:
    """Hold the warnings of the block and issue each again at its end (after an error too),
    its message followed by ``" [stage]"`` (``"... kept [child 2/3]"``: which stage of a fit
    warned), with its category, origin and module, under the filters in force outside the
    block: a user's filter by category, module or the message's start acts on it as on the
    warning itself. Every :class:`ConvergenceWarning` is held (under the ``"default"`` filter
    a later stage's, the same text from the same line, was dropped); others as the filters
    let them through.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            yield
    finally:
        modules = {getattr(m, "__file__", None): name
                   for name, m in list(sys.modules.items())} if caught else {}
        for held in caught:
            warnings.warn_explicit(f"{held.message} [{stage}]", held.category, held.filename,
                                   held.lineno, module=modules.get(held.filename),
                                   source=held.source)


# ---------------------------------------------------------------------- TF32 switch


def tf32_enabled() -> bool:
    """Whether float32 CUDA matrix products may use TF32 now (either of torch's APIs)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # the newer fp32_precision API was used: the legacy getter refuses
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _set_tf32(allow: bool) -> None:
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow
    except RuntimeError:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if allow else "ieee"


@contextlib.contextmanager
def tf32_matmul(allow: bool) -> Iterator[None]:
    """Inside the block, float32 CUDA matrix products may (``allow=True``) or may not use
    TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``, or its newer
    ``fp32_precision`` where that API is in use); the previous state is restored on exit,
    error or not. Nothing is touched when the state is already ``allow``. The flags exist
    on CPU builds too, where they change nothing."""
    before = tf32_enabled()
    if before == bool(allow):
        yield
        return
    _set_tf32(bool(allow))
    try:
        yield
    finally:
        _set_tf32(before)


def with_config_tf32(fit: Callable) -> Callable:
    """Run a trainer's ``fit`` under :func:`tf32_matmul` of its ``config.allow_tf32``, and
    close the progress bars it left open (an error or Ctrl-C inside it: the bar, and the
    console output routed through it, are put away before the error is reported)."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        bars = progress.open_bars()
        try:
            with tf32_matmul(self.config.allow_tf32):
                return fit(self, *args, **kwargs)
        finally:
            progress.close_bars_opened_since(bars)

    return wrapper


# ---------------------------------------------------------------------- resumable state


def clone_params(model: MixtureOfFactorAnalyzers) -> dict[str, Tensor]:
    """A detached copy of ``model.state_dict()`` (to keep the best parameters of a fit)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def save_state(state: dict, config: object, history: list[dict]) -> dict:
    """A trainer's resumable state: a deep copy of ``state`` plus ``config`` (a dataclass,
    stored as a dict) and ``history``; primitives and tensors only, so it loads with
    ``torch.load(weights_only=True)``."""
    out = copy.deepcopy(state)
    out["config"] = _builtin(asdict(config))
    out["history"] = copy.deepcopy(history)
    return out


def _builtin(value: object) -> object:
    """``value`` with subclasses of Python's numbers and strings (``numpy.float64``, which a
    config's float field accepts) made the builtins that ``weights_only`` loading rebuilds."""
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {key: _builtin(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_builtin(item) for item in value)
    return value


def restore_state(
    state: dict, required: set[str], trainer: str, types: dict[str, tuple] | None = None
) -> tuple[dict, list[dict]]:
    """Check a state saved by :func:`save_state` and return ``(copy of state, history)``.

    Args:
        state: the saved state.
        required: keys the state must hold.
        trainer: the trainer's name, for messages.
        types: optional ``{key: accepted types}`` for keys that, when present, must be of one
            of those types (``bool`` is never taken for an ``int``); a ``"generator"`` key is
            always checked to be a state ``torch.Generator.set_state`` accepts.

    Raises:
        TypeError, ValueError: naming the missing key, the wrongly typed key or the invalid
            generator state, so a tampered checkpoint fails at load time, not inside ``fit``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"{trainer} state must be a dict, got {type(state).__name__}")
    missing = required - set(state)
    if missing:
        raise ValueError(f"{trainer} state is missing keys {sorted(missing)}")
    for key, kinds in (types or {}).items():
        if key not in state:
            continue
        value = state[key]
        bad_bool = isinstance(value, bool) and bool not in kinds
        if bad_bool or not isinstance(value, kinds):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise TypeError(
                f"{trainer} state key {key!r} must be {names}, got {type(value).__name__} "
                f"{value!r:.60}"
            )
    if state.get("generator") is not None:
        check_generator_state(state["generator"], f"{trainer} state key 'generator'")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise TypeError(f"{trainer} state key 'history' must be a list of dicts")
    state = copy.deepcopy(state)
    return state, copy.deepcopy(history)


def check_reiterable(data: object, name: str) -> None:
    """Refuse a one-shot iterator (a generator, ``iter(...)``) as ``name``: it is read more
    than once (initialisation, every iteration or epoch, every model), and read again it is
    empty."""
    if isinstance(data, Iterable) and not isinstance(data, Tensor) and iter(data) is data:
        raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}), but it is "
                        "read more than once; pass a tensor, a Dataset, a DataLoader or a "
                        "list of batches")


def _plain(value: object) -> object:
    """Tuples as lists, recursively (a saved config may hold either)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_resumed_config(state: dict, config: object, trainer: str,
                         changeable: frozenset[str]) -> None:
    """Refuse to resume ``state`` under a ``config`` that differs from the one it was saved
    with in a field outside ``changeable`` (how long the fit runs, how often it saves,
    progress): the optimizer's and the fit's saved state would carry the old settings on and
    the new ones would be ignored without a word.

    Raises:
        ValueError: naming the first differing field, both values and what may change.
    """
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # a state saved without its config: nothing to compare
    now = asdict(config)
    for key in sorted(now.keys() & saved.keys() - changeable):
        if _plain(now[key]) != _plain(saved[key]):
            raise ValueError(
                f"{trainer} state was saved with {key}={saved[key]!r} but this trainer's "
                f"config has {key}={now[key]!r}; a resumed fit continues under its saved "
                f"settings: resume with the same config (only {', '.join(sorted(changeable))} "
                "may change) or start a new fit"
            )


def check_fit_inputs(model: MixtureOfFactorAnalyzers, data: object, validation: object,
                     saved: dict[str, dict | None], trainer: str) -> None:
    """What both trainers' ``fit`` refuse before any work: a ``model`` of another type or on
    the ``meta`` device (torch's "Cannot copy out of meta tensor" or an error deep in the data
    stream), an empty ``Dataset`` (or a ``DataLoader`` of one: torch's error named a sampler's
    ``num_samples``, or ``torch.cat`` an empty list), one-shot iterators as ``data`` or
    ``validation`` (:func:`check_reiterable`) and, when resuming, saved parameters ``saved``
    (``{state key: params}``) of another model (:func:`check_params_match`)."""
    if not isinstance(model, MixtureOfFactorAnalyzers):
        raise TypeError(f"{trainer}.fit needs a MixtureOfFactorAnalyzers, got "
                        f"{type(model).__name__}")
    parameters.check_device(model.device, f"{trainer}.fit cannot fit the model")
    check_reiterable(data, "data")
    check_reiterable(validation, "validation")
    for name, rows in (("data", data), ("validation", validation)):
        # (Under torch.distributed a DataLoader may be a process's own part, which may be
        # empty; a Dataset is the whole, sharded by the trainer.)
        if isinstance(rows, DataLoader) and not distributed.is_active():
            rows = rows.dataset  # (the rows it reads, not a sampler's count)
        if (isinstance(rows, Dataset) and not isinstance(rows, IterableDataset)
                and hasattr(rows, "__len__") and len(rows) == 0):
            raise ValueError(f"{name} is empty (0 rows)")
    for key, params in saved.items():
        check_params_match(params, model, f"{trainer} state {key!r}")


def check_params_match(params: dict | None, model: MixtureOfFactorAnalyzers, what: str) -> None:
    """Refuse saved parameters (``{name: tensor}``) whose names, shapes or dtypes are not those
    of ``model``'s state dict, before a resumed fit uses them: ``what`` names them."""
    if params is None:
        return
    expected = model.state_dict()
    if set(params) != set(expected):
        raise ValueError(f"{what} holds {sorted(params)}, but the model has {sorted(expected)}")
    for name, value in expected.items():
        got = params[name]
        if not isinstance(got, Tensor) or got.shape != value.shape or got.dtype != value.dtype:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(
                f"{what} {name!r} has shape {shape} ({getattr(got, 'dtype', '?')}), but the "
                f"model's is {tuple(value.shape)} ({value.dtype}): the state was saved for "
                f"another model (K, D, L or dtype differ)"
            )


# ---------------------------------------------------------------------- non-finite checks


def check_finite_params(params: dict[str, Tensor], what: str) -> None:
    """Raise ``FloatingPointError`` naming the first parameter of ``params`` that holds a
    NaN or an infinity; ``what`` says where it came from (e.g. ``"EM iteration 3: the
    M-step"``)."""
    for name, value in params.items():
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"{what} produced non-finite {name}")
