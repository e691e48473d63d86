"""Benchmark: what the automatic noise prior's searches and the tempered step cost inside a
default EM fit (issue 12's overhead target), in minutes rather than the ~31 of
``scripts/baselines.py`` (its published run's ``total_seconds``: 1,847).

For each dataset and K: one default fit (``EMTrainer(EMConfig(seed, progress=False))``, the
validation split passed to ``fit``, the data and splits of ``scripts/baselines.py``: 10,000 /
2,000 / 5,000 Fashion-MNIST rows, the embedded digits whole), printing its wall time, the time
of its searches and tempered step (``EMTrainer.selection_seconds``), their share of the rest of
the fit (the strict reading of the target: at most 30 %), the candidates those searches scored
on the validation rows, the tempered step's choice and the held-out bits/dim.

    python benchmarks/bench_selection.py                        # the eight baselines cases
    python benchmarks/bench_selection.py --datasets embedded-mnist --components 20 100
    python benchmarks/bench_selection.py --quick                 # a smoke test (seconds)

Timings are wall-clock on a shared machine: compare only figures of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from mfa import EMConfig, EMTrainer, MixtureOfFactorAnalyzers, prior_search
from mfa.cli_types import non_negative_int
from mfa.data import load_dataset
from mfa.em import ConvergenceWarning
from mfa.metrics import bits_per_dim, mean_log_likelihood

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _provenance import commit, dataset_name, output_folder  # noqa: E402  (the commit, --out)

#: Train/validation/test rows per dataset (``None``: all), as in ``scripts/baselines.py``.
SIZES = {"fashion-mnist": (10_000, 2_000, 5_000), "embedded-mnist": (None, None, None)}


def splits_of(name: str, seed: int, quick: bool) -> dict[str, torch.Tensor]:
    """Dequantised float32 train/val/test rows of ``name`` (``scripts/baselines.py``'s
    seeded subsets)."""
    data = load_dataset(name, dequantize=True, seed=seed)
    sizes = (600, 200, 200) if quick else SIZES.get(name, (None, None, None))
    out = {}
    for i, (split, n) in enumerate(zip(("train", "val", "test"), sizes, strict=True)):
        rows = data.as_float(split)
        if n is not None and rows.shape[0] > n:
            keep = torch.randperm(rows.shape[0],
                                  generator=torch.Generator().manual_seed(seed + i))[:n]
            rows = rows[keep.sort().values]
        out[split] = rows.contiguous()
    return out


def one_fit(splits: dict[str, torch.Tensor], k: int, n_factors: int, seed: int) -> dict:
    """One default fit and its figures."""
    scored = []
    score = prior_search.score_candidates

    def counting(model, stats, candidates, *args, **kwargs):
        scored.append(len(candidates))
        return score(model, stats, candidates, *args, **kwargs)

    prior_search.score_candidates = counting  # (choose_noise_variance looks it up per call)
    try:
        torch.manual_seed(seed)
        model = MixtureOfFactorAnalyzers(k, splits["train"].shape[1], n_factors)
        trainer = EMTrainer(EMConfig(seed=seed, progress=False))
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, splits["train"], splits["val"])
        seconds = time.perf_counter() - started
    finally:
        prior_search.score_candidates = score
    selection = trainer.selection_seconds or 0.0
    step = trainer.tempered
    test = float(bits_per_dim(mean_log_likelihood(model, splits["test"], batch_size=1000),
                              splits["test"].shape[1]))
    return {
        "K": k, "fit_seconds": seconds, "selection_seconds": selection,
        "selection_share": selection / max(seconds - selection, 1e-12),
        "candidates_scored": sum(scored), "iterations": len(trainer.history),
        "tempered": None if step is None else {
            "temperature": step.temperature, "strength": step.noise_prior_strength,
            "noise_prior_variance": step.noise_prior_variance, "applied": step.applied},
        "test_bits_per_dim": test,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", type=dataset_name, default=list(SIZES))
    parser.add_argument("--components", type=int, nargs="+",
                        help="K of each fit (default 20 50 100 200; with --quick 4)")
    parser.add_argument("--factors", type=int, default=6)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="600/200/200 rows and, unless --components is given, K=4: a smoke "
                        "test of the script")
    parser.add_argument("--out", type=Path,
                        help="write the figures as JSON here (again after each fit)")
    args = parser.parse_args(argv)
    if args.components is None:  # (--quick overrode the K given)
        args.components = [4] if args.quick else [20, 50, 100, 200]
    if min(args.components) < 1:
        parser.error(f"--components must be >= 1, got {min(args.components)}")
    if args.factors < 0:
        parser.error(f"--factors must be >= 0, got {args.factors}")
    if args.out is not None:  # (a bad one was found after every fit)
        output_folder(parser, args.out)
    result = {"commit": commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": {},
              "complete": False}  # (True once every case ran)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; target: the "
          "searches' and tempered step's time <= 30 % of the rest of the fit")
    for name in args.datasets:
        try:
            splits = splits_of(name, args.seed, args.quick)
        except (FileNotFoundError, RuntimeError) as err:
            print(f"{name}: skipped ({err})")
            continue
        rows = {split: int(t.shape[0]) for split, t in splits.items()}
        print(f"{name} {rows}")
        for k in args.components:
            r = one_fit(splits, k, args.factors, args.seed)
            result["cases"][f"{name} K={k}"] = r
            step = r["tempered"]
            chose = ("none" if step is None else
                     f"T={step['temperature']:g} x{step['strength']:g} "
                     f"s0={step['noise_prior_variance']:.3g} "
                     f"{'applied' if step['applied'] else 'not applied'}")
            print(f"  K={k:<4d} fit {r['fit_seconds']:6.2f} s  selection "
                  f"{r['selection_seconds']:5.2f} s = {100 * r['selection_share']:3.0f} % of the "
                  f"rest ({'met' if r['selection_share'] <= 0.3 else 'NOT met'}), "
                  f"{r['candidates_scored']} candidates scored, {r['iterations']} iterations, "
                  f"tempered step {chose}, test {r['test_bits_per_dim']:.4f} bits/dim",
                  flush=True)
            if args.out is not None:  # (every case so far survives a later failure)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["complete"] = True
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
