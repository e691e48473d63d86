"""mfa.pair_kernel: the compiled CPU kernel of the owner pairs' sums against the torch ops it
replaces, independent of the thread count and of how its ranges are run (numba's GNU
OpenMP layer or Python threads), and safe in a forked process."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from helpers import F64

from mfa import owner_sums as owner_sums_module
from mfa import pair_kernel


def _pairs(n_rows=50, k=6, d=37, n_w=4, seed=0, x_dtype=torch.float32, work=F64):
    """Pairs sorted by component with uneven counts: 0 (components 1 and 4), 1, 3 (below
    the kernel's block of four), 4 and more, rows repeated and out of order; means far from
    the rows (50), where float32 spreads would cancel."""
    g = torch.Generator().manual_seed(seed)
    x = (50.0 + torch.rand(n_rows, d, generator=g, dtype=F64)).to(x_dtype)
    counts = [5, 0, 1, 3, 0, 17][:k] + [4] * max(0, k - 6)
    rows = torch.randint(0, n_rows, (sum(counts),), generator=g)
    weights = torch.rand(sum(counts), n_w, generator=g, dtype=F64).to(work)
    means = (50.0 + torch.rand(k, d, generator=g, dtype=F64)).to(work)
    return x, rows, counts, weights, means


def _reference(x, rows, counts, weights, means):
    """The sums pair by pair in float64."""
    k, d = means.shape
    comp = torch.repeat_interleave(torch.arange(k), torch.tensor(counts))
    y = x.double()[rows] - means.double()[comp]  # [P, D]
    w = weights.double()
    sums = torch.zeros(k, w.shape[1], d, dtype=F64).index_add_(
        0, comp, w.unsqueeze(-1) * y.unsqueeze(1))
    sum_y2 = torch.zeros(k, d, dtype=F64).index_add_(0, comp, w[:, :1] * y * y)
    return sums, sum_y2


@pytest.mark.parametrize("x_dtype", [torch.float32, F64])
def test_kernel_equals_the_sums_pair_by_pair(x_dtype):
    x, rows, counts, weights, means = _pairs(x_dtype=x_dtype)
    sums, sum_y2 = pair_kernel.pair_sums(x, rows, counts, weights, means)
    want, want2 = _reference(x, rows, counts, weights, means)
    assert sums.dtype == F64 and sum_y2.dtype == F64
    torch.testing.assert_close(sums, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sum_y2, want2, rtol=1e-13, atol=1e-13)
    assert float(sums[1].abs().sum() + sums[4].abs().sum()) == 0.0  # no pairs: zeros


def test_kernel_in_float32_work_keeps_float32_spreads():
    """``"centred32"``: the spread and its sums in float32, within float32's rounding of
    the float64 sums (the spreads are small beside the means, as about each component's
    own mean)."""
    x, rows, counts, weights, means = _pairs(work=torch.float32)
    sums, sum_y2 = pair_kernel.pair_sums(x, rows, counts, weights, means)
    want, want2 = _reference(x, rows, counts, weights, means)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_y2.double(), want2, rtol=1e-5, atol=1e-5)


def test_result_does_not_depend_on_the_thread_count():
    """Each component's sums come from one thread in pair order: bit for bit the same on
    1, 2 and 5 threads (5 > the components with pairs)."""
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            results.append(pair_kernel.pair_sums(x, rows, counts, weights, means))
    finally:
        torch.set_num_threads(before)
    for sums, sum_y2 in results[1:]:
        assert torch.equal(sums, results[0][0]) and torch.equal(sum_y2, results[0][1])


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_ranges_cover_every_component_once_in_order(parts):
    bounds = [0, 5, 5, 6, 9, 9, 26, 30, 30]  # 8 components, some without pairs
    ranges = pair_kernel._ranges(bounds, parts)
    assert len(ranges) <= parts
    assert ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(first < last for first, last in ranges)


def test_owner_sums_take_the_kernel_unless_disabled(monkeypatch):
    """``MFA_NUMBA=0`` turns the kernel off (the torch loop runs); by default it runs."""
    calls = []
    original = pair_kernel.pair_sums
    monkeypatch.setattr(pair_kernel, "pair_sums", lambda *a: calls.append(1) or original(*a))
    from helpers import random_data, random_model

    model = random_model(3, 8, 2, "diagonal", seed=1).float()
    x = random_data(40, model, seed=2).float()
    terms = model.component_terms()
    comp = torch.arange(40) % 3
    pairs = [(comp, torch.arange(40), torch.rand(40), torch.randn(2, 40))]
    monkeypatch.setenv("MFA_NUMBA", "1")
    with_kernel = owner_sums_module.owner_sums(x, terms, pairs, F64)
    assert calls == [1]
    monkeypatch.setenv("MFA_NUMBA", "0")
    without = owner_sums_module.owner_sums(x, terms, pairs, F64)
    assert calls == [1]
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="os.fork is POSIX (and unsafe with threads on macOS)")
def test_a_forked_process_makes_its_own_threads():
    """A child forked after the pool exists inherits it without its threads: with the
    parent's pool its jobs would wait for ever. The child sums and exits within 60 s."""
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = pair_kernel.pair_sums(x, rows, counts, weights, means)  # the pool exists now
        pid = os.fork()
        if pid == 0:  # the child: exit 0 on equal sums, 1 otherwise, never raise
            try:
                got = pair_kernel.pair_sums(x, rows, counts, weights, means)
                os._exit(0 if torch.equal(got[0], want[0]) else 1)
            except BaseException:
                os._exit(2)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's pair sums never finished")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(before)


def test_kernel_without_factors_has_one_weight_column():
    """L = 0 (a diagonal mixture): the weights are r alone."""
    x, rows, counts, weights, means = _pairs(n_w=1, seed=3)
    sums, sum_y2 = pair_kernel.pair_sums(x, rows, counts, weights, means)
    want, want2 = _reference(x, rows, counts, weights, means)
    assert sums.shape == (len(counts), 1, x.shape[1])
    torch.testing.assert_close(sums, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sum_y2, want2, rtol=1e-13, atol=1e-13)


def test_a_kernel_that_cannot_cache_is_built_without_the_cache(monkeypatch):
    """numba refuses ``cache=True`` where no cache folder is writable (a read-only install
    with an unwritable home): the kernel is built uncached instead of failing every E-step."""
    built = []
    real = pair_kernel._build

    def build(cache):
        built.append(cache)
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(cache)

    monkeypatch.setattr(pair_kernel, "_build", build)
    monkeypatch.setattr(pair_kernel, "_kernel", None)
    monkeypatch.setattr(pair_kernel, "_failed", False)
    monkeypatch.delenv("MFA_NUMBA", raising=False)
    assert pair_kernel.available() and built == [True, False]
    x, rows, counts, weights, means = _pairs()
    sums, _ = pair_kernel.pair_sums(x, rows, counts, weights, means)
    torch.testing.assert_close(sums, _reference(x, rows, counts, weights, means)[0],
                               rtol=1e-13, atol=1e-13)


def test_a_failing_kernel_is_turned_off_and_the_torch_ops_take_over(monkeypatch):
    """A run of the kernel that raises (numba failing to compile it for these types) warns
    once, and the E-step's sums come from the torch ops, correct, from then on."""
    from helpers import random_data, random_model

    def broken(*args):
        raise TypeError("no matching definition for argument type(s)")

    monkeypatch.setattr(pair_kernel, "_kernel", broken)
    monkeypatch.setattr(pair_kernel, "_failed", False)
    monkeypatch.setattr(pair_kernel, "_parallel", None)  # (its failure is this test's)
    monkeypatch.delenv("MFA_NUMBA", raising=False)
    model = random_model(3, 8, 2, "diagonal", seed=1).float()
    x = random_data(40, model, seed=2).float()
    terms = model.component_terms()
    pairs = [(torch.arange(40) % 3, torch.arange(40), torch.rand(40), torch.randn(2, 40))]
    with pytest.warns(RuntimeWarning, match="compiled pair sums failed .*TypeError"):
        got = owner_sums_module.owner_sums(x, terms, pairs, F64)
    assert not pair_kernel.available()
    monkeypatch.setenv("MFA_NUMBA", "0")
    want = owner_sums_module.owner_sums(x, terms, pairs, F64)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_e_step_takes_the_kernel_only_on_data_large_enough_to_repay_it(monkeypatch):
    """The kernel's one-time cost (~0.55 s a process) made the default `mfa train` on 4,000
    digits 5.0 s instead of 4.1: passes over fewer than MIN_PASS_VALUES values take the
    torch ops, larger ones (and streams of unknown size) the kernel, to the same sums."""
    from helpers import random_data, random_model

    from mfa.e_step import streamed_e_step

    calls = []
    original = pair_kernel.pair_sums
    monkeypatch.setattr(pair_kernel, "pair_sums", lambda *a: calls.append(1) or original(*a))
    monkeypatch.delenv("MFA_NUMBA", raising=False)
    model = random_model(3, 8, 2, "diagonal", seed=4).float()
    x = random_data(200, model, seed=5).float()
    small = streamed_e_step(model, x, "centred")
    assert calls == [] and x.numel() < pair_kernel.MIN_PASS_VALUES
    monkeypatch.setattr(pair_kernel, "MIN_PASS_VALUES", x.numel())
    large = streamed_e_step(model, x, "centred")
    assert calls  # the kernel summed the pairs
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "log_likelihood"):
        torch.testing.assert_close(getattr(large, name), getattr(small, name), rtol=1e-12,
                                   atol=1e-12)
    assert pair_kernel.worthwhile(None, 8) and not pair_kernel.worthwhile(10, 8)
    with pair_kernel.preferred(False):
        assert not pair_kernel.available()
    assert pair_kernel.available()


def _omp_layer_loads() -> bool:
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    return True


needs_omp = pytest.mark.skipif(not _omp_layer_loads(),
                               reason="numba's GNU OpenMP threading layer does not load here")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _spy_launches(monkeypatch) -> list:
    launches = []
    real = pair_kernel._launch_parallel
    monkeypatch.setattr(pair_kernel, "_launch_parallel",
                        lambda *a: launches.append(real(*a)) or launches[-1])
    return launches


@needs_omp
def test_several_threads_run_the_ranges_on_numbas_openmp_layer(monkeypatch, two_threads):
    """With two threads the ranges run in one OpenMP launch (10 → 7 ms a batch inside an
    E-step, where Python threads gained nothing), to the same bits as the Python threads."""
    import numba

    monkeypatch.setattr(pair_kernel, "_parallel", None)
    launches = _spy_launches(monkeypatch)
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    got = pair_kernel.pair_sums(x, rows, counts, weights, means)
    assert launches == [True] and numba.threading_layer() == "omp"
    assert pair_kernel._parallel_pid == os.getpid()
    monkeypatch.setattr(pair_kernel, "_parallel", False)  # the Python threads
    threaded = pair_kernel.pair_sums(x, rows, counts, weights, means)
    assert launches == [True]
    assert torch.equal(got[0], threaded[0]) and torch.equal(got[1], threaded[1])
    want = _reference(x, rows, counts, weights, means)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=1e-13, atol=1e-13)


@needs_omp
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="os.fork is POSIX (and unsafe with threads on macOS)")
def test_a_process_forked_after_an_openmp_launch_sums_on_python_threads(monkeypatch,
                                                                       two_threads):
    """GNU OpenMP is not fork-safe: numba ends a forked child that launches it after its
    parent did (SIGTERM). Such a child takes the Python threads, to the same sums."""
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    monkeypatch.setattr(pair_kernel, "_parallel", None)
    want = pair_kernel.pair_sums(x, rows, counts, weights, means)
    assert pair_kernel._parallel_pid == os.getpid()  # the parent launched it
    pid = os.fork()
    if pid == 0:  # the child: exit 0 on equal sums, 1 otherwise, never raise
        try:
            got = pair_kernel.pair_sums(x, rows, counts, weights, means)
            os._exit(0 if torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                     else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's pair sums never finished")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize("launched, chosen, pid", [
    ("workqueue", "default", None),  # another layer launched first (by other code)
    ("omp", "default", -1),  # launched by other code, or in the parent before a fork
    (None, "tbb", None),  # none launched yet, the user chose another
])
def test_the_openmp_launch_is_left_alone_where_another_layer_is_chosen(
        monkeypatch, two_threads, launched, chosen, pid):
    import numba

    def layer():
        if launched is None:
            raise ValueError("no threading layer launched")
        return launched

    monkeypatch.setattr(numba, "threading_layer", layer)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", chosen)
    monkeypatch.setattr(pair_kernel, "_parallel", None)
    monkeypatch.setattr(pair_kernel, "_parallel_pid", pid)
    launches = _spy_launches(monkeypatch)
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    got = pair_kernel.pair_sums(x, rows, counts, weights, means)
    assert launches == [] and numba.config.THREADING_LAYER == chosen
    torch.testing.assert_close(got[0], _reference(x, rows, counts, weights, means)[0],
                               rtol=1e-13, atol=1e-13)


def test_a_failing_openmp_launch_leaves_the_sums_to_python_threads(monkeypatch, two_threads):
    """A layer that does not load (or a launch that fails) turns the launch off for the
    process, restores the user's ``"default"`` layer choice and the threads give the sums,
    without a warning (the kernel itself still runs)."""
    import warnings

    import numba

    def fails(*args):
        args[-2].fill(1.0)  # (a launch that wrote before failing)
        raise ValueError("No threading layer could be loaded.")

    def not_launched():
        raise ValueError("no threading layer launched")

    monkeypatch.setattr(numba, "threading_layer", not_launched)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "default")
    monkeypatch.setattr(pair_kernel, "_parallel", (pair_kernel._compiled(), fails))
    monkeypatch.setattr(pair_kernel, "_parallel_pid", None)
    x, rows, counts, weights, means = _pairs(k=9, n_rows=200, d=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pair_kernel.pair_sums(x, rows, counts, weights, means)
    assert pair_kernel._parallel is False and pair_kernel.available()
    assert numba.config.THREADING_LAYER == "default"
    want = _reference(x, rows, counts, weights, means)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=1e-13, atol=1e-13)


_CHILD = """
import json, sys, warnings
import importlib.abc
if {block}:  # numba's OpenMP layer does not load (as on a machine without libgomp)
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "numba.np.ufunc.omppool":
                raise ImportError("blocked: no libgomp")
    sys.meta_path.insert(0, Block())
import numba, numpy as np, torch
from mfa import pair_kernel
torch.set_num_threads({threads})
if {force}:  # (as if numba's default were OpenMP: the launch itself fails)
    pair_kernel._default_is_omp = True
g = torch.Generator().manual_seed(0)
x = torch.rand(200, 64, generator=g)
counts = [5, 0, 1, 3, 0, 17, 4, 4, 4]
rows = torch.randint(0, 200, (sum(counts),), generator=g)
weights = torch.rand(sum(counts), 4, generator=g, dtype=torch.float64)
means = torch.rand(9, 64, generator=g, dtype=torch.float64)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    sums, sum_y2 = pair_kernel.pair_sums(x, rows, counts, weights, means)
comp = torch.repeat_interleave(torch.arange(9), torch.tensor(counts))
y = x.double()[rows] - means[comp]
want = torch.zeros(9, 4, 64, dtype=torch.float64).index_add_(
    0, comp, weights.unsqueeze(-1) * y.unsqueeze(1))

@numba.njit(parallel=True)
def user(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

print(json.dumps({{"torch_threads": torch.get_num_threads(),
                  "launched": pair_kernel._parallel_pid is not None,
                  "close": bool(torch.allclose(sums, want, rtol=1e-13, atol=1e-13)),
                  "available": pair_kernel.available(),
                  "config": numba.config.THREADING_LAYER,
                  "user": user(np.arange(1000.0)), "layer": numba.threading_layer()}}))
"""


def _child(threads: int, numba_threads: int, block: bool = False, force: bool = False):
    import json
    import subprocess

    env = {**os.environ, "NUMBA_NUM_THREADS": str(numba_threads)}
    env.pop("NUMBA_THREADING_LAYER", None)
    env.pop("MFA_NUMBA", None)
    code = _CHILD.format(block=block, force=force, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_omp
@pytest.mark.parametrize("threads, numba_threads", [(2, 1), (3, 2)])
def test_the_openmp_launch_keeps_torchs_thread_count(threads, numba_threads):
    """Starting numba's OpenMP pool set torch's thread count to NUMBA_NUM_THREADS (a user's
    torch.set_num_threads(8) on 64 cores became 64 after the first E-step): it is put back."""
    got = _child(threads, numba_threads)
    assert got["launched"] and got["layer"] == "omp" and got["close"]
    assert got["torch_threads"] == threads


@pytest.mark.parametrize("force", [False, True])
def test_without_numbas_openmp_layer_the_threads_sum_and_user_code_keeps_its_default(force):
    """Where the OpenMP layer does not load, numba's default is another layer: mfa launches
    nothing (``force``: it tries, as if the default were OpenMP, and the launch fails). Either
    way the sums come from the Python threads without a warning, the kernel stays on, and
    the user's own parallel code still runs on numba's default layer (``workqueue`` here)."""
    got = _child(2, 2, block=True, force=force)
    assert not got["launched"] and got["close"] and got["available"]
    assert got["config"] == "default" and got["user"] == 499500.0
    assert got["layer"] == "workqueue"


@pytest.mark.parametrize("priority, want", [
    (["omp", "tbb", "workqueue"], True),
    (["workqueue", "omp", "tbb"], False),
    (["no-such-layer", "omp"], True),
])
def test_mfa_claims_numbas_default_only_where_it_would_be_openmp(monkeypatch, priority,
                                                                 want):
    import numba

    if want and not _omp_layer_loads():
        pytest.skip("numba's GNU OpenMP threading layer does not load here")
    monkeypatch.setattr(numba.config, "THREADING_LAYER_PRIORITY", priority)
    monkeypatch.setattr(pair_kernel, "_default_is_omp", None)
    assert pair_kernel._numbas_default_is_omp() is want
