"""Benchmark: one EM iteration of MFA on MNIST-sized real data, against peers measured in
the same run.

Figures printed (and written as JSON with --out):

* MFA EM seconds per iteration (median over the timed iterations, after one warm-up), the
  achieved GFLOP/s at ``4·N·D·K·(L+2)`` flops per iteration, and the ratio to a plain
  ``torch.matmul`` of the same inner shape ``[batch, D] @ [D, K·(L+2)]`` timed here;
* scikit-learn ``GaussianMixture(covariance_type="diag")`` seconds per EM iteration on the same
  data (same K);
* held-out bits/dim of both after ``--fit-iters`` iterations (uniformly dequantised data).

Default data: Fashion-MNIST (60,000 × 784) from Debian's ``dataset-fashion-mnist`` package.
``--synthetic N D`` times random data of another shape instead (e.g. CelebA's
162,770 × 12,288 on a GPU; no bits/dim then). ``--device cuda`` runs MFA on a GPU.

    python benchmarks/bench_em.py --out docs/bench_em_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import torch

from mfa import MixtureOfFactorAnalyzers
from mfa._data_stream import DataSource
from mfa.data import bits_per_dim, load_dataset
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.statistics import m_step


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


def time_mfa_iterations(model, x, batch_size, iters, device, stats_dtype="float64"):
    """Seconds of each of ``iters`` full EM iterations (E-step over all batches + M-step)."""
    source = DataSource(x, model, batch_size)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        stats = EMTrainer.e_step(model, source, stats_dtype)
        model.set_parameters(**m_step(stats, model, variance_floor=1e-5))
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_sklearn(x, k, iters, seed) -> tuple[float, object]:
    from sklearn.mixture import GaussianMixture

    xn = x.double().numpy()
    gm = GaussianMixture(k, covariance_type="diag", max_iter=1, tol=0, reg_covar=1e-5,
                         init_params="random_from_data", random_state=seed, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(xn)  # initialisation + one iteration, not timed
        gm.max_iter = iters
        start = time.perf_counter()
        gm.fit(xn)
        elapsed = time.perf_counter() - start
    return elapsed / iters, gm


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--synthetic", nargs=2, type=int, metavar=("N", "D"))
    parser.add_argument("-k", "--components", type=int, default=50)
    parser.add_argument("-l", "--factors", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=5, help="timed EM iterations")
    parser.add_argument("--fit-iters", type=int, default=20,
                        help="EM iterations (both models) before measuring bits/dim")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
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
        x, test = data.train, data.test
        n, d = x.shape
        name = f"Fashion-MNIST {n}x{d}"
    x_dev = x.to(device)
    flops = 4 * n * d * k * (lat + 2)
    print(f"data: {name}; K={k}, L={lat}; device {device}; torch threads "
          f"{torch.get_num_threads()}")

    peer = matmul_rate(min(args.batch_size, n), d, k * (lat + 2), device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    model = MixtureOfFactorAnalyzers(k, d, lat, device=device)
    init_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=0, init="kmeans", kmeans_iter=10, progress=False,
                           seed=args.seed, init_samples=20_000)).fit(model, x_dev)
    _sync(device)
    init_seconds = time.perf_counter() - init_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    del gen
    result = {
        "data": name, "n": n, "d": d, "k": k, "l": lat, "device": str(device),
        "threads": torch.get_num_threads(), "init_seconds": init_seconds,
        "gflop_per_iter": flops / 1e9, "matmul_gflops": peer,
    }
    print(f"{flops / 1e9:.1f} GFLOP per EM iteration; plain matmul {peer:.1f} GFLOP/s; "
          f"init {init_seconds:.1f} s")
    for mode in ("float64", "mixed", "float32"):
        times = time_mfa_iterations(model, x_dev, args.batch_size, args.iters + 1, device,
                                    mode)[1:]
        per_iter = statistics.median(times)
        rate = flops / per_iter / 1e9
        result[f"mfa_{mode}_seconds_per_iter"] = per_iter
        result[f"mfa_{mode}_gflops"] = rate
        result[f"mfa_{mode}_ratio_to_matmul"] = rate / peer
        print(f"MFA EM (stats_dtype={mode}): {per_iter:.3f} s/iteration, {rate:.1f} GFLOP/s, "
              f"{rate / peer:.2f} of the matmul rate")
    per_iter = result["mfa_float64_seconds_per_iter"]
    if device.type == "cuda":
        result["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"GPU peak memory {result['gpu_peak_memory_gib']:.2f} GiB")

    if not args.no_sklearn:
        sk_iter, gm = time_sklearn(x, k, args.iters, args.seed)
        result["sklearn_diag_seconds_per_iter"] = sk_iter
        result["mfa_over_sklearn_time"] = per_iter / sk_iter
        print(f"scikit-learn GaussianMixture(diag): {sk_iter:.3f} s/iteration "
              f"(MFA float64 / sklearn time ratio {per_iter / sk_iter:.2f})")

    if test is not None and args.fit_iters > 0:
        remaining = max(0, args.fit_iters - 3 * (args.iters + 1))
        time_mfa_iterations(model, x_dev, args.batch_size, remaining, device)
        with torch.no_grad():
            mfa_ll = EMTrainer.evaluate(model, DataSource(test.to(device), model, 4096))
        result["mfa_test_bits_per_dim"] = float(bits_per_dim(mfa_ll, d))
        print(f"MFA held-out bits/dim after {args.fit_iters} EM iterations: "
              f"{result['mfa_test_bits_per_dim']:.3f}")
        if not args.no_sklearn:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm.max_iter = max(1, args.fit_iters - args.iters - 1)  # sklearn ran iters+1
                gm.fit(x.double().numpy())
            sk_ll = float(gm.score(test.double().numpy()))
            result["sklearn_diag_test_bits_per_dim"] = float(bits_per_dim(sk_ll, d))
            print(f"scikit-learn diag held-out bits/dim after {args.fit_iters} iterations: "
                  f"{result['sklearn_diag_test_bits_per_dim']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    assert all(math.isfinite(v) for v in result.values() if isinstance(v, float))
    return result


if __name__ == "__main__":
    main()
