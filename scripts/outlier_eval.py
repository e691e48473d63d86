"""Outlier detection by every score of :mod:`mfa.outliers`, in both directions available offline.

For each direction an MFA is fitted by EM to the in-distribution train split; then every
score ranks (a) the in-distribution *val* rows against the other set's *val* rows and (b) the
in-distribution *test* rows against the other set's *test* rows. The default score is chosen
on (a) only — the score with the best AUROC in its worse direction — and (b) is reported for
it as for the others. Val and test rows are disjoint in both datasets.

    python scripts/outlier_eval.py --out docs/results/outliers.md

Fashion-MNIST comes from ``--fashion-root`` (Debian's ``/usr/share/datasets/fashion-mnist``);
the digits are the 5,000 MNIST digits shipped with the package (``embedded-mnist``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import time
import warnings
from pathlib import Path

import torch
from _provenance import commit, output_folder, write_report  # (scripts/, on sys.path)

from mfa import ConvergenceWarning, EMConfig, EMTrainer, MixtureOfFactorAnalyzers, bits_per_dim
from mfa.data import ImageData, load_dataset
from mfa.outliers import DEFAULT_SCORE, SCORE_NAMES, OutlierScorer, evaluate_outliers


def subsample(rows: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of at most ``n`` rows (all of them for ``n=None``)."""
    if n is None or rows.shape[0] <= n:
        return rows
    keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return rows[keep.sort().values]


def em_config(args: argparse.Namespace) -> EMConfig:
    """The EM of both directions: ``EMConfig``'s defaults but an iteration budget, the seed,
    no progress bar and the mixed-precision E-step (the page names each changed field)."""
    return EMConfig(max_iter=args.max_iter, seed=args.seed, progress=False,
                    stats_dtype="mixed")


def changed_fields(config: EMConfig) -> str:
    """``config``'s fields that differ from ``EMConfig()``'s, as ``name=value`` in code spans
    joined for a sentence."""
    default = EMConfig()
    words = [f"`{f.name}={getattr(config, f.name)!r}`" for f in dataclasses.fields(EMConfig)
             if getattr(config, f.name) != getattr(default, f.name)]
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def run_direction(name_in: str, data_in: ImageData, name_out: str, data_out: ImageData,
                  args: argparse.Namespace) -> list[dict]:
    train = subsample(data_in.train, args.train_limit, args.seed)
    splits = {s: (subsample(data_in.as_float(s), args.eval_limit, args.seed + 1),
                  subsample(data_out.as_float(s), args.eval_limit, args.seed + 2))
              for s in ("val", "test")}
    t0 = time.perf_counter()
    model = MixtureOfFactorAnalyzers(args.n_components, train.shape[1], args.n_factors,
                                     generator=torch.Generator().manual_seed(args.seed))
    with warnings.catch_warnings():  # an iteration budget, stated in the table
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(em_config(args)).fit(model, train)
    fit_s = time.perf_counter() - t0
    with torch.no_grad():
        test_lp = model.log_prob(splits["test"][0]).double()
        test_bpd = float(bits_per_dim(test_lp.mean(), train.shape[1]))
        # (a few rows with pixels no training image has on can dominate the mean)
        median_bpd = float(bits_per_dim(test_lp.median(), train.shape[1]))
        # and the log-likelihood (nats) of the median row and of the 1 % scoring lowest
        median_nats, low_nats = float(test_lp.median()), float(test_lp.quantile(0.01))
    logging.info("%s: EM on %d rows in %.0f s, test %.3f bits/dim", name_in, train.shape[0],
                 fit_s, test_bpd)
    rows = []
    for score in SCORE_NAMES:
        t0 = time.perf_counter()
        scorer = OutlierScorer.fit(model, train, score, image_shape=data_in.image_shape,
                                   seed=args.seed, patch_size=args.patch_size)
        res = {s: evaluate_outliers(scorer(x_in), scorer(x_out))
               for s, (x_in, x_out) in splits.items()}
        rows.append(dict(direction=f"{name_in} model: {name_in} vs {name_out}", score=score,
                         val=res["val"], test=res["test"], seconds=time.perf_counter() - t0,
                         test_bpd=test_bpd, median_bpd=median_bpd, median_nats=median_nats,
                         low_nats=low_nats, n_train=train.shape[0], fit_s=fit_s))
        logging.info("  %-16s val AUROC %.3f  test AUROC %.3f", score, res["val"]["auroc"],
                     res["test"]["auroc"])
    return rows


def choose_default(rows: list[dict]) -> str:
    """The score whose worse validation AUROC over the directions is the highest (ties: the
    higher worse validation AUPR, then the order of ``SCORE_NAMES``)."""
    def worst(score: str) -> tuple[float, float]:
        mine = [r["val"] for r in rows if r["score"] == score]
        return min(v["auroc"] for v in mine), min(v["aupr"] for v in mine)
    return max(SCORE_NAMES, key=worst)


def command_line(args: argparse.Namespace) -> str:
    """The options that reproduce this run, quoted for a POSIX shell (all the train rows,
    ``train_limit=None``, as ``--train-limit 0``: left out it would mean 20,000)."""
    opts = ["n_components", "n_factors", "max_iter", "train_limit", "eval_limit", "patch_size",
            "seed"]
    values = {o: getattr(args, o) for o in opts}
    if values["train_limit"] is None:
        values["train_limit"] = 0
    return shlex.join([w for o, v in values.items() if v is not None
                       for w in (f"--{o.replace('_', '-')}", str(v))])


def table(rows: list[dict], default: str, args: argparse.Namespace, seconds: float,
          made_at: str) -> str:
    lines = [
        "# Outlier detection: AUROC and AUPR of every score",
        "",
        f"Generated by `python scripts/outlier_eval.py {command_line(args)}` at commit "
        f"`{made_at}` ({seconds:.0f} s on {torch.get_num_threads()} CPU threads).",
        "",
        "MFA fitted to dequantised pixels by MAP EM with `EMConfig`'s defaults but "
        f"{changed_fields(em_config(args))} (at most {args.max_iter} "
        "iterations a run; the noise prior chosen, and early stopping judged, "
        "on a seeded 10 % of the training rows held out; the re-seeding rounds and the "
        "tempered step run too); outliers are the positive class; higher score "
        "= more outlying. *val*: in-distribution val rows vs the other set's val rows; *test*: "
        "test rows vs test rows (disjoint from val). The default score is chosen on *val* "
        "only: the best worse-direction AUROC (ties: worse-direction AUPR).",
        "",
        "| model: in vs out | score | val AUROC | val AUPR | test AUROC | test AUPR | "
        "n test (in/out) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (default)" if r["score"] == default else ""
        lines.append(
            f"| {r['direction']} | `{r['score']}`{mark} | {r['val']['auroc']:.3f} | "
            f"{r['val']['aupr']:.3f} | {r['test']['auroc']:.3f} | {r['test']['aupr']:.3f} | "
            f"{r['test']['n_in']}/{r['test']['n_out']} |"
        )
    lines += ["", "Models:", ""]
    seen = set()
    for r in rows:
        name = r["direction"].split(" model")[0]
        if name not in seen:
            seen.add(name)
            lines.append(f"- {name}: K={args.n_components}, L={args.n_factors}, EM given "
                         f"{r['n_train']} train rows (10 % of them held out for "
                         f"validation) in {r['fit_s']:.0f} s, test "
                         f"{r['test_bpd']:.3f} bits/dim (mean over rows; the median "
                         f"row's {r['median_bpd']:.3f}; 1 % of the test rows score below "
                         f"{r['low_nats']:,.0f} nats, the median row "
                         f"{r['median_nats']:,.0f}).")
    lines += ["", f"Default score chosen on validation: `{default}` "
              f"(`mfa.outliers.DEFAULT_SCORE` is `{DEFAULT_SCORE}`"
              f"{'' if default == DEFAULT_SCORE else ': update it'}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--n-components", type=int, default=50)
    p.add_argument("--n-factors", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=20, help="EM iterations")
    p.add_argument("--train-limit", type=int, default=20_000,
                   help="train rows per model, a seeded subset (0: all)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="rows per val/test split and dataset (default: all)")
    p.add_argument("--patch-size", type=int, default=4, help="of the likelihood-ratio background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write the table "
                   "to (its figures go beside it, to the same name with .json)")
    args = p.parse_args(argv)
    if args.out is not None:  # (a bad --out was found after the fits, when writing)
        output_folder(p, args.out)
    args.train_limit = args.train_limit or None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    made_at = commit()  # (the page and its JSON twin name the same one)
    fashion = load_dataset("fashion-mnist", root=args.fashion_root, dequantize=True,
                           seed=args.seed)
    digits = load_dataset("embedded-mnist", dequantize=True, seed=args.seed)
    rows = run_direction("fashion-mnist", fashion, "digits", digits, args)
    rows += run_direction("digits", digits, "fashion-mnist", fashion, args)
    default = choose_default(rows)
    text = table(rows, default, args, time.perf_counter() - start, made_at)
    print(text)
    if args.out is not None:  # (and its JSON twin)
        write_report(args.out, text, rows, time.perf_counter() - start, __file__, argv,
                     made_at)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
