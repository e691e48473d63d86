"""Regenerate docs/results.md: MFA (EM), MFA (Adam), a diagonal GMM and a KDE compared on
real images — held-out bits/dim, NDB/K against held-out real images, training time — with
sample, inpainting and outlier grids.

    python scripts/results.py                       # embedded MNIST + Fashion-MNIST
    python scripts/results.py --datasets embedded-mnist --quick --out /tmp/results  # smoke test

Every model is fitted with the library's defaults: ``EMTrainer(EMConfig(seed, progress=False))``
(MAP EM, the noise prior's variance chosen on the validation split inside ``fit``, early
stopping) and ``SGDTrainer(SGDConfig(seed, progress=False, epochs))``, the validation split
passed to ``fit``. Every figure and number in docs/results.md comes from this script (see its
JSON twin, docs/results/results.json). Timings are wall-clock on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from _provenance import commit, output_folder  # (scripts/, on sys.path when run as a script)

from mfa import (
    EMConfig,
    EMTrainer,
    MixtureOfFactorAnalyzers,
    SGDConfig,
    SGDTrainer,
    bits_per_dim,
    mean_log_likelihood,
    select_kde_bandwidth,
    viz,
)
from mfa.cli_types import non_negative_int
from mfa.data import load_dataset
from mfa.em import ConvergenceWarning
from mfa.inference import inpaint
from mfa.kde import kde
from mfa.masks import make_mask
from mfa.ndb import NDB

ROOT = Path(__file__).resolve().parent.parent

# The "More results" list at the top of docs/results.md, one Markdown bullet per entry (links
# relative to docs/). Edit it here: write_markdown rewrites the whole file.
MORE_RESULTS = (
    "[docs/results/baselines.md](results/baselines.md): default MFA (EM and Adam) against "
    "default and tuned scikit-learn diagonal GMMs and hand-tuned MFA, K ∈ {20, 50, 100, 200}, "
    "on 10,000 Fashion-MNIST training rows and the embedded digits, with the issue-12 targets "
    "(`scripts/baselines.py`; full-covariance GMMs where a fit's first iterations fit its "
    "time budget, capped there).",
    "[docs/results/embedded-mnist-splits.md](results/embedded-mnist-splits.md): the same "
    "targets on the embedded digits over three seeds (train/val/test splits), each seed's "
    "value and the mean (`scripts/split_summary.py`).",
    "[docs/results/outliers.md](results/outliers.md): outlier detection, AUROC and AUPR of "
    "every score (`scripts/outlier_eval.py`).",
    "[docs/results/missing.md](results/missing.md): training on incomplete Fashion-MNIST "
    "images against complete-case and imputation workarounds (`scripts/missing_eval.py`).",
    "[docs/results/hierarchical.md](results/hierarchical.md): hierarchical vs flat MFA on "
    "Fashion-MNIST (`scripts/hierarchical_eval.py`).",
)


@dataclass
class Setting:
    name: str
    root: str | None
    k: int
    l: int
    em_max_iter: int | None  # None: EMConfig's own max_iter (only --quick caps it)
    sgd_epochs: int
    kde_centres: int
    ndb_bins: int
    limit: int | None = None  # at most this many rows per split (None: all)


SETTINGS = {
    "embedded-mnist": Setting("embedded-mnist", None, 20, 6, None, 30, 4000, 20),
    "fashion-mnist": Setting("fashion-mnist", "/usr/share/datasets/fashion-mnist", 50, 6, None,
                             8, 10000, 100),
}


def quick_setting(s: Setting) -> Setting:
    """Tiny sizes that run every code path in seconds (a smoke test, not a measurement)."""
    return Setting(s.name, s.root, 4, 2, 3, 1, 200, 5, limit=400)


def fit_em(train: torch.Tensor, val: torch.Tensor, s: Setting, n_factors: int, seed: int):
    """EM with the library's defaults (MAP EM, automatic noise prior, early stopping), the
    validation split passed to ``fit``. Returns the model and what the fit chose and ran."""
    model = MixtureOfFactorAnalyzers(s.k, train.shape[1], n_factors)
    overrides = {} if s.em_max_iter is None else {"max_iter": s.em_max_iter}
    trainer = EMTrainer(EMConfig(seed=seed, progress=False, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, train, val)
    history = trainer.history
    info = {"noise_prior_variance": trainer.selected_noise_prior_variance,
            "iterations": len(history),
            "early_stopped": any(r["early_stop"] for r in history),
            "converged": trainer.converged,
            "search_seconds": trainer.search_seconds,
            "selection_seconds": trainer.selection_seconds,
            "tempered_temperature": (trainer.tempered.temperature if trainer.tempered is not None
                                     and trainer.tempered.applied else None)}
    logging.info("  EM L=%d: %s", n_factors, info)
    return model, info


def fit_sgd(train: torch.Tensor, val: torch.Tensor, s: Setting, seed: int):
    """Adam with SGDConfig's defaults (the start and the noise prior of ``mfa.sgd_start``,
    early stopping on the validation split passed to ``fit``); only ``epochs`` is set per
    dataset. ``best_epoch`` 0: no epoch beat the start."""
    model = MixtureOfFactorAnalyzers(s.k, train.shape[1], s.l)
    trainer = SGDTrainer(SGDConfig(seed=seed, progress=False, epochs=s.sgd_epochs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, train, val)
    history = trainer.history
    scored = [r for r in history if r["val_log_likelihood"] is not None]
    best = max(scored, key=lambda r: r["val_log_likelihood"]) if scored else None
    start = trainer.start_val_log_likelihood
    if best is not None and start is not None and start >= best["val_log_likelihood"]:
        best = {"epoch": 0}
    info = {"noise_prior_variance": trainer.selected_noise_prior_variance,
            "iterations": len(history),
            "best_epoch": None if best is None else best["epoch"],
            "early_stopped": len(history) < s.sgd_epochs}
    logging.info("  Adam: %s", info)
    return model, info


def fit_kde(train: torch.Tensor, val: torch.Tensor, s: Setting, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = train[torch.randperm(train.shape[0], generator=gen)[: s.kde_centres]]
    val = val[:2000]
    bandwidth, _ = select_kde_bandwidth(centres, val, torch.logspace(-2.3, -0.5, 13).tolist())
    return kde(centres, bandwidth), {"noise_prior_variance": None, "iterations": None,
                                     "bandwidth": float(bandwidth)}


def run_dataset(s: Setting, out: Path, seed: int) -> dict:
    data = load_dataset(s.name, s.root, dequantize=True, seed=seed, limit=s.limit)
    logging.info("%s: %s", s.name, data.sizes)
    # each split dequantised once, before any timer starts (the properties convert on every
    # read: 1.1-1.3 s a fit on Fashion-MNIST's 60,000 rows, inside the fits' times before)
    train, val, test = data.train, data.val, data.test
    d = data.n_features
    rows = []
    models = {}
    fits = {
        f"MFA, EM (K={s.k}, L={s.l})": lambda: fit_em(train, val, s, s.l, seed),
        f"MFA, Adam (K={s.k}, L={s.l})": lambda: fit_sgd(train, val, s, seed),
        f"diagonal GMM, EM (K={s.k}, L=0)": lambda: fit_em(train, val, s, 0, seed),
        f"KDE ({s.kde_centres} centres, bandwidth on val)": lambda: fit_kde(train, val, s, seed),
    }
    bins = NDB.fit(train, s.ndb_bins, seed=seed)  # once: every sample set is binned alike
    real_ndb = bins.evaluate(test)
    for label, fit in fits.items():
        torch.manual_seed(seed)
        start = time.perf_counter()
        model, info = fit()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            ll = mean_log_likelihood(model, test, batch_size=1000)
            samples, _ = model.sample(test.shape[0], generator=torch.Generator().manual_seed(seed))
        result = bins.evaluate(samples.clamp(0, 1))
        rows.append({"model": label, **info, "test_bits_per_dim": float(bits_per_dim(ll, d)),
                     "test_log_likelihood": ll, "ndb": result.ndb, "ndb_over_k": result.ndb_over_k,
                     "ndb_js": result.js_divergence, "train_seconds": seconds})
        models[label] = model
        logging.info("%s: %s", label, rows[-1])
        tag = label.split(" (")[0].replace(", ", "-").replace(" ", "-").lower()
        with torch.no_grad():
            x, _ = model.sample(32, generator=torch.Generator().manual_seed(seed + 1))
        viz.save_image_grid(viz.rows_to_images(x, data.image_shape),
                            out / f"{s.name}-samples-{tag}.png", 8, scale=2,
                            dequantized=data.dequantize)  # x as floor(256·x), a pixel
    pixels = data.pixels("test")  # [N, D] uint8: the figures draw the data as stored
    em_model = next(iter(models.values()))
    x = data.dataset("test").rows(torch.arange(8))
    for kind in ("center", "bottom"):
        observed = make_mask(kind, data.image_shape, 8)
        with torch.no_grad():
            mean, samp = inpaint(em_model, x, observed, 3,
                                 generator=torch.Generator().manual_seed(seed))
        grid = viz.inpainting_grid(pixels[:8], pixels[:8], mean, samp, data.image_shape,
                                   observed, dequantized=data.dequantize)  # (hidden: painted)
        viz.save_image(grid, out / f"{s.name}-inpaint-{kind}.png", scale=2)
    with torch.no_grad():
        scores = em_model.log_prob(test)
    worst = torch.argsort(scores)[:32]
    viz.save_image_grid(viz.rows_to_images(pixels[worst], data.image_shape),
                        out / f"{s.name}-outliers.png", 8, scale=2)
    return {"dataset": s.name, "sizes": data.sizes, "setting": s.__dict__,
            "real_test_ndb": real_ndb.ndb, "real_test_ndb_over_k": real_ndb.ndb_over_k,
            "rows": rows}


def _protocol(results: list[dict], seed: int) -> str:
    """The protocol paragraphs, their numbers read from the configs' defaults so they stay
    true when a default changes; ``seed``: the run's ``--seed``."""
    em, sgd = EMConfig(), SGDConfig()
    model = MixtureOfFactorAnalyzers(1, 1, 0)
    caps = sorted({r["setting"].get("em_max_iter") for r in results} - {None})
    epochs = ", ".join(f"{r['setting']['sgd_epochs']} on {r['dataset']}" for r in results)
    weights = ("a flat Dirichlet(1) prior on the weights" if em.weight_concentration == 1
               else f"a Dirichlet({em.weight_concentration:g}) prior on the weights")
    loadings = (f"a ridge prior (λ = {em.loading_ridge:g}) on the loadings" if em.loading_ridge
                else "no prior on the loadings")
    penalty = ("no prior penalty" if not sgd.noise_prior_strength and not sgd.loading_ridge
               and sgd.weight_concentration == 1 else "the priors of MAP EM as a penalty"
               + (" (s₀ chosen on the validation split at the start, as EM's first search "
                  "chooses it)" if sgd.auto_noise_prior
                  else f" (s₀ = {sgd.noise_prior_variance:g})"))
    start = ("the initialisation followed by one MAP EM step" if sgd.em_start
             else "the initialisation")
    steps = ("each mean and loading step scaled by the entry's noise standard deviation "
             "(`step_scale='noise'`)" if sgd.step_scale == "noise" else "plain Adam steps")
    return (
        "Protocol: pixels are uniformly dequantised, `x = (pixel + u)/256`; bits/dim is `−(log "
        "p(x) − D·log 256)/(D·ln 2)` averaged over the held-out rows, an upper bound on the "
        "negative log-likelihood of the discrete images in bits per dimension. NDB (Richardson & "
        "Weiss, 2018) bins the training images by K-means and counts the bins whose share of "
        "model samples differs from the training share (two-proportion z-test, α = 0.05), with as"
        " many samples as test images (clamped to [0, 1], the pixel range); the row *real test "
        "images* is the same test applied to held-out real images, i.e. the level a perfect model"
        " would reach.\n\n"
        "Every model is fitted with the library's defaults, the validation split passed to "
        "`fit`; nothing is tuned by hand. MFA EM and the diagonal GMM (MFA with L = 0) are "
        f"`EMTrainer(EMConfig(seed={seed}, progress=False))`: MAP EM (`mfa.priors`) with an "
        f"inverse-gamma prior of {em.noise_prior_strength:g} pseudo-row of variance s₀ on every "
        f"noise variance, {weights} and {loadings}; every noise variance stays above "
        f"`variance_floor` = {em.variance_floor:g}. s₀ is chosen on the validation split inside "
        f"`fit` (`mfa.prior_search`): after {em.search_warmup} iterations with the weakest "
        "candidate (s₀ = the quantisation variance 1/(12·256²) ≈ "
        f"{em.quantization_variance:.2g}), the MAP M-step of s₀ values on a log grid "
        f"({em.search_per_decade} a decade, up to the largest per-feature training variance) "
        "is scored on the validation rows (a golden-section search over the grid) and the "
        "best is kept; the column *noise prior s₀* "
        "is that choice. When early stopping's patience runs out the search runs again from "
        f"the model reached (at most {em.max_searches} searches) and moves to a stronger s₀; "
        "EM continues under it while that stint beats the best validation score. EM then "
        "runs until the MAP objective gains less than "
        f"{em.tol:g} nats per row, for at most {em.max_iter} iterations"
        + (f" (capped at {', '.join(map(str, caps))} here)" if caps else "")
        + f", or stops early after {em.patience} iterations without a validation "
        f"log-likelihood {em.min_delta:g} nats per row and feature above the score where "
        "patience last restarted, and returns the parameters of best validation "
        f"log-likelihood. Then {em.reseed_rounds} round(s) re-seed the components whose "
        "removal would raise the validation log-likelihood (`mfa.pruning`) by splitting the "
        "heaviest component and run EM again from there under the kept result's s₀ (no "
        "search), "
        "kept if the validation score is better (the column *iterations* counts both). "
        + ("Last, one MAP M-step from tempered responsibilities (`mfa.tempering`: "
           "temperatures D/4, D and 4D at the fit's prior strength and 16 times it, then "
           "for each strength that beat the fit, halfway to its best temperature's "
           "neighbours, s₀ searched again; the best candidate's s₀ "
           "then raised to the strongest within one standard error of the best's validation "
           "score) replaces the model when "
           "its validation log-likelihood beats the fit's by more than two standard errors of "
           "the paired per-row gain. " if em.tempered_step else "")
        + f"MFA Adam is `SGDTrainer(SGDConfig(seed={seed}, progress=False, epochs=E))` "
        f"(E = {epochs}; the default is {sgd.epochs}): from {start}, Adam with lr {sgd.lr:g}, "
        f"{steps}, a {sgd.schedule} schedule, batches of {sgd.batch_size}, {penalty}, noise "
        f"variances above the model's `min_noise` = {model.min_noise:g}, and early stopping "
        f"after {sgd.patience} epochs without a better validation log-likelihood, keeping the "
        "best parameters (the start's among them). The column *iterations* counts the EM "
        "iterations (Adam epochs) run. "
        "Training time is the wall time of the fit, K-means initialisation and the choice of "
        "s₀ (or of the KDE bandwidth, on the validation split) included."
    )


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _run_record() -> dict:
    """Where and from what this run came, saved with its results so ``--markdown-only``
    states the run's environment, not the one rewriting the page."""
    return {"commit": commit(),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def write_markdown(results: list[dict], path: Path) -> None:
    quick = any(r.get("quick") for r in results)
    run = results[0].get("run") if results else None
    if run is None:  # a results.json written before runs were recorded
        generated = ("Generated by `python scripts/results.py` (the run's commit and "
                     "environment were not recorded in its `docs/results/results.json`); every "
                     "number and figure below comes from that run.")
    else:
        generated = (f"Generated by `python scripts/results.py` at commit `{run['commit']}` "
                     f"({run['started']}) on {run['machine']} with {run['torch_threads']} torch "
                     f"threads (torch {run['torch']}); every number and figure below comes "
                     "from that run (`docs/results/results.json`).")
    protocol = results[0].get("protocol") if results else None
    lines = [
        "# Results",
        "",
        "More results:",
        "",
        *(f"- {entry}" for entry in MORE_RESULTS),
        "",
        generated,
        *(["", "**`--quick` smoke test: tiny sizes, not a measurement.**"] if quick else []),
        "",
        protocol if protocol is not None else (
            "(The protocol as today's defaults give it; the run did not record its own.) "
            + _protocol(results, (run or {}).get("seed", 0))),
        "",
    ]
    for res in results:
        s = res["setting"]
        lines += [f"## {res['dataset']}", "",
                  f"Splits: {res['sizes']}. NDB with {s['ndb_bins']} bins.", "",
                  "| model | noise prior s₀ (chosen) | iterations | test bits/dim ↓ | NDB/K ↓ | "
                  "JS (bins) ↓ | train time (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in res["rows"]:
            lines.append(f"| {row['model']} | {_cell(row.get('noise_prior_variance'), '.3g')} | "
                         f"{_cell(row.get('iterations'), 'd')} | "
                         f"{row['test_bits_per_dim']:.3f} | "
                         f"{row['ndb_over_k']:.2f} | {row['ndb_js']:.4f} | "
                         f"{row['train_seconds']:.1f} |")
        lines.append(f"| real test images | — | — | — | {res['real_test_ndb_over_k']:.2f} | — | "
                     "— |")
        name = res["dataset"]
        lines += ["", "Samples (MFA EM, MFA Adam, diagonal GMM, KDE):", ""]
        for tag in ("mfa-em", "mfa-adam", "diagonal-gmm-em", "kde"):
            lines.append(f"![{tag}](results/{name}-samples-{tag}.png)")
        lines += ["", "Inpainting with MFA EM (original | masked | conditional mean | 3 "
                  "conditional samples):", "",
                  f"![inpaint centre](results/{name}-inpaint-center.png) "
                  f"![inpaint bottom](results/{name}-inpaint-bottom.png)", "",
                  "The 32 least likely test images under MFA EM:", "",
                  f"![outliers](results/{name}-outliers.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default=None,
                        help=f"folder of results.md and results/ (default {ROOT / 'docs'}; "
                        "required with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 3 EM iterations (a smoke test, not a measurement)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite results.md from the saved results.json")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:  # (it replaced the published page and figures)
        parser.error("--quick needs --out: the default folder, docs/, holds the published "
                     "results, which a smoke test would replace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out or ROOT / "docs")
    figures = out / "results"
    for folder in (out, figures):  # (a file there was found after every fit, when writing)
        output_folder(parser, folder, is_file=False)
    if args.markdown_only:
        results = json.loads((figures / "results.json").read_text())
        write_markdown(results, out / "results.md")
        print(f"wrote {out / 'results.md'}")
        return
    figures.mkdir(parents=True, exist_ok=True)
    results, run = [], {**_run_record(), "seed": args.seed}
    for name in args.datasets:
        s = quick_setting(SETTINGS[name]) if args.quick else SETTINGS[name]
        results.append({**run_dataset(s, figures, args.seed), "quick": args.quick, "run": run})
    protocol = _protocol(results, args.seed)
    for res in results:
        res["protocol"] = protocol
    (figures / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
