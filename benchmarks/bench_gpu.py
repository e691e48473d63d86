"""GPU benchmark of MFA on CelebA-shaped synthetic data, every figure beside its same-run peer.

Data: ``N`` rows of ``D`` random pixels kept on the device as uint8 ``[N, D]`` (CelebA at
64×64×3 is 2 GB so, 8 GB as float32), built on the device in chunks from a seeded generator
and given to the trainers as :class:`mfa.data.QuantizedRows`, as the workflow gives a large
set on CUDA: dequantised per batch to float32 ``(p + u) / 256`` with ``u ~ U[0, 1)`` hashed
from ``(seed, row, column)`` on the device (the same every pass). No float32 copy of the
whole set is ever made. TF32 is switched by ``EMConfig.allow_tf32`` /
``SGDConfig.allow_tf32`` (:func:`mfa.training.tf32_matmul`), as a user's run switches it.
The values are noise, not faces: the timings depend on the shapes only.

Cases, each under a share of one time budget (``--budget-s``; a case whose extrapolated cost
would overrun it is skipped with a message):

* **matmul**: GFLOP/s of the dominant product ``[B, D] @ [D, K·L]`` in float32 with TF32 off,
  with TF32 on, and in float64 (best of several blocks timed with CUDA events).
* **tf32 accuracy**: on a small image-like problem, ``log_prob`` and one EM update (each
  ``stats_dtype``) of a float32 model with TF32 off and on, against a float64 reference on the
  same device: the max relative errors decide whether TF32 may be allowed.
* **EM**: one epoch (E-step statistics streamed over all ``N`` rows + M-step) through
  ``EMTrainer.fit`` for each ``EMConfig.stats_dtype``; s/epoch, GFLOP/s at
  ``4·N·D·K·(L+2)`` flops, the same-run FLOP limit and its fraction, peak GPU memory. The
  limit counts each product at the matmul rate of its precision: ``float64`` all at the
  float64 rate; ``mixed`` ``4·N·D·K`` (``Σ r x``, ``Σ r x²``) at the float64 rate and the rest
  at the float32 (or TF32) rate; ``float32`` all at the float32 (or TF32) rate. The
  log-likelihood pass that ``fit`` runs after its last M-step is timed separately.
* **Adam**: ``SGDTrainer`` for one epoch (or as many steps as the budget allows); samples/s
  and the fraction of the matmul rate. Flops per step of ``n`` rows: the forward pass is the
  three products ``x² @ (1/d)ᵀ``, ``x @ (μ/d)ᵀ``, ``x @ Bᵀ`` = ``2·n·D·K·(L+2)``; the backward
  pass needs only the gradients of the right-hand (parameter) factors, ``(x²)ᵀ g``, ``xᵀ g``,
  ``xᵀ g_B`` = another ``2·n·D·K·(L+2)`` (the usual "backward = 2× forward" rule counts the
  input gradients too, which the data does not need), so ``4·n·D·K·(L+2)`` in all, the same
  per row as one EM iteration; the ``O(K·D·L²)`` parameter transforms are not counted.
* **initialisation**: :func:`mfa.init.initialise` as ``EMConfig``'s defaults run it (K-means
  on a seeded subsample, then the per-cluster PPCA and factor analysis in groups) on the first
  ``init_samples`` rows, dequantised to float32 on the device; seconds (after a warm-up on a
  tenth of the rows), the same in default EM epochs, and peak memory.
* **inpaint**: ``mfa.inference.inpaint`` (conditional mean + one sample) of a batch with the
  centre square hidden; seconds and peak memory, as called and under ``torch.no_grad()``.
* **large model**: whether ``K = --large-components`` (1000) fits: construction, a
  ``log_prob`` batch, one EM iteration on one batch (E-step + M-step), one Adam step, a small
  inpainting; peak memory of each, out-of-memory caught and reported.

    python benchmarks/bench_gpu.py --device cuda --json gpu_results/bench_gpu.json
    python benchmarks/bench_gpu.py --quick --device cpu      # tiny sizes: a CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

import mfa
from mfa import EMConfig, EMTrainer, MixtureOfFactorAnalyzers, SGDConfig, SGDTrainer
from mfa.cli_types import finite, non_negative_int, positive_int
from mfa.data import QuantizedRows
from mfa.inference import inpaint
from mfa.init import initialise
from mfa.precision import resolve_stats_dtype
from mfa.training import tf32_enabled, tf32_matmul

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _provenance import commit  # noqa: E402  (the checkout's commit, for the JSON)

OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                    torch.cuda.OutOfMemoryError})
MODES = ("auto", "float64", "precise", "centred", "mixed", "centred32", "float32")
GB = 1024**3


# ---------------------------------------------------------------------- device helpers


class Clock:
    """Wall-clock seconds with the device synchronised at every reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GB


def allocated_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / GB


class Budget:
    """One time budget for the whole run; a case that would overrun it is skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, case: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        message = (f"SKIPPED {case}: needs ~{estimate:.1f} s (extrapolated), "
                   f"{max(self.left(), 0):.1f} s of the {self.seconds:.0f} s budget left")
        self.skipped.append(message)
        print(message, flush=True)
        return False


# ---------------------------------------------------------------------- data


def make_pixels(n: int, d: int, device: torch.device, seed: int, chunk: int = 8192):
    """``[n, d]`` uint8 random pixels built on ``device`` chunk by chunk (seeded)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pixels = torch.empty(n, d, dtype=torch.uint8, device=device)
    for i in range(0, n, chunk):
        rows = min(chunk, n - i)
        pixels[i : i + rows] = torch.randint(0, 256, (rows, d), generator=gen, device=device,
                                             dtype=torch.uint8)
    return pixels


class DequantisedStream:
    """A re-iterable stream of float32 batches ``(p + u) / 256`` ``[B, D]`` on the device:
    consecutive slices of :class:`mfa.data.QuantizedRows` (hashed noise, the same every pass).

    Args:
        pixels: uint8 ``[N, D]`` on the device.
        batch_size: rows per batch.
        seed: seeds the dequantisation noise.
        max_batches: stop after this many batches (``None``: all ``ceil(N / B)``).
    """

    def __init__(self, pixels, batch_size: int, seed: int, max_batches: int | None = None):
        self.rows = QuantizedRows(pixels, dequantize=True, seed=seed)
        self.batch_size = batch_size
        total = math.ceil(pixels.shape[0] / batch_size)
        self.n_batches = total if max_batches is None else min(total, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def n_rows(self) -> int:
        return min(self.n_batches * self.batch_size, len(self.rows))

    def __iter__(self):
        for b in range(self.n_batches):
            yield self.rows[b * self.batch_size : (b + 1) * self.batch_size]  # [B, D] float32


def first_rows(pixels, n: int, seed: int) -> QuantizedRows:
    """The first ``n`` rows of ``pixels`` as dequantised :class:`QuantizedRows` (what the
    workflow gives a trainer for a large set on CUDA)."""
    rows = QuantizedRows(pixels, dequantize=True, seed=seed)
    return rows if n >= len(rows) else rows.subset(torch.arange(n, device=pixels.device))


def start_model(pixels, k: int, lat: int, seed: int) -> MixtureOfFactorAnalyzers:
    """A float32 model on the data's device: means at ``k`` seeded random rows, small random
    loadings, noise variance 1/12 (a uniform pixel's), equal weights."""
    device = pixels.device
    n, d = pixels.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    model = MixtureOfFactorAnalyzers(k, d, lat, device=device, generator=gen)
    rows = torch.randint(0, n, (k,), generator=gen, device=device)
    means = (pixels[rows].float() + 0.5) / 256  # [K, D]
    loadings = 0.05 / max(lat, 1) ** 0.5 * torch.randn(k, d, lat, generator=gen, device=device)
    model.set_parameters(
        weights=torch.full((k,), 1.0 / k, device=device),
        means=means,
        factor_loadings=loadings,
        noise_variance=torch.full((k, d), 1.0 / 12, device=device),
    )
    return model


def hidden_centre(d: int) -> torch.Tensor:
    """Bool ``[D]``, True where observed: for ``D = 3·s²`` (an RGB image, channels last or
    first alike) the centre ``s/2 × s/2`` square is hidden; otherwise the middle half."""
    side = math.isqrt(d // 3)
    if d % 3 == 0 and side * side * 3 == d:
        img = torch.ones(side, side, dtype=torch.bool)
        q = side // 4
        img[q : side - q, q : side - q] = False
        return img.reshape(-1).repeat(3)  # [3·s·s], channel-major
    observed = torch.ones(d, dtype=torch.bool)
    observed[d // 4 : d - d // 4] = False
    return observed


# ---------------------------------------------------------------------- cases


def matmul_rate(b: int, d: int, width: int, dtype, allow_tf32: bool, device, repeats: int,
                blocks: int = 3) -> float:
    """GFLOP/s of ``[b, d] @ [d, width]``: the best of ``blocks`` timings of ``repeats``."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(b, d, generator=gen, device=device, dtype=dtype)
    w = torch.rand(d, width, generator=gen, device=device, dtype=dtype)
    out = torch.empty(b, width, device=device, dtype=dtype)
    best = 0.0
    with tf32_matmul(allow_tf32):
        for _ in range(2):
            torch.matmul(a, w, out=out)
        for _ in range(blocks):
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    torch.matmul(a, w, out=out)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    torch.matmul(a, w, out=out)
                seconds = time.perf_counter() - t0
            best = max(best, 2 * b * d * width * repeats / seconds / 1e9)
    return best


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value − reference| / max |reference|`` (normwise, in float64)."""
    value, reference = value.double(), reference.double()
    scale = reference.abs().max().clamp_min(1e-300)
    return ((value - reference).abs().max() / scale).item()


def tf32_accuracy(device, d: int, k: int, lat: int, n: int, seed: int) -> dict:
    """``log_prob`` and one EM update of a float32 model (TF32 off / on) against float64.

    The truth is image-like: means in [0.2, 0.8], loadings that explain ~90 % of each
    pixel's variance (factor variance 0.01, noise 1e-3); the data are its samples; the EM
    update starts from the truth.
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k, dtype=f64),
        0.2 + 0.6 * torch.rand(k, d, generator=gen, dtype=f64),
        0.1 / lat**0.5 * torch.randn(k, d, lat, generator=gen, dtype=f64),
        torch.full((k, d), 1e-3, dtype=f64),
    )
    x64, _ = truth.sample(n, generator=gen)
    reference = copy.deepcopy(truth).to(device)
    x64 = x64.to(device)
    x32 = x64.float()
    with torch.no_grad():
        lp_ref = reference.log_prob(x64)  # [n]
    out: dict = {"shape": {"n": n, "d": d, "k": k, "l": lat}, "log_prob": {}, "em_update": {}}

    def one_update(model, data, mode, allow=False):
        """One plain EM update (no hold-out, s₀ search, tempered step or re-seeding, whose
        discrete choices could differ between precisions and would read as their error)
        and the updated model's mean log-likelihood, in float64, of the float64 rows."""
        trainer = EMTrainer(EMConfig(max_iter=1, tol=0.0, init="none", stats_dtype=mode,
                                     batch_size=n, progress=False, allow_tf32=allow,
                                     noise_prior_strength=0.0, patience=0, reseed_rounds=0,
                                     tempered_step=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfa.ConvergenceWarning)
            trainer.fit(model, data)
        with torch.no_grad():
            ll = copy.deepcopy(model).double().log_prob(x64).mean().item()
        return model, ll

    ref_model, ref_ll = one_update(copy.deepcopy(reference), x64, "float64")
    for allow in (False, True):
        key = "tf32" if allow else "float32"
        with tf32_matmul(allow), torch.no_grad():
            model32 = copy.deepcopy(reference).float()
            lp = model32.log_prob(x32).double()
        err = (lp - lp_ref).abs()
        out["log_prob"][key] = {
            "max_abs_error_nats": err.max().item(),
            "max_rel_error": (err / lp_ref.abs().clamp_min(1e-300)).max().item(),
        }
        for mode in MODES:
            model, ll = one_update(copy.deepcopy(reference).float(), x32, mode, allow)
            out["em_update"][f"{mode}/{key}"] = {
                "log_likelihood_rel_error": abs(ll - ref_ll) / abs(ref_ll),
                "means_rel_error": relative_error(model.means, ref_model.means),
                "loadings_rel_error": relative_error(model.factor_loadings,
                                                     ref_model.factor_loadings),
                "noise_max_rel_error": (
                    (model.noise_variance.double() - ref_model.noise_variance).abs()
                    / ref_model.noise_variance
                ).max().item(),
            }
    return out


def em_case(model0, pixels, mode: str, allow_tf32: bool, args, budget, clock, rates) -> dict:
    """One EM epoch through ``EMTrainer.fit`` (``max_iter=1``, ``init="none"``)."""
    device = pixels.device
    n, d = pixels.shape
    k, lat = model0.n_components, model0.n_factors
    name = f"EM {mode}" + (" + TF32" if allow_tf32 else "")
    # The data as the workflow gives a large set on CUDA: uint8 QuantizedRows on the device;
    # no validation split, and the noise prior "auto" falls back to without one.
    cfg = EMConfig(max_iter=1, tol=0.0, batch_size=args.batch_size, stats_dtype=mode,
                   init="none", progress=False, allow_tf32=allow_tf32, val_fraction=0.0,
                   patience=0, noise_prior_variance=EMConfig.quantization_variance)
    stream = first_rows(pixels, n, args.seed)
    n_batches = math.ceil(n / args.batch_size)
    result: dict = {"case": name, "stats_dtype": mode, "tf32": allow_tf32}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mfa.ConvergenceWarning)
        warm = first_rows(pixels, 2 * args.batch_size, args.seed)
        warm_batches = math.ceil(len(warm) / args.batch_size)
        per_batch = 0.0
        for _ in range(2):  # the first call pays kernel selection; the second is timed
            t0 = clock.now()
            EMTrainer(cfg).fit(copy.deepcopy(model0), warm)
            per_batch = (clock.now() - t0) / (2 * warm_batches)  # E + log-likelihood pass
        estimate = per_batch * n_batches * 1.2 + 1.0
        result["estimate_s"], result["per_batch_s"] = estimate, per_batch
        if not budget.allows(name, estimate):
            result["skipped"] = budget.skipped[-1]
            return result
        model = copy.deepcopy(model0)
        reset_peak(device)
        marks: list[float] = []
        trainer = EMTrainer(cfg)
        t0 = clock.now()
        trainer.fit(model, stream, callbacks=[lambda *_: marks.append(clock.now())])
        t1 = clock.now()
    flops = 4 * n * d * k * (lat + 2)
    f32_rate = rates["tf32" if allow_tf32 else "float32"] * 1e9
    f64_rate = rates["float64"] * 1e9
    resolved = resolve_stats_dtype(mode, device, model0.dtype)
    result["resolved_stats_dtype"] = resolved
    # float64 share of the flops: everything, the sums (half), the two moment sums (each
    # [K, n] @ [n, D], 2·n·D·K), none.
    # "centred": the owner shares, 2·n·D·(L+2) (1/K of the E-step; n = N rows); "centred32"
    # takes them in float32.
    f64_flops = {"float64": flops, "precise": flops // 2, "mixed": 4 * n * d * k,
                 "centred": 2 * n * d * (lat + 2), "centred32": 0, "float32": 0}[resolved]
    limit = f64_flops / f64_rate + (flops - f64_flops) / f32_rate
    epoch = marks[0] - t0
    result.update({
        "seconds_per_epoch": epoch,
        "log_likelihood_pass_s": t1 - marks[0],
        "tflop_per_epoch": flops / 1e12,
        "gflops": flops / epoch / 1e9,
        "limit_s": limit,
        "fraction_of_matmul_rate": limit / epoch,
        "peak_memory_gb": peak_gb(device),
        "train_log_likelihood": trainer.history[0]["train_log_likelihood"],
    })
    return result


def adam_case(model0, pixels, allow_tf32: bool, args, budget, clock, rates) -> dict:
    """``SGDTrainer`` for one epoch of ``--adam-batch-size`` rows per step (fewer steps when
    the budget says so)."""
    device = pixels.device
    n, d = pixels.shape
    k, lat = model0.n_components, model0.n_factors
    bs = args.adam_batch_size
    name = "Adam" + (" + TF32" if allow_tf32 else "")
    result: dict = {"case": name, "tf32": allow_tf32, "batch_size": bs}
    cfg = SGDConfig(lr=1e-3, batch_size=bs, epochs=1, init="none", init_samples=1, patience=0,
                    progress=False, allow_tf32=allow_tf32, val_fraction=0.0,
                    noise_prior_variance=1e-4)

    def run(steps):
        model = copy.deepcopy(model0)
        trainer = SGDTrainer(cfg)
        rows = first_rows(pixels, steps * bs, args.seed)  # shuffled by the trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfa.ConvergenceWarning)
            trainer.fit(model, rows)
        return trainer.history[0]["seconds"], len(rows)

    per_step = 0.0
    for _ in range(2):  # warm-up, then an estimate
        seconds, _ = run(3)
        per_step = seconds / 3
    full = math.ceil(n / bs)
    steps = full
    share = max(budget.left() - 30.0, 0.0) / 4  # leave room for the cases after this one
    if per_step * steps > share:
        steps = max(3, int(share / max(per_step, 1e-9)))
    estimate = per_step * steps * 1.2 + 1.0
    result["estimate_s"] = estimate
    if not budget.allows(name, estimate):
        result["skipped"] = budget.skipped[-1]
        return result
    reset_peak(device)
    seconds, rows = run(steps)
    flops = 4 * rows * d * k * (lat + 2)
    rate = rates["tf32" if allow_tf32 else "float32"] * 1e9
    result.update({
        "steps": steps, "epoch_steps": full, "rows": rows, "seconds": seconds,
        "samples_per_s": rows / seconds, "gflops": flops / seconds / 1e9,
        "fraction_of_matmul_rate": flops / rate / seconds,
        "seconds_per_epoch_extrapolated": seconds * n / rows,
        "peak_memory_gb": peak_gb(device),
    })
    return result


def init_case(pixels, k: int, lat: int, args, budget, clock) -> dict:
    """The K-means initialisation of ``EMConfig``'s defaults on the first ``init_samples``
    rows (float32 on the device, as the trainers gather them; the gathering is not timed)."""
    device = pixels.device
    cfg = EMConfig()
    n_rows = min(pixels.shape[0], cfg.init_samples)
    result: dict = {"case": "initialisation", "rows": n_rows, "kmeans_iter": cfg.kmeans_iter,
                    "complete_iter": cfg.complete_iter}

    def once(rows) -> float:
        model = MixtureOfFactorAnalyzers(k, rows.shape[1], lat, device=device)
        t0 = clock.now()
        initialise(model, rows, "kmeans", seed=args.seed, variance_floor=cfg.variance_floor,
                   kmeans_iter=cfg.kmeans_iter, complete_iter=cfg.complete_iter)
        return clock.now() - t0

    try:
        rows = first_rows(pixels, n_rows, args.seed)[0:n_rows]  # [n, D] float32
        warm = rows[: max(k, n_rows // 10)]
        result["warmup_s"] = once(warm)
        estimate = 15.0 * result["warmup_s"] + 5.0
        result["estimate_s"] = estimate
        if not budget.allows("initialisation", estimate):
            result["skipped"] = budget.skipped[-1]
            return result
        reset_peak(device)
        result["seconds"] = once(rows)
        result["peak_memory_gb"] = peak_gb(device)
    except torch.cuda.OutOfMemoryError as error:
        result["out_of_memory"] = str(error).splitlines()[0]
    return result


def inpaint_case(model0, pixels, rows: int, args, clock) -> dict:
    device = pixels.device
    x = next(iter(DequantisedStream(pixels, rows, args.seed + 1)))  # [rows, D]
    observed = hidden_centre(pixels.shape[1]).to(device).expand_as(x).contiguous()
    result: dict = {"case": "inpaint", "rows": x.shape[0],
                    "hidden_fraction": 1 - observed[0].float().mean().item()}
    with torch.no_grad():  # an untimed warm-up: first-call costs (lazy kernel loading) were
        inpaint(model0, x[:2], observed[:2], n_samples=1,  # charged to the first timing
                generator=torch.Generator(device=device).manual_seed(args.seed))
    for label, context in (("as_called", contextlib.nullcontext), ("no_grad", torch.no_grad)):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        reset_peak(device)
        try:
            t0 = clock.now()
            with context():
                mean, samples = inpaint(model0, x, observed, n_samples=1, generator=gen)
            seconds = clock.now() - t0
            ok = bool(torch.isfinite(mean).all() and torch.isfinite(samples).all())
            result[label] = {"seconds": seconds, "peak_memory_gb": peak_gb(device),
                             "finite": ok}
            del mean, samples
        except OOM_ERRORS as exc:
            result[label] = {"out_of_memory": str(exc).splitlines()[0]}
    return result


def large_model_case(pixels, k: int, lat: int, args, clock) -> dict:
    """Whether ``K = k`` fits: each phase's peak memory, or the out-of-memory error."""
    device = pixels.device
    phases: dict = {}
    result: dict = {"case": f"K={k}, L={lat}", "k": k, "l": lat, "phases": phases}
    held: dict = {}  # the model, once built; trained in place by the phases (no copies)

    def phase(name, fn):
        reset_peak(device)
        t0 = clock.now()
        try:
            fn()
            phases[name] = {"ok": True, "seconds": clock.now() - t0,
                            "peak_memory_gb": peak_gb(device)}
        except OOM_ERRORS as exc:
            phases[name] = {"ok": False, "out_of_memory": str(exc).splitlines()[0],
                            "peak_memory_gb": peak_gb(device)}
        except Exception as exc:  # noqa: BLE001 - a failure is a result: report it, go on
            phases[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                            "peak_memory_gb": peak_gb(device)}
        return phases[name]["ok"]

    def build():
        held["model"] = start_model(pixels, k, lat, args.seed)

    def log_prob():
        batch = next(iter(DequantisedStream(pixels, args.batch_size, args.seed)))
        with torch.no_grad():
            value = held["model"].log_prob(batch)
        assert bool(torch.isfinite(value).all())

    def em_iteration():
        stream = DequantisedStream(pixels, args.batch_size, args.seed, max_batches=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfa.ConvergenceWarning)
            # min_component_mass=0: one batch leaves most of K components (almost) empty, and
            # re-seeding them would only log a long list.
            EMTrainer(EMConfig(max_iter=1, tol=0.0, batch_size=args.batch_size, init="none",
                               min_component_mass=0.0, progress=False)).fit(held["model"], stream)

    def em_epoch():  # every row once: s/epoch of the larger model (its phase seconds)
        stream = DequantisedStream(pixels, args.batch_size, args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfa.ConvergenceWarning)
            EMTrainer(EMConfig(max_iter=1, tol=0.0, batch_size=args.batch_size, init="none",
                               min_component_mass=0.0, noise_prior_variance=1e-4,
                               progress=False)).fit(held["model"], stream)

    def adam_step():
        stream = DequantisedStream(pixels, args.adam_batch_size, args.seed, max_batches=1)
        # (a stream has no length for the prior's 1/N: the step costs the same without it)
        cfg = SGDConfig(batch_size=args.adam_batch_size, epochs=1, init="none",
                        init_samples=1, patience=0, progress=False, noise_prior_strength=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mfa.ConvergenceWarning)
            SGDTrainer(cfg).fit(held["model"], stream)

    def inpaint_small():
        x = next(iter(DequantisedStream(pixels, 64, args.seed)))
        observed = hidden_centre(pixels.shape[1]).to(device).expand_as(x).contiguous()
        with torch.no_grad():
            mean, _ = inpaint(held["model"], x, observed)
        assert bool(torch.isfinite(mean).all())

    if phase("construct", build):
        result["parameters_gb"] = sum(p.numel() * p.element_size()
                                      for p in held["model"].parameters()) / GB
        for name, fn in (("log_prob_batch", log_prob), ("em_iteration_one_batch", em_iteration),
                         ("adam_step", adam_step), ("inpaint_64_rows", inpaint_small),
                         ("em_epoch", em_epoch)):
            phase(name, fn)
    held.clear()
    reset_peak(device)
    result["fits"] = all(p["ok"] for p in phases.values())
    return result


# ---------------------------------------------------------------------- report


def fmt(value, spec=".3g", none="—") -> str:
    if value is None:
        return none
    return format(value, spec)


def print_em_row(r: dict) -> None:
    if "skipped" in r:
        print(f"  {r['case']:<22} {r['skipped']}")
        return
    print(f"  {r['case']:<22} {r['seconds_per_epoch']:>9.3f} {r['gflops']:>10.1f} "
          f"{r['limit_s']:>9.3f} {r['fraction_of_matmul_rate']:>9.2f} "
          f"{fmt(r['peak_memory_gb'], '.2f'):>9} {r['log_likelihood_pass_s']:>8.3f}  "
          f"{r['train_log_likelihood']:.6g}")


def print_report(res: dict) -> None:
    cfg = res["config"]
    print()
    print(f"device: {res['device_name']}   torch {res['torch']} (CUDA {res['cuda']})   "
          f"mfa {res['mfa']}")
    print(f"shape: N={cfg['n_rows']} D={cfg['features']} K={cfg['components']} "
          f"L={cfg['factors']} batch={cfg['batch_size']}; data uint8 on the device "
          f"({fmt(res.get('data_gb'), '.2f')} GiB), built in {res.get('data_build_s', 0):.2f} s")
    if "matmul" in res:
        m = res["matmul"]
        print(f"\nmatmul [{m['shape'][0]}, {m['shape'][1]}] @ [{m['shape'][1]}, {m['shape'][2]}]"
              f" GFLOP/s: float32 {m['float32']:.1f} | TF32 {m['tf32']:.1f} | "
              f"float64 {m['float64']:.1f}")
    if "tf32_accuracy" in res:
        a = res["tf32_accuracy"]
        s = a["shape"]
        print(f"\nTF32 accuracy against float64 (n={s['n']} D={s['d']} K={s['k']} L={s['l']}):")
        for key, v in a["log_prob"].items():
            print(f"  log_prob {key:<8} max abs error {v['max_abs_error_nats']:.3g} nats, "
                  f"max rel error {v['max_rel_error']:.3g}")
        print(f"  {'EM update':<22} {'ll rel':>9} {'means rel':>10} {'loadings':>9} "
              f"{'noise max rel':>14}")
        for key, v in a["em_update"].items():
            print(f"  {key:<22} {v['log_likelihood_rel_error']:>9.2g} "
                  f"{v['means_rel_error']:>10.2g} {v['loadings_rel_error']:>9.2g} "
                  f"{v['noise_max_rel_error']:>14.2g}")
    if res.get("em"):
        print(f"\nEM, one epoch ({res['em'][0].get('tflop_per_epoch', float('nan')):.3g} TFLOP "
              f"= 4·N·D·K·(L+2)); default stats_dtype = {res['default_stats_dtype']!r}")
        print(f"  {'case':<22} {'s/epoch':>9} {'GFLOP/s':>10} {'limit s':>9} {'fraction':>9} "
              f"{'peak GiB':>9} {'ll pass':>8}  train ll")
        for r in res["em"]:
            print_em_row(r)
    if res.get("adam"):
        print("\nAdam (SGDTrainer), 4·n·D·K·(L+2) flops per step of n rows:")
        for r in res["adam"]:
            if "skipped" in r:
                print(f"  {r['case']:<14} {r['skipped']}")
                continue
            print(f"  {r['case']:<14} batch {r['batch_size']}, {r['steps']}/{r['epoch_steps']} "
                  f"steps: {r['samples_per_s']:.0f} samples/s, {r['gflops']:.1f} GFLOP/s, "
                  f"fraction {r['fraction_of_matmul_rate']:.2f}, epoch ≈ "
                  f"{r['seconds_per_epoch_extrapolated']:.2f} s, peak "
                  f"{fmt(r['peak_memory_gb'], '.2f')} GiB")
    if "init" in res:
        r = res["init"]
        default = next((e for e in res.get("em", []) if e["stats_dtype"] == "auto"
                        and not e["tf32"] and "seconds_per_epoch" in e), None)
        if "seconds" in r:
            epochs = ("" if default is None else
                      f" = {r['seconds'] / default['seconds_per_epoch']:.2f} default EM epochs")
            print(f"\ninitialisation (EMConfig defaults: K-means {r['kmeans_iter']} iterations,"
                  f" {r['complete_iter']} factor-analysis passes) on {r['rows']} rows: "
                  f"{r['seconds']:.2f} s{epochs}, peak {fmt(r['peak_memory_gb'], '.2f')} GiB")
        elif "out_of_memory" in r:
            print(f"\ninitialisation on {r['rows']} rows: OUT OF MEMORY: {r['out_of_memory']}")
    if "inpaint" in res:
        r = res["inpaint"]
        print(f"\ninpaint {r['rows']} rows ({r['hidden_fraction']:.0%} hidden, mean + 1 sample):")
        for label in ("as_called", "no_grad"):
            v = r.get(label, {})
            if "out_of_memory" in v:
                print(f"  {label:<10} OUT OF MEMORY: {v['out_of_memory']}")
            elif v:
                print(f"  {label:<10} {v['seconds']:.3f} s, peak {fmt(v['peak_memory_gb'], '.2f')}"
                      f" GiB, finite {v['finite']}")
    if "large_model" in res:
        r = res["large_model"]
        print(f"\nlarge model {r['case']}: fits = {r['fits']} "
              f"(parameters {fmt(r.get('parameters_gb'), '.2f')} GiB)")
        for name, v in r["phases"].items():
            state = ("ok" if v["ok"] else f"OUT OF MEMORY: {v['out_of_memory']}"
                     if "out_of_memory" in v else f"FAILED: {v['error']}")
            print(f"  {name:<24} {state}, {fmt(v.get('seconds'), '.3f')} s, "
                  f"peak {fmt(v.get('peak_memory_gb'), '.2f')} GiB")
    for message in res["skipped"]:
        print(message)
    print("\ncase wall times (warm-ups included): " + ", ".join(
        f"{name} {sec:.1f} s" for name, sec in res["case_seconds"].items()))
    print(f"total {res['total_s']:.1f} s of a {cfg['budget_s']:.0f} s budget")


# ---------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-rows", type=positive_int, default=162_770)
    p.add_argument("--features", type=positive_int, default=12_288)
    p.add_argument("--components", type=positive_int, default=300)
    p.add_argument("--factors", type=non_negative_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=4096, help="EM rows per batch")
    p.add_argument("--adam-batch-size", type=positive_int, default=1024)
    p.add_argument("--inpaint-rows", type=positive_int, default=256)
    p.add_argument("--large-components", type=positive_int, default=1000)
    p.add_argument("--modes", default=",".join(MODES), help="EM stats_dtype modes to time")
    p.add_argument("--budget-s", type=finite, default=300.0,
                   help="time budget of the whole run; cases that would overrun it are skipped")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a CPU smoke test of the script, < 60 s)")
    p.add_argument("--json", help="write the results here (rewritten after every case)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        # Tiny defaults (explicit options still win): D = 3·8² is an 8×8 RGB image.
        p.set_defaults(n_rows=2048, features=192, components=8, factors=3, batch_size=512,
                       adam_batch_size=256, inpaint_rows=32, large_components=24,
                       budget_s=50.0)
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown stats_dtype {bad}; choose from {list(MODES)}")
    args.modes = modes  # (sizes: checked by their argparse types)
    return args


def main(argv=None) -> dict:
    """Run every case that fits the budget, print the report, return the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    threads = torch.get_num_threads()
    if args.quick and device.type == "cpu":
        # Tiny products: on a shared CPU, OpenMP's spin-waits make extra threads ~100x slower.
        torch.set_num_threads(1)
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(threads)


def run(args, device: torch.device) -> dict:
    budget = Budget(args.budget_s)
    clock = Clock(device)
    res: dict = {
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "mfa": mfa.__version__,
        "commit": commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "default_stats_dtype": EMConfig().stats_dtype,
        "tf32_default": tf32_enabled(),
        "skipped": budget.skipped,
    }

    res["case_seconds"] = {}  # wall time of each case, warm-ups included (plans budgets)
    started = [time.perf_counter()]

    def save(case: str | None = None) -> None:
        """Record ``case``'s wall time and rewrite the JSON (partial results survive a kill)."""
        now = time.perf_counter()
        if case is not None:
            res["case_seconds"][case] = now - started[0]
        started[0] = now
        res["total_s"] = budget.elapsed()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")

    print(f"bench_gpu: {res['device_name']}, torch {res['torch']}, "
          f"N={args.n_rows} D={args.features} K={args.components} L={args.factors}", flush=True)
    n, d, k, lat = args.n_rows, args.features, args.components, args.factors
    t0 = clock.now()
    pixels = make_pixels(n, d, device, args.seed)
    res["data_build_s"] = clock.now() - t0
    res["data_gb"] = pixels.numel() / GB
    model0 = start_model(pixels, k, lat, args.seed)
    save("setup")

    # Peers: the dominant product in each precision.
    repeats = 10 if device.type == "cuda" else 3
    width = k * max(lat, 1)
    rates = {
        "float32": matmul_rate(args.batch_size, d, width, torch.float32, False, device, repeats),
        "tf32": matmul_rate(args.batch_size, d, width, torch.float32, True, device, repeats),
        "float64": matmul_rate(args.batch_size, d, width, torch.float64, False, device, repeats),
    }
    res["matmul"] = {"shape": [args.batch_size, d, width], **rates}
    print(f"matmul GFLOP/s: {rates}", flush=True)
    save("matmul")

    # Priors for cases without a one-batch measurement (generous: an H100 needs far less).
    prior = 0.1 if args.quick else 1.0
    if budget.allows("TF32 accuracy", 20.0 * prior):
        small = (512, 64, 4, 3) if args.quick else (4096, 3072, 20, 10)
        res["tf32_accuracy"] = tf32_accuracy(device, small[1], small[2], small[3], small[0],
                                             args.seed)
        print("TF32 accuracy: done", flush=True)
        save("tf32_accuracy")

    res["em"], res["adam"] = [], []
    for mode in args.modes:
        res["em"].append(em_case(model0, pixels, mode, False, args, budget, clock, rates))
        print_em_row(res["em"][-1])
        save(res["em"][-1]["case"])
    res["adam"].append(adam_case(model0, pixels, False, args, budget, clock, rates))
    print(f"done: {res['adam'][-1]['case']}", flush=True)
    save(res["adam"][-1]["case"])
    res["init"] = init_case(pixels, k, lat, args, budget, clock)
    print("done: initialisation", flush=True)
    save("initialisation")
    if budget.allows("inpaint", 30.0 * prior):
        res["inpaint"] = inpaint_case(model0, pixels, args.inpaint_rows, args, clock)
        print("done: inpaint", flush=True)
        save("inpaint")
    # Five phases of at most a few E-step batches of the larger model, then one EM epoch.
    per_batch = max([r.get("per_batch_s", 0.0) for r in res["em"]] + [0.0])
    batches = 20 + math.ceil(n / args.batch_size)
    large = 10.0 * prior + batches * per_batch * args.large_components / k
    if budget.allows(f"large model K={args.large_components}", large):
        res["large_model"] = large_model_case(pixels, args.large_components, lat, args, clock)
        print(f"done: large model, fits = {res['large_model']['fits']}", flush=True)
        save("large_model")
    # TF32 variants last: they only matter if the accuracy figures above allow TF32.
    # TF32 only where the latent products run in float32 ("auto" is float64 on full-rate
    # float64 GPUs, "precise" keeps the sums in float64 and is timed plainly above).
    for mode in [m for m in args.modes if m in ("centred", "mixed", "float32")]:
        res["em"].append(em_case(model0, pixels, mode, True, args, budget, clock, rates))
        print_em_row(res["em"][-1])
        save(res["em"][-1]["case"])
    res["adam"].append(adam_case(model0, pixels, True, args, budget, clock, rates))
    save(res["adam"][-1]["case"])
    print_report(res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
