"""Benchmark: EM (every E-step precision), its initialisation and Adam on MNIST-sized real
data, each figure beside its peer measured in the same run.

Figures printed (and written as JSON with --out):

* the FLOP limit: the same run's rate of ``[batch, D] @ [D, K·(L+2)]`` in float32 (best of
  5 blocks), and one EM iteration's ``4·N·D·K·(L+2)`` flops at that rate;
* per ``stats_dtype`` (``auto`` resolved, then ``float64``, ``precise``, ``centred``, ``mixed``,
  ``centred32``, ``float32``): seconds per EM iteration (E-step over every batch + M-step;
  the modes are timed round-robin, ``--iters`` rounds after a warm-up round, median per
  mode) and × the limit;
* the K-means initialisation (``EMConfig`` defaults; ``EMTrainer.init_seconds``) in seconds
  and in default iterations, and the whole ``fit(max_iter=0)`` beside it (the figure called
  initialisation on pages before 2026-12-07: it adds the validation split and one scoring
  pass);
* Adam (``SGDTrainer``): samples/s and the fraction of the matmul rate at
  ``4·D·K·(L+2)`` flops per sample (forward and the parameter-side backward);
* scikit-learn ``GaussianMixture(covariance_type="diag")`` seconds per EM iteration (same
  K, same data);
* held-out bits/dim of MFA (default precision) and of the diagonal GMM after ``--fit-iters``
  iterations.

Default data: a seeded random 50,000 of Fashion-MNIST's 60,000 training images (``--seed``;
Debian's ``dataset-fashion-mnist``),
K = 50, L = 6, batches of 10,000 (the shape of issue 11); one to two minutes on 2 idle
cores (36 s on the 2-core Xeon of docs/benchmarks.md, ~1.5 min on its 2-core EPYC).
``--synthetic N D`` times random data of another shape instead (no bits/dim then).

    python benchmarks/bench_em.py --out docs/bench_em_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from mfa import MixtureOfFactorAnalyzers, pair_kernel
from mfa._data_stream import DataSource
from mfa.cli_types import non_negative_int, positive_int
from mfa.data import bits_per_dim, load_dataset
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.m_step import m_step
from mfa.precision import resolve_stats_dtype
from mfa.sgd import SGDConfig, SGDTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _provenance import commit  # noqa: E402  (the checkout's commit, for the JSON)

MODES = ("float64", "precise", "centred", "mixed", "centred32", "float32")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(batch: int, d: int, width: int, device: torch.device, repeats: int = 10,
                blocks: int = 5) -> float:
    """GFLOP/s of ``[batch, d] @ [d, width]`` in float32 on ``device``: the best of ``blocks``
    timings of ``repeats`` products (the peer's best case, so the ratio is conservative)."""
    a = torch.randn(batch, d, device=device)
    b = torch.randn(d, width, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(blocks):
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * batch * d * width * repeats / (time.perf_counter() - start) / 1e9)
    return best


def time_mfa_iterations(model, x, batch_size, iters, device, stats_dtype="auto"):
    """Seconds of each of ``iters`` full EM iterations (E-step over all batches + M-step)."""
    source = DataSource(x, model, batch_size)
    return [_one_iteration(model, source, device, stats_dtype) for _ in range(iters)]


def _one_iteration(model, source, device, stats_dtype) -> float:
    _sync(device)
    start = time.perf_counter()
    stats = EMTrainer.e_step(model, source, stats_dtype)
    model.set_parameters(**m_step(stats, model, variance_floor=1e-5))
    _sync(device)
    return time.perf_counter() - start


def time_modes_interleaved(model, x, batch_size, rounds, device, modes) -> dict[str, list]:
    """Seconds of one EM iteration in each mode, ``rounds`` times round-robin, the first
    round a warm-up that is dropped. Within a round every mode starts from the same
    parameters and the model then moves on by ``modes[0]``'s iteration, so every mode sees
    the same models; the order rotates from round to round (the mode timed first measured
    ~5–8 % slower than the same mode later in a round)."""
    source = DataSource(x, model, batch_size)
    times: dict[str, list] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        start = {name: v.clone() for name, v in model.state_dict().items()}
        moved = None
        shift = round_ % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            model.load_state_dict(start)
            seconds = _one_iteration(model, source, device, mode)
            if round_:
                times[mode].append(seconds)
            if mode == modes[0]:
                moved = {name: v.clone() for name, v in model.state_dict().items()}
        model.load_state_dict(moved)
    return times


def time_adam(model, x, batch_size, steps, device) -> float:
    """Samples per second of ``SGDTrainer`` (one epoch of ``steps`` minibatches, after a
    warm-up epoch) from a copy of ``model``."""
    rows = x[: batch_size * steps]
    trial = MixtureOfFactorAnalyzers(model.n_components, model.n_features, model.n_factors,
                                     device=device)
    trial.load_state_dict(model.state_dict())
    cfg = SGDConfig(epochs=1, batch_size=batch_size, init="none", progress=False,
                    val_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SGDTrainer(cfg).fit(trial, rows[:batch_size * 2])  # warm-up
        _sync(device)
        start = time.perf_counter()
        SGDTrainer(cfg).fit(trial, rows)
        _sync(device)
    return rows.shape[0] / (time.perf_counter() - start)


def time_sklearn(x, k, iters, seed, threads=None) -> tuple[float, object]:
    """Seconds per EM iteration of scikit-learn's diagonal GMM on ``x`` in float32 (its BLAS
    limited to ``threads`` when given, like torch), and the fitted mixture after ``1 + iters``
    iterations."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        return _time_sklearn(GaussianMixture, x, k, iters, seed)


def _time_sklearn(GaussianMixture, x, k, iters, seed) -> tuple[float, object]:  # noqa: N803

    xn = x.numpy()  # float32, as MFA's products (scikit-learn >= 1.4 keeps float32)
    gm = GaussianMixture(k, covariance_type="diag", max_iter=1, tol=0, reg_covar=1e-5,
                         init_params="random_from_data", random_state=seed, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(xn)  # initialisation + one iteration, not timed
        gm.max_iter = iters
        start = time.perf_counter()
        gm.fit(xn)
        elapsed = time.perf_counter() - start
        # fit() ends with one more E-step (for its labels): timed apart (predict_proba is
        # that E-step) and taken out, so the figure is per EM iteration only.
        start = time.perf_counter()
        gm.predict_proba(xn)
        final_e_step = time.perf_counter() - start
    return max(elapsed - final_e_step, 0.0) / iters, gm


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--rows", type=positive_int, default=50_000, help="training rows used")
    parser.add_argument("--synthetic", nargs=2, type=positive_int, metavar=("N", "D"))
    parser.add_argument("-k", "--components", type=positive_int, default=50)
    parser.add_argument("-l", "--factors", type=non_negative_int, default=6)
    parser.add_argument("--batch-size", type=positive_int, default=10_000)
    parser.add_argument("--iters", type=positive_int, default=6,
                        help="timed EM iterations per mode (round-robin rounds)")
    parser.add_argument("--init-runs", type=positive_int, default=3,
                        help="initialisations timed (median; the first is a cold start)")
    parser.add_argument("--adam-batch", type=positive_int, nargs="+", default=[256, 1024],
                        help="Adam batch sizes (256 is SGDConfig's default)")
    parser.add_argument("--adam-steps", type=non_negative_int, default=20)
    parser.add_argument("--fit-iters", type=positive_int, default=10,
                        help="EM iterations (both models) before measuring bits/dim")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int,
                        help="torch threads (default: torch's; 1 gives steadier figures on a "
                             "shared machine)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not args.no_sklearn:
        try:  # the peer; checked before the timing, not after it
            import sklearn.mixture  # noqa: F401
            import threadpoolctl  # noqa: F401
        except ImportError as err:
            parser.error(f"the scikit-learn peer needs {err.name}: install scikit-learn "
                         "(pip install -e '.[test]') or pass --no-sklearn")
    if args.init_runs < 1:
        parser.error(f"--init-runs must be at least 1, got {args.init_runs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    k, lat = args.components, args.factors

    if args.synthetic:
        n, d = args.synthetic
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.rand(n, d, generator=gen)
        test = None
        name = f"synthetic {n}x{d}"
    else:
        data = load_dataset("fashion-mnist", args.root, val_fraction=0.0, dequantize=True,
                            seed=args.seed)
        x, test = data.train[: args.rows], data.test
        n, d = x.shape
        name = f"Fashion-MNIST {n}x{d}"
    x_dev = x.to(device)
    flops = 4 * n * d * k * (lat + 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kernel = (device.type == "cpu" and pair_kernel.worthwhile(n, d)  # (the CPU's pairs)
              and pair_kernel.available())
    print(f"data: {name}; K={k}, L={lat}; batches of {args.batch_size}; device {device}; "
          f"torch threads {torch.get_num_threads()}; load average {load:.2f} at start; "
          f"pair sums {'compiled (mfa.pair_kernel)' if kernel else 'in torch ops'}")

    peer = matmul_rate(min(args.batch_size, n), d, k * (lat + 2), device)
    limit = flops / peer / 1e9
    print(f"FLOP limit: [{min(args.batch_size, n)}, {d}] @ [{d}, {k * (lat + 2)}] at "
          f"{peer:.1f} GFLOP/s; one EM iteration = {flops / 1e9:.1f} GFLOP = {limit:.3f} s")
    result = {
        "commit": commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "data": name, "n": n, "d": d, "k": k, "l": lat, "device": str(device),
        "pair_kernel": kernel,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "load_average_start": load, "gflop_per_iter": flops / 1e9, "matmul_gflops": peer,
        "limit_seconds_per_iter": limit,
    }

    # The initialisation, timed --init-runs times from the same seed (the same model each
    # time); the median counts, as for the modes (the first run also pays the process's
    # first calls: MKL's and the allocator's warm-up).
    init_runs, fit0_runs = [], []
    for _ in range(args.init_runs):
        model = MixtureOfFactorAnalyzers(k, d, lat, device=device)
        trainer = EMTrainer(EMConfig(max_iter=0, progress=False, seed=args.seed))
        _sync(device)
        init_start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, x_dev)
        _sync(device)
        fit0_runs.append(time.perf_counter() - init_start)
        init_runs.append(trainer.init_seconds)
    init_seconds = statistics.median(init_runs)
    result["init_seconds"] = init_seconds
    result["init_seconds_runs"] = init_runs
    result["fit_max_iter_0_seconds"] = statistics.median(fit0_runs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    default_mode = resolve_stats_dtype("auto", device, model.dtype)
    print(f"{'stats_dtype':<22}{'s/iteration':>12}{'× limit':>10}")
    modes = ("auto", *MODES)
    all_times = time_modes_interleaved(model, x_dev, args.batch_size, args.iters + 1, device,
                                       modes)
    for mode in modes:
        per_iter = statistics.median(all_times[mode])
        result[f"mfa_{mode}_seconds_per_iter"] = per_iter
        result[f"mfa_{mode}_times_limit"] = per_iter / limit
        label = f"auto (= {default_mode})" if mode == "auto" else mode
        print(f"{label:<22}{per_iter:>12.3f}{per_iter / limit:>10.2f}")
    # The peer again after the modes: on a shared machine the best of both is the fair limit
    # (a ratio below 1 means the first peer was measured in a slower moment).
    peer_after = matmul_rate(min(args.batch_size, n), d, k * (lat + 2), device)
    result["matmul_gflops_after_modes"] = peer_after
    if peer_after > peer:
        print(f"matmul peer after the modes: {peer_after:.1f} GFLOP/s (was {peer:.1f}); "
              "× limit below uses the faster")
        limit = flops / peer_after / 1e9
        result["limit_seconds_per_iter"] = limit
        for mode in ("auto", *MODES):
            result[f"mfa_{mode}_times_limit"] = result[f"mfa_{mode}_seconds_per_iter"] / limit
            print(f"  {mode:<20}{result[f'mfa_{mode}_times_limit']:>10.2f}")
        peer = peer_after
    default_iter = result["mfa_auto_seconds_per_iter"]
    result["init_in_default_iterations"] = init_seconds / default_iter
    print(f"initialisation (K-means + PPCA/FA, EMConfig defaults; EMTrainer.init_seconds): "
          f"{init_seconds:.2f} s = {init_seconds / default_iter:.2f} default iterations "
          f"(median of {', '.join(f'{t:.2f}' for t in init_runs)} s)")
    fit0 = result["fit_max_iter_0_seconds"]
    result["fit_max_iter_0_in_default_iterations"] = fit0 / default_iter
    print(f"  the whole fit(max_iter=0): {fit0:.2f} s = {fit0 / default_iter:.2f} default "
          "iterations (adds the validation split and scoring the initial model on the "
          "training rows, which every fit that stops at max_iter also pays once)")
    if device.type == "cuda":
        result["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"GPU peak memory {result['gpu_peak_memory_gib']:.2f} GiB")

    if args.adam_steps > 0:
        result["adam_by_batch"] = {}
        for batch in args.adam_batch:
            rate = time_adam(model, x_dev, batch, args.adam_steps, device)
            adam_gflops = rate * 4 * d * k * (lat + 2) / 1e9
            result["adam_by_batch"][batch] = {"samples_per_s": rate,
                                              "fraction_of_matmul": adam_gflops / peer}
            # the last batch size's figures also under the keys of earlier runs
            result["adam_samples_per_s"] = rate
            result["adam_fraction_of_matmul"] = adam_gflops / peer
            print(f"Adam (batch {batch}): {rate:,.0f} samples/s = {adam_gflops:.1f} GFLOP/s = "
                  f"{adam_gflops / peer:.2f} of the matmul rate (EM default: "
                  f"{n / default_iter:,.0f} samples/s)")

    gm = None
    if not args.no_sklearn:
        # (its BLAS threads capped at torch's: an uncapped BLAS takes every core)
        sk_iter, gm = time_sklearn(x, k, args.iters + 1, args.seed, torch.get_num_threads())
        result["sklearn_diag_seconds_per_iter"] = sk_iter
        print(f"scikit-learn GaussianMixture(diag), K={k}: {sk_iter:.3f} s/iteration "
              f"({sk_iter / limit:.2f} × the MFA limit)")

    if test is not None and args.fit_iters > 0:
        done = args.iters + 1  # the model moved one iteration a round
        time_mfa_iterations(model, x_dev, args.batch_size, max(0, args.fit_iters - done),
                            device)
        mfa_ll = EMTrainer.evaluate(model, DataSource(test.to(device), model, 4096))
        result["mfa_test_bits_per_dim"] = float(bits_per_dim(mfa_ll, d))
        mfa_iters = max(args.fit_iters, done)
        print(f"MFA held-out bits/dim after {mfa_iters} EM "
              f"iterations: {result['mfa_test_bits_per_dim']:.3f}")
        if gm is not None:
            from threadpoolctl import threadpool_limits

            sk_iters = 1 + (args.iters + 1)  # the untimed and the timed fit
            extra = mfa_iters - sk_iters  # as many iterations as MFA where it has had fewer
            if extra > 0:
                with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
                    warnings.simplefilter("ignore")
                    gm.max_iter = extra
                    gm.fit(x.numpy())  # (float32, as it was timed)
                sk_iters += extra
            sk_ll = float(gm.score(test.double().numpy()))
            result["sklearn_diag_test_bits_per_dim"] = float(bits_per_dim(sk_ll, d))
            result["sklearn_diag_test_iterations"] = sk_iters
            print(f"scikit-learn diag held-out bits/dim after {sk_iters} iterations: "
                  f"{result['sklearn_diag_test_bits_per_dim']:.3f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result["load_average_end"] = load
    print(f"load average {load:.2f} at the end")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    assert all(math.isfinite(v) for k_, v in result.items()
               if isinstance(v, float) and not k_.startswith("load_average"))
    return result


if __name__ == "__main__":
    main()
