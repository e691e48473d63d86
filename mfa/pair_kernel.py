"""A compiled CPU kernel for the ``"centred"`` E-steps' owner pairs (:mod:`mfa.owner_sums`):
for each component ``k`` and each of its pairs (row ``i``, weights ``r``, ``r ⊙ p``), the
spread ``y = x_i − μ_k`` in the work dtype and its sums ``Σ r y``, ``Σ r y pᵀ`` and
``Σ r y²``, in one pass over the pairs' rows.

Why compiled: in torch ops the same sums take six passes over a float64 copy of the rows
(gather, convert, subtract, the product, square, the squared product), bound by memory
traffic: 0.12–0.13 s of the 0.33 s default E-step on 50,000 Fashion-MNIST rows (K = 50,
L = 6, 2 threads), where no slice size, ``einsum`` or Python threading gained anything.
Here each row is read once (four rows at a time, so each accumulator row is loaded once per
four rows) and its spread never leaves the cache: 10–12 ms a 10,000-row batch inside that
E-step against ~25 ms, the default EM iteration 15–17 % faster (``docs/benchmarks.md``).
The kernel is written with `numba` (a declared dependency) and compiled on first use (about
3 s, then cached on disk beside this module or in numba's user cache; a later process loads
it in ~0.33 s, importing numba 0.22 s more), so only passes over data large enough to repay
that take it (:data:`MIN_PASS_VALUES`, :func:`worthwhile`).

Threads: the components are split into ``torch.get_num_threads()`` contiguous ranges of
about equal pair counts, each summed by one thread; each component's sums come from one
thread in pair order, so the result does not depend on the thread count or on how the ranges
are run. The ranges run in one ``prange`` of numba's GNU OpenMP threading layer where it
loads (:func:`_parallel_kernel`): inside an E-step that took the kernel from 10 to 7 ms a
10,000-row batch on a 2-core Xeon, where Python threads (each range a job of a thread pool,
the kernel releasing the GIL) or numba's ``workqueue`` layer gained nothing over one thread
(torch's OpenMP worker keeps busy-waiting for the next product on the other core). Where
that layer is not to be used, the Python threads run them: in a process forked after a
launch (GNU OpenMP is not fork-safe: numba would end the child), where another layer was
chosen (``NUMBA_THREADING_LAYER``) or launched first, where numba's default would be another
(TBB, where installed), or where it fails to load. mfa sets
``numba.config.THREADING_LAYER`` to ``"omp"`` only when it is still ``"default"``, no
layer has been launched and numba's default would be that layer anyway; torch's thread
count, which starting that layer resets, is put back after each launch. Where numba is
missing, the kernel fails to build or run (a ``RuntimeWarning`` says so once) or
``MFA_NUMBA=0`` is set, :mod:`mfa.owner_sums` takes the same sums in torch ops (the same
values to the work dtype's rounding: about 1e-15 relative in float64).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["MIN_PASS_VALUES", "available", "pair_sums", "preferred", "worthwhile"]

#: Passes over fewer values than this (rows × features) take the torch ops
#: (:func:`worthwhile`): the kernel costs ~0.55 s once a process (importing numba 0.22 s,
#: loading the cached kernel 0.33 s) and saves ~1.8 ns a pair and feature (14 ms a pass of
#: 10,000 rows of 784 pixels), so on small data it never pays: the default ``mfa train``
#: (4,000 embedded digits) took 5.0 s with it against 4.1 s without. At this size (about 25,500
#: rows of 784 pixels) it repays its cost in about 15 passes.
MIN_PASS_VALUES = 2 * 10**7

_preferred: contextvars.ContextVar[bool] = contextvars.ContextVar("mfa_pair_kernel",
                                                                  default=True)

_lock = threading.Lock()
_kernel = None  # the compiled function, once built
_failed = False  # numba did not import, or the kernel failed to build or run (_disable)
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None  # (size, the process it was made in)
_parallel = None  # (the serial kernel, the OpenMP kernel over ranges); False: not to be used
_parallel_pid: int | None = None  # the process that launched it


def available() -> bool:
    """Whether the compiled kernel is to be used: ``MFA_NUMBA`` is not ``"0"`` (checked on
    every call), the pass in progress is large enough (:func:`preferred`), numba imports and
    the kernel builds (tried once), and no run of it has failed in this process (then a
    ``RuntimeWarning`` said why, and the torch ops run)."""
    if os.environ.get("MFA_NUMBA", "1") == "0" or not _preferred.get():
        return False
    return _compiled() is not None


def worthwhile(rows: int | None, n_features: int) -> bool:
    """Whether a pass over ``rows`` rows (``None``: unknown, a stream) of ``n_features``
    features is large enough for the kernel (:data:`MIN_PASS_VALUES`). A rule of the data's
    size alone: the same data take the same path whatever ran before in the process."""
    return rows is None or rows * n_features >= MIN_PASS_VALUES


@contextlib.contextmanager
def preferred(flag: bool) -> Iterator[None]:
    """Within the block (this thread or task), use the kernel only if ``flag``."""
    token = _preferred.set(bool(flag))
    try:
        yield
    finally:
        _preferred.reset(token)


def _compiled():
    global _kernel, _failed
    if _kernel is not None or _failed:
        return _kernel
    with _lock:
        if _kernel is None and not _failed:
            try:
                _kernel = _build(cache=True)
            except ImportError:
                _failed = True
            except Exception:  # (numba found no writable cache folder: no cache)
                try:
                    _kernel = _build(cache=False)
                except Exception as error:
                    _disable(error)
    return _kernel


def _disable(error: BaseException) -> None:
    """Turn the kernel off for this process, saying why once."""
    global _kernel, _failed
    _kernel, _failed = None, True
    warnings.warn(f"mfa.pair_kernel: the compiled pair sums failed ({type(error).__name__}: "
                  f"{error}); the E-step takes them in torch ops from now on (slower; "
                  "MFA_NUMBA=0 skips the kernel)", RuntimeWarning, stacklevel=3)


def _spread_sums(x, rows, bounds, first, last, weights, means, sums, sum_y2):
    """The kernel (compiled by :func:`_build`): the sums of components ``first..last-1``."""
    # Components first..last-1; pairs bounds[k]..bounds[k+1]-1 of component k, whose rows
    # are x[rows[p]] and weights weights[p] ([r, r p_1, ..., r p_L]).
    d = x.shape[1]
    n_w = weights.shape[1]
    y = np.empty((4, d), dtype=means.dtype)
    for k in range(first, last):
        mu, acc, acc2 = means[k], sums[k], sum_y2[k]
        p, stop = bounds[k], bounds[k + 1]
        while p + 4 <= stop:
            for b in range(4):
                row = x[rows[p + b]]
                for j in range(d):
                    y[b, j] = row[j] - mu[j]
            w0, w1, w2, w3 = weights[p, 0], weights[p + 1, 0], weights[p + 2, 0], \
                weights[p + 3, 0]
            for j in range(d):
                acc2[j] += ((y[0, j] * y[0, j]) * w0 + (y[1, j] * y[1, j]) * w1
                            + (y[2, j] * y[2, j]) * w2 + (y[3, j] * y[3, j]) * w3)
            for m in range(n_w):
                a0, a1, a2, a3 = weights[p, m], weights[p + 1, m], weights[p + 2, m], \
                    weights[p + 3, m]
                for j in range(d):
                    acc[m, j] += a0 * y[0, j] + a1 * y[1, j] + a2 * y[2, j] + a3 * y[3, j]
            p += 4
        while p < stop:
            row = x[rows[p]]
            for j in range(d):
                y[0, j] = row[j] - mu[j]
            w0 = weights[p, 0]
            for j in range(d):
                acc2[j] += (y[0, j] * y[0, j]) * w0
            for m in range(n_w):
                a0 = weights[p, m]
                for j in range(d):
                    acc[m, j] += a0 * y[0, j]
            p += 1


# Set by _build: what _ranges_sums calls, and numba.prange. Module globals, not closures:
# numba keys a cached function by its closure's values, and a compiled function's differ in
# every process (a closure over it recompiled the OpenMP kernel, ~5 s, in every process).
_serial = None
_prange = range


def _ranges_sums(x, rows, bounds, firsts, lasts, weights, means, sums, sum_y2):
    """The compiled kernel over the component ranges ``firsts[t]..lasts[t]``, one ``prange``
    (compiled by :func:`_build_parallel`)."""
    for t in _prange(firsts.shape[0]):
        _serial(x, rows, bounds, firsts[t], lasts[t], weights, means, sums, sum_y2)


def _build(cache: bool):
    global _serial, _prange
    import numba

    _serial = numba.njit(cache=cache, nogil=True, boundscheck=False)(_spread_sums)
    _prange = numba.prange
    return _serial


def _build_parallel(cache: bool):
    import numba

    return numba.njit(cache=cache, nogil=True, boundscheck=False, parallel=True)(_ranges_sums)


def _parallel_kernel(serial):
    """The OpenMP kernel over ranges, or ``None`` where it is not to be used (module
    docstring): only in the process that launched numba's first layer, or before any
    launch where the user chose none. Built once per serial kernel."""
    global _parallel
    import numba

    if _parallel is False:
        return None
    try:
        layer = numba.threading_layer()
    except ValueError:  # no layer launched yet: the first launch takes config's choice
        layer = None
    if layer is None:
        chosen = numba.config.THREADING_LAYER
        if chosen != "omp" and (chosen != "default" or not _numbas_default_is_omp()):
            return None  # the user's choice, or numba's own (TBB, which is fork-safe)
    elif layer != "omp" or _parallel_pid != os.getpid():
        return None  # another layer, or launched by other code or before a fork
    if getattr(serial, "py_func", None) is not _spread_sums:  # (only the compiled kernel)
        return None
    if _parallel is None or _parallel[0] is not serial:
        with _lock:
            if _parallel is None or _parallel[0] is not serial:
                try:
                    _parallel = serial, _build_parallel(cache=True)
                except Exception:  # (no writable cache folder: checked at definition)
                    _parallel = serial, _build_parallel(cache=False)
    return _parallel[1]


_POOLS = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}
_default_is_omp: bool | None = None


def _numbas_default_is_omp() -> bool:
    """Whether numba's ``"default"`` layer would be GNU OpenMP: the first of
    ``numba.config.THREADING_LAYER_PRIORITY`` whose module imports (checked once). mfa
    claims the ``"default"`` only then, so that it changes no layer numba would choose (with
    TBB installed, numba's fork-safe default, the Python threads run the ranges)."""
    global _default_is_omp
    if _default_is_omp is None:
        import importlib

        import numba

        _default_is_omp = False
        for layer in numba.config.THREADING_LAYER_PRIORITY:
            try:
                importlib.import_module(f"numba.np.ufunc.{_POOLS[layer]}")
            except (ImportError, OSError, KeyError):
                continue
            _default_is_omp = layer == "omp"
            break
    return _default_is_omp


def _launch_parallel(kernel, arrays, ranges, rest) -> bool:
    """Run ``kernel`` over ``ranges`` on numba's GNU OpenMP layer; ``False`` where the layer
    does not load or the launch fails (for good in this process: the threads take over)."""
    global _parallel, _parallel_pid
    import numba

    chosen = numba.config.THREADING_LAYER == "default"
    if chosen:
        numba.config.THREADING_LAYER = "omp"
    firsts = np.array([first for first, _ in ranges], dtype=np.int64)
    lasts = np.array([last for _, last in ranges], dtype=np.int64)
    # Starting numba's OpenMP pool sets the OpenMP thread count that torch reads (to its
    # NUMBA_NUM_THREADS, the logical CPUs): torch's own count is put back after every launch.
    torch_threads, before = torch.get_num_threads(), None
    try:
        before = numba.get_num_threads()  # (the first call starts the layer: may fail)
        numba.set_num_threads(min(len(ranges), numba.config.NUMBA_NUM_THREADS))
        kernel(*arrays, firsts, lasts, *rest)
    except Exception:  # (the layer did not load, or the build failed)
        _parallel = False
        if chosen and numba.config.THREADING_LAYER == "omp":  # leave the user's default
            numba.config.THREADING_LAYER = "default"
        return False
    finally:
        if before is not None:
            numba.set_num_threads(before)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    _parallel_pid = os.getpid()
    return True


def _ranges(bounds: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous component ranges ``[(first, last), ...]`` of about equal pair counts (at
    most ``parts``; components without pairs go with their neighbours)."""
    k, total = len(bounds) - 1, bounds[-1]
    out, first = [], 0
    for part in range(1, parts):
        target = total * part / parts
        last = first
        while last < k and bounds[last + 1] <= target:
            last += 1
        if last > first:
            out.append((first, last))
            first = last
    out.append((first, k))
    return out


def _executor(size: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``size`` threads of this process (a forked child inherits the parent's pool
    without its threads, and its jobs would never run: it makes its own). A pool of another
    size is dropped, not shut down (another thread may be submitting to it); its threads end
    when it is collected."""
    global _pool, _pool_key
    key = (size, os.getpid())
    with _lock:
        if _pool is None or _pool_key != key:
            _pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="mfa-pairs")
            _pool_key = key
        return _pool


def pair_sums(x: Tensor, rows: Tensor, counts: list[int], weights: Tensor, means: Tensor
              ) -> tuple[Tensor, Tensor] | None:
    """``(Σ r y [and Σ r y pᵀ] [K, L+1, D], Σ r y² [K, D])`` in ``means``' dtype (the work
    dtype) for pairs sorted by component; ``None`` when the kernel is not available or its
    run failed (:func:`available` is then false for the rest of the process).

    Args:
        x: the batch ``[n, D]`` (CPU, float32 or float64).
        rows: each pair's row in ``x`` ``[P]`` (int64), sorted by component.
        counts: the pairs per component (``K`` ints, summing to ``P``).
        weights: ``[P, L+1]``: ``r`` and ``r ⊙ p`` of each pair, in the work dtype.
        means: ``μ`` ``[K, D]`` in the work dtype.
    """
    kernel = _compiled()
    if kernel is None:
        return None
    k, d = means.shape
    work = means.dtype
    sums = torch.zeros((k, weights.shape[1], d), dtype=work)
    sum_y2 = torch.zeros((k, d), dtype=work)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    arrays = (x.detach().contiguous().numpy(), rows.contiguous().numpy(),
              torch.tensor(bounds, dtype=torch.int64).numpy())
    rest = (weights.detach().contiguous().numpy(), means.detach().contiguous().numpy(),
            sums.numpy(), sum_y2.numpy())
    threads = max(1, min(torch.get_num_threads(), k))
    ranges = _ranges(bounds, threads) if bounds[-1] else []
    try:
        if len(ranges) <= 1:
            for first, last in ranges:
                kernel(*arrays, first, last, *rest)
        elif (parallel := _parallel_kernel(kernel)) is None or not _launch_parallel(
                parallel, arrays, ranges, rest):  # the Python threads, from zeroed sums
            rest[2].fill(0.0)  # (a failed launch may have written part of them)
            rest[3].fill(0.0)
            pool = _executor(threads)
            jobs = [pool.submit(kernel, *arrays, first, last, *rest) for first, last in ranges]
            for job in jobs:
                job.result()
    except Exception as error:  # (numba's typing or compilation failing here)
        _disable(error)
        return None
    return sums, sum_y2
