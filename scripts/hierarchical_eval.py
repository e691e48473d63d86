"""Two-level (hierarchical) MFA against a flat MFA of the same K on Fashion-MNIST.

    python scripts/hierarchical_eval.py    # the published run: docs/results/hierarchical.md
                                           # (K≈530, one thread; ~5 min idle, 14 min loaded)
    python scripts/hierarchical_eval.py --train-rows 20000 --root-components 10 \
        --out /tmp/hierarchical.md                                        # ~1 min
    python scripts/hierarchical_eval.py --device cuda --threads 4 --out /tmp/hierarchical-gpu.md

Trains, each in a fresh process (so peak memory is that model's alone):
1. the hierarchical model of :mod:`mfa.hierarchical` (root of K₁ components, one child per
   root component with rows // rows-per-component components), flattened to K components;
2. a flat MFA of the same K with EM (K-means++ init), the expensive part.
Reports held-out bits/dim on the test split (dequantised, ``mfa.metrics.bits_per_dim``),
training wall time and peak memory (``ru_maxrss`` of the process on CPU, which includes the
loaded data; ``torch.cuda.max_memory_allocated`` on a GPU), as a markdown table in ``--out``.
Without ``--out`` the page is the published one, docs/results/hierarchical.md, and only the
published run may write it: every option but ``--data-root`` and ``--json`` at its default.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from queue import Empty

import torch
from _provenance import commit, output_folder  # (scripts/, on sys.path when run as a script)

from mfa import EMConfig, EMTrainer, MixtureOfFactorAnalyzers, bits_per_dim, mean_log_likelihood
from mfa.data import load_dataset
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = "docs/results/hierarchical.md"  # (under ROOT) the page of the default run


def load(args) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("fashion-mnist", root=args.data_root, dequantize=True, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = data.train
    train = train[torch.randperm(train.shape[0], generator=gen)[: args.train_rows]].clone()
    test = data.test[: args.test_rows].clone()
    del data
    return train.to(args.device), test.to(args.device)


class RssSampler:
    """Peak resident set size of this process while a block runs, sampled every ``interval``
    seconds from ``/proc/self/statm`` (Linux); ``increase`` is the peak minus the RSS when
    the block started. Spikes shorter than the interval can be missed."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.page = resource.getpagesize()
        self.start = self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as file:
                return int(file.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.start = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def em_config(args, iters: int) -> EMConfig:
    """Plain maximum-likelihood EM for exactly ``iters`` iterations (no noise prior, no
    early stopping: the same budget for both models), with a variance floor of 1e-4."""
    return EMConfig(max_iter=iters, batch_size=args.batch_size, variance_floor=1e-4,
                    noise_prior_strength=0.0, patience=0, stats_dtype=args.stats_dtype,
                    seed=args.seed, progress=False)


def run(kind: str, args, n_components: int, queue) -> None:
    """Train one model in this (fresh) process and put its figures on ``queue``; if that
    fails, put ``{"error": "<exception type>: <message>"}`` there and raise it."""
    try:
        queue.put(train_one(kind, args, n_components))
    except Exception as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def train_one(kind: str, args, n_components: int) -> dict:
    """Train one model (in this process) and return its figures."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    train, test = load(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = RssSampler()
    sampler.__enter__()
    started, cpu_started = time.perf_counter(), time.process_time()
    extra = {}
    if kind == "hierarchical":
        cfg = HierarchicalConfig(
            root_components=args.root_components, n_factors=args.factors,
            rows_per_component=args.rows_per_component,
            max_child_components=args.max_child_components,
            min_child_rows=args.min_child_rows,
            root_em=em_config(args, args.root_iter), child_em=em_config(args, args.child_iter),
            final_em=(replace(em_config(args, args.final_iter), init="none")
                      if args.final_iter else None),
            seed=args.seed,
        )
        trainer = HierarchicalTrainer(cfg)
        model = trainer.fit(train)
        sizes = [c.n_components for c in trainer.children]
        extra = {"root_components": args.root_components, "child_sizes": sizes,
                 "kept": int(trainer.kept.sum()),
                 "root_seconds": trainer.history[0]["seconds"],
                 "em_seconds": sum(r["em_seconds"] for r in trainer.history),
                 "root_test_bpd": bits_per_dim(mean_log_likelihood(trainer.root, test),
                                               train.shape[1])}
    else:
        model = MixtureOfFactorAnalyzers(n_components, train.shape[1], args.factors,
                                         device=args.device)
        em = EMTrainer(em_config(args, args.flat_iter))
        em.fit(model, train)
        extra = {"em_seconds": sum(r["seconds"] for r in em.history)}
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    sampler.__exit__()
    peak = (torch.cuda.max_memory_allocated() if cuda else sampler.increase)
    return {
        "model": kind, "K": model.n_components, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "peak_bytes": peak,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_kind": "cuda max_memory_allocated" if cuda else "RSS increase",
        "train_bpd": bits_per_dim(mean_log_likelihood(model, train), train.shape[1]),
        "test_bpd": bits_per_dim(mean_log_likelihood(model, test), train.shape[1]),
        **extra,
    }


def in_fresh_process(kind: str, args, n_components: int = 0) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run, args=(kind, args, n_components, queue))
    process.start()
    result = None
    while result is None:  # (a child that died sends nothing: queue.get() waited forever)
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            if not process.is_alive():
                try:  # what it put just before it ended
                    result = queue.get(timeout=1.0)
                except Empty:
                    break
    process.join()
    if result is not None and "error" in result:
        raise RuntimeError(f"the {kind} run failed: {result['error']}")
    if result is None or process.exitcode:
        raise RuntimeError(f"the {kind} run failed with exit code {process.exitcode}"
                           + ("" if result is not None else ", sending nothing back"))
    return result


def table(args, results: list[dict], argv: list[str]) -> str:
    """The page; ``argv``: the options it was run with (named in its first line)."""
    hier, flat = results
    sizes = hier["child_sizes"]
    command = shlex.join(["python", "scripts/hierarchical_eval.py", *map(str, argv)])
    lines = [
        "# Hierarchical vs flat MFA on Fashion-MNIST",
        "",
        f"Written by `{command}` at commit `{commit()}`.",
        "",
        f"{args.train_rows} training rows (a seeded random subset of the train split), "
        f"{args.test_rows} test rows, D = 784, L = {args.factors}, dequantised "
        f"(`(pixel + u)/256`), E-step `stats_dtype={args.stats_dtype}`, device `{args.device}`, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}. "
        f"Each model is trained in its own fresh process. Every EM stage is plain "
        "maximum-likelihood EM for a fixed number of iterations (no noise prior, no early "
        "stopping) with a variance floor of 1e-4.",
        "",
        f"Two-level: root of K₁ = {hier['root_components']} components "
        f"({args.root_iter} EM iterations), every row hard-assigned to its most likely root "
        f"component, then one child per root component with rows // {args.rows_per_component} "
        f"components (clamped to [1, {args.max_child_components}], {args.child_iter} EM "
        f"iterations each), flattened to one MFA; {hier['kept']} root component(s) kept as "
        f"they were (too few rows). Child sizes: min {min(sizes)}, median "
        f"{statistics.median(sizes):g}, max {max(sizes)}. "
        + (f"Then {args.final_iter} EM iterations on the flat model. " if args.final_iter else "")
        + f"Flat: one MFA of the same K with K-means++ init and {args.flat_iter} EM iterations.",
        "",
        "| model | K | test bits/dim | train bits/dim | wall time | of which EM iterations | "
        "CPU time | peak memory of training | process max RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['K']} | {r['test_bpd']:.4f} | {r['train_bpd']:.4f} | "
            f"{r['seconds']:.1f} s | {r['em_seconds']:.1f} s | {r['cpu_seconds']:.1f} s | "
            f"{r['peak_bytes'] / 2**20:.0f} MiB | {r['max_rss_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        f"| root alone (part of the two-level run) | {hier['root_components']} | "
        f"{hier['root_test_bpd']:.4f} | | {hier['root_seconds']:.1f} s | | | | |",
        "",
        "Peak memory of training: "
        + ("`torch.cuda.max_memory_allocated` during training."
           if hier["peak_kind"] != "RSS increase" else
           "the largest resident set size sampled every 20 ms during training minus the RSS "
           "when training started (the data already loaded); the process max RSS also "
           "includes loading and decompressing the dataset."),
        "Wall times (training only, without loading or scoring; *of which EM iterations*: "
        "without the K-means++ and factor-analysis initialisation, which each child pays "
        "for its own components) come from a shared machine where other jobs ran at the same "
        "time and are noisy; CPU time is the process's over all its threads (OpenMP "
        "spin-waits included, so not immune to contention either). Lower bits/dim is better.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-rows", type=int, default=54000)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--factors", type=int, default=5)
    parser.add_argument("--root-components", type=int, default=20)
    parser.add_argument("--rows-per-component", type=int, default=100)
    parser.add_argument("--max-child-components", type=int, default=60)
    parser.add_argument("--min-child-rows", type=int, default=None)
    parser.add_argument("--root-iter", type=int, default=15)
    parser.add_argument("--child-iter", type=int, default=15)
    parser.add_argument("--final-iter", type=int, default=0)
    parser.add_argument("--flat-iter", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--stats-dtype", default="float32",
                        choices=["float64", "mixed", "float32"])
    parser.add_argument("--device", default="cpu")
    # One thread: on a shared 2-core machine OpenMP's spin-waits make the many small child
    # problems many times slower under contention (see tests/conftest.py's one_thread).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown file of the page (default {PUBLISHED}, the published "
                        "page: only for the published run, every other option but --data-root "
                        "and --json at its default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.out is None:  # (a smaller run replaced the published page)
        defaults = vars(parser.parse_args([]))
        changed = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
                   if name not in ("data_root", "json") and value != defaults[name]]
        if changed:
            parser.error(f"{' '.join(changed)} given without --out: the default --out, "
                         f"{PUBLISHED}, is the published page of the default run, which this "
                         "run would replace")
        args.out = ROOT / PUBLISHED
    output_folder(parser, args.out)  # (a bad one was found after both fits)
    if args.json is not None:
        output_folder(parser, args.json, "--json")

    hier = in_fresh_process("hierarchical", args)
    print(json.dumps({k: v for k, v in hier.items() if k != "child_sizes"}), flush=True)
    flat = in_fresh_process("flat", args, hier["K"])
    print(json.dumps(flat), flush=True)
    text = table(args, [hier, flat], sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps([hier, flat], indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
