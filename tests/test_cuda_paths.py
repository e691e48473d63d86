"""Every trainer and inference path on CUDA against the CPU (or, where the two draw different
random numbers, against the model's exact moments). Skipped where no CUDA device is present,
as in ``tests/test_cuda.py``, which this extends: that file covers float64 EM, an Adam smoke
run, ``log_prob``/``conditional_mean`` and generator reproducibility; this one adds float32
EM in each precision mode, streamed CPU batches, the K-means start, Adam against the CPU
trajectory, and the remaining inference paths (responsibilities, the model's outlier scores
(``score_outliers``; the ``mfa.outliers`` scores run in ``tests/test_cuda_workflow.py``),
marginals, conditionals, masked likelihoods, inpainting, KDE, metrics, sampling moments).

TF32 is switched off for the comparisons (a fixture), so float32 products on the GPU are
IEEE float32 like the CPU's; ``benchmarks/bench_gpu.py`` measures what TF32 costs in accuracy.
``MFA_CUDA_TEST_DEVICE=cpu`` runs them CPU against CPU (a dry run of the test code only).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import CUDA_TEST_DEVICE, cuda_test_marks, gen, random_model
from torch.utils.data import DataLoader, TensorDataset

from mfa import (
    ConvergenceWarning,
    EMConfig,
    EMTrainer,
    MixtureOfFactorAnalyzers,
    SGDConfig,
    SGDTrainer,
    mean_log_likelihood,
    select_kde_bandwidth,
)
from mfa.inference import inpaint

try:  # the KDE constructor's home after the package restructuring
    from mfa.kde import kde
except ImportError:  # before it: a classmethod
    kde = MixtureOfFactorAnalyzers.kde

DEVICE = CUDA_TEST_DEVICE
pytestmark = cuda_test_marks("no_tf32")
F64 = torch.float64



def _is_on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def _device_generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _on(model: MixtureOfFactorAnalyzers) -> MixtureOfFactorAnalyzers:
    return copy.deepcopy(model).to(DEVICE)  # Module.to moves in place: copy first


def _image_like(n=1500, d=24, k=3, lat=2, seed=0, dtype=torch.float32):
    """Rows in about [0, 1] from a model whose loadings explain most of the variance."""
    g = gen(seed)
    weights = torch.arange(k, 0, -1, dtype=F64)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        weights / weights.sum(),
        0.2 + 0.6 * torch.rand(k, d, generator=g, dtype=F64),
        0.15 * torch.randn(k, d, lat, generator=g, dtype=F64),
        torch.full((k, d), 2e-3, dtype=F64),
    )
    x, _ = truth.sample(n, generator=g)
    return x.to(dtype)


def _em(model, data, device, **overrides):
    # No re-seeding round: its discrete choice (which components) is compared on its own in
    # test_reseed_round_on_cuda_matches_cpu, in float64.
    cfg = dict(max_iter=3, tol=0.0, progress=False, device=device, batch_size=256, init="none",
               reseed_rounds=0)
    cfg.update(overrides)
    trainer = EMTrainer(EMConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, data)
    return trainer


def _kmeans_start(x):
    """A K-means + factor-analysis start made once on the CPU (CUDA and CPU generators draw
    different numbers), in ``x``'s dtype."""
    start = MixtureOfFactorAnalyzers(3, x.shape[1], 2, dtype=x.dtype)
    _em(start, x, "cpu", max_iter=0, init="kmeans")
    return start


# ---------------------------------------------------------------------- trainers


@pytest.mark.parametrize(
    "stats_dtype", ["auto", "float64", "precise", "centred", "mixed", "centred32", "float32"])
def test_float32_em_on_cuda_matches_cpu(stats_dtype):
    """A float32 model exercises the mode-specific products (a float64 model runs every
    mode in float64); the same start on both devices, three iterations, one mode: "auto"
    runs on the device and the CPU runs the mode it stands for there ("float64" on GPUs with
    full-rate float64, "centred" on others: mfa.precision.resolve_stats_dtype), which the
    CPU's "auto" would not (it compared "float64" on the GPU with "centred"). No tempered
    step: its decision sits within float32 rounding of its threshold on these rows (on the
    CPU, changing batch_size alone flipped it in four of the five float32 modes, and so did
    "centred" against "float64", moving the means by 0.03; without the step those two
    agree to 6e-8); test_tempered_e_step_and_step_on_cuda_match_cpu compares it."""
    from mfa.precision import resolve_stats_dtype

    x = _image_like()
    start = _kmeans_start(x)
    fitted = []
    on_device = resolve_stats_dtype(stats_dtype, DEVICE, torch.float32)
    for device, mode in (("cpu", on_device), (DEVICE, stats_dtype)):
        model = copy.deepcopy(start)
        trainer = _em(model, x.to(device), device, stats_dtype=mode, tempered_step=False)
        assert model.means.device.type == torch.device(device).type
        fitted.append((model.cpu(), [h["train_log_likelihood"] for h in trainer.history]))
    (cpu, cpu_ll), (cuda, cuda_ll) = fitted
    assert cuda_ll == pytest.approx(cpu_ll, rel=1e-5)
    for name in ("weights", "means", "factor_loadings", "noise_variance"):
        torch.testing.assert_close(getattr(cuda, name), getattr(cpu, name), rtol=2e-3, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_em_streams_cpu_batches_to_a_cuda_model():
    """A DataLoader of CPU rows is moved batch by batch: the same fit as a device tensor."""
    x = _image_like(dtype=F64)
    start = _kmeans_start(x)
    loader = DataLoader(TensorDataset(x), batch_size=256, shuffle=False)
    streamed, resident = _on(start), _on(start)
    # A fixed prior and no hold-out: "auto" and patience would hold out val_fraction of the
    # tensor's rows (a DataLoader's rows cannot be split).
    fixed = dict(noise_prior_variance=1e-4, val_fraction=0.0)
    t1 = _em(streamed, loader, DEVICE, **fixed)
    t2 = _em(resident, x.to(DEVICE), DEVICE, **fixed)
    assert _is_on_device(streamed.means)
    assert [h["train_log_likelihood"] for h in t1.history] == pytest.approx(
        [h["train_log_likelihood"] for h in t2.history], rel=1e-12)
    torch.testing.assert_close(streamed.factor_loadings, resident.factor_loadings)


def test_reseed_round_on_cuda_matches_cpu():
    """The re-seeding round (mfa.pruning: the harmful set from validation log-joints, the
    split, EM again) on a float64 model: the same history and parameters on both devices."""
    x = _image_like(n=300, dtype=F64)
    train, val = x[:60], x[60:]
    start = MixtureOfFactorAnalyzers(6, x.shape[1], 2, dtype=F64)
    _em(start, train, "cpu", max_iter=0, init="kmeans")
    fitted = []
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(start).to(device)
        trainer = EMTrainer(EMConfig(max_iter=30, tol=0.0, progress=False, device=device,
                                     init="none", patience=2, noise_prior_strength=0.0,
                                     search_warmup=0, reseed_rounds=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, train.to(device), validation=val.to(device))
        fitted.append((model.cpu(), trainer.history))
    (cpu, cpu_h), (cuda, cuda_h) = fitted
    assert {h["run"] for h in cpu_h} == {0, 1}  # the round ran
    assert [(h["run"], h["iteration"]) for h in cuda_h] == [
        (h["run"], h["iteration"]) for h in cpu_h]
    for name in ("weights", "means", "factor_loadings", "noise_variance"):
        torch.testing.assert_close(getattr(cuda, name), getattr(cpu, name), rtol=1e-6,
                                   atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("stats_dtype", ["float64", "centred"])
def test_tempered_e_step_and_step_on_cuda_match_cpu(stats_dtype):
    """The tempered E-step (mfa.tempering) on both devices: the same statistics, and the
    tempered step's choice and resulting parameters (float32 model: the centred mode's dense
    chunks, as tempered responsibilities are soft)."""
    from mfa._data_stream import DataSource
    from mfa.priors import QUANTIZATION_VARIANCE, Prior
    from mfa.tempering import tempered_step
    from mfa.training import evaluate

    dtype = F64 if stats_dtype == "float64" else torch.float32
    x = _image_like(n=400, dtype=dtype)
    train, val = x[:300], x[300:]
    start = _kmeans_start(train)
    results = []
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(start).to(device)
        source = DataSource(train.to(device), model, 128)
        validation = DataSource(val.to(device), model, 128)
        stats = EMTrainer.e_step(model, source, stats_dtype, 50.0)
        step = tempered_step(
            model, lambda t, m=model, s=source: EMTrainer.e_step(m, s, stats_dtype, t),
            validation, Prior(1.0, QUANTIZATION_VARIANCE), before=evaluate(model, validation),
            lower=QUANTIZATION_VARIANCE, per_decade=4, variance_floor=1.00002e-6)
        results.append((stats, step, model.cpu()))
    (cpu_stats, cpu_step, cpu), (cuda_stats, cuda_step, cuda) = results
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_zz"):
        torch.testing.assert_close(getattr(cuda_stats, name).cpu(), getattr(cpu_stats, name),
                                   **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert (cuda_step.temperature, cuda_step.applied) == (cpu_step.temperature,
                                                          cpu_step.applied)
    for name in ("means", "noise_variance"):
        torch.testing.assert_close(getattr(cuda, name), getattr(cpu, name), rtol=2e-3,
                                   atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_kmeans_start_on_cuda_is_seeded_and_em_climbs():
    """The initialisation draws on the device: same seed, same fit (up to rounding: Lloyd's
    ``index_add_`` uses atomics on CUDA, whose summation order varies); EM never descends."""
    x = _image_like(dtype=F64).to(DEVICE)
    runs = []
    for _ in range(2):
        model = MixtureOfFactorAnalyzers(3, 24, 2, dtype=F64, device=DEVICE)
        trainer = _em(model, x, DEVICE, init="kmeans", max_iter=5, seed=7)
        runs.append((model, [h["train_log_likelihood"] for h in trainer.history]))
    (a, lls), (b, lls_b) = runs
    assert lls == pytest.approx(lls_b, rel=1e-10)
    torch.testing.assert_close(a.means, b.means, rtol=1e-8, atol=1e-10)
    assert all(later >= earlier - 1e-9 for earlier, later in zip(lls, lls[1:], strict=False))


def test_adam_on_cuda_follows_the_cpu_trajectory():
    """The split and the shuffling come from a CPU generator, so both devices see the same
    minibatches: float64 Adam from the same start takes the same steps. The start is far from
    the optimum: near it, gradients are differences of large terms and rounding could flip
    the sign of Adam's first (sign-like) steps."""
    x = _image_like(n=800, dtype=F64)
    start = random_model(3, 24, 2, seed=2)
    fitted = []
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(start)
        trainer = SGDTrainer(SGDConfig(epochs=2, batch_size=128, lr=1e-2, init="none",
                                       patience=0, progress=False, device=device))
        trainer.fit(model, x.to(device))
        assert model.loc.device.type == torch.device(device).type
        fitted.append((model.cpu(), [h["val_log_likelihood"] for h in trainer.history]))
    (cpu, cpu_val), (cuda, cuda_val) = fitted
    assert cuda_val == pytest.approx(cpu_val, rel=1e-9)
    for name, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[name], value, rtol=1e-6, atol=1e-9)


def test_float32_adam_step_on_cuda_matches_cpu():
    """One float32 Adam epoch (the precision people train in) agrees to float32 accuracy; a
    sign flip in a step would show as a difference of ~2·lr = 1e-2."""
    x = _image_like(n=600)
    start = random_model(3, 24, 2, seed=3, dtype=torch.float32)
    out = []
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(start)
        SGDTrainer(SGDConfig(epochs=1, batch_size=200, init="none", patience=0,
                             progress=False, device=device)).fit(model, x.to(device))
        out.append(model.cpu())
    for name in ("means", "factor_loadings", "noise_variance", "weights"):
        torch.testing.assert_close(getattr(out[1], name), getattr(out[0], name), rtol=1e-4,
                                   atol=1e-4)


def _with_missing(x: torch.Tensor, rate: float = 0.1, seed: int = 4) -> torch.Tensor:
    """``x`` with a seeded ``rate`` of its entries NaN (missing), no row wholly missing."""
    hidden = torch.rand(x.shape, generator=gen(seed)) < rate
    hidden[:, 0] = False
    return x.masked_fill(hidden.to(x.device), float("nan"))


def test_em_and_adam_with_missing_entries_on_cuda_match_cpu():
    """The observed-data E-step (mfa.missing: per-row observed sets, its float64 products)
    and Adam's observed-data loss, float64, from one start: the same fit on both devices."""
    x = _with_missing(_image_like(n=600, dtype=F64))
    start = random_model(3, 24, 2, seed=5)
    em, adam = [], []
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(start)
        trainer = _em(model, x.to(device), device, missing="allow")
        em.append((model.cpu(), [h["train_log_likelihood"] for h in trainer.history]))
        model = copy.deepcopy(start)
        SGDTrainer(SGDConfig(epochs=2, batch_size=200, lr=1e-2, init="none", patience=0,
                             missing="allow", progress=False, device=device)).fit(
            model, x.to(device))
        adam.append(model.cpu())
    (cpu, cpu_ll), (cuda, cuda_ll) = em
    assert cuda_ll == pytest.approx(cpu_ll, rel=1e-9)
    for fitted_cpu, fitted_cuda in ((cpu, cuda), tuple(adam)):
        for name, value in fitted_cpu.state_dict().items():
            torch.testing.assert_close(fitted_cuda.state_dict()[name], value, rtol=1e-6,
                                       atol=1e-9)


def test_float32_e_step_with_an_ill_conditioned_component_on_cuda_matches_float64():
    """A float32 model with one noise variance at 1e-9 under loadings of size 1: that
    component's share of the E-step is taken in float64 (mfa.exact_components, index_add_
    into the chunk's sums), on CUDA as on the CPU, in every mode."""
    from helpers import heywood_float32_models

    from mfa._data_stream import DataSource
    from mfa.e_step import streamed_e_step

    m32, m64, x = heywood_float32_models(4)
    ref = streamed_e_step(m64, DataSource(x.double(), m64, 512), "float64")
    on_device = _on(m32)
    for mode in ("float64", "precise", "centred", "mixed", "centred32", "float32"):
        got = streamed_e_step(on_device, DataSource(x.to(DEVICE), on_device, 512), mode)
        for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz", "log_likelihood"):
            value, expected = getattr(got, name).cpu(), getattr(ref, name)
            error = (value - expected).abs().max() / expected.abs().max()
            assert error < 1e-5, (mode, name, error.item())


# ---------------------------------------------------------------------- inference


@pytest.mark.parametrize("noise,n_factors", [("diagonal", 3), ("isotropic", 3), ("diagonal", 0)])
def test_densities_on_cuda_match_cpu(noise, n_factors):
    model = random_model(4, 10, n_factors, noise, seed=4)
    x = torch.randn(300, 10, generator=gen(5), dtype=F64) * 2
    cuda, xc = _on(model), x.to(DEVICE)
    with torch.no_grad():
        for method in ("component_log_prob", "log_prob", "responsibilities", "score_outliers"):
            got = getattr(cuda, method)(xc)
            assert _is_on_device(got)
            torch.testing.assert_close(got.cpu(), getattr(model, method)(x), rtol=1e-10,
                                       atol=1e-10, msg=lambda m, f=method: f"{f}: {m}")
        assert torch.equal(cuda.predict(xc).cpu(), model.predict(x))
    assert mean_log_likelihood(cuda, x, batch_size=64) == pytest.approx(
        mean_log_likelihood(model, x), rel=1e-12)  # CPU rows streamed to the device


@pytest.mark.parametrize("scale, tier", [(200.0, "refine"), (600.0, "precise")])
def test_float32_far_means_use_the_precise_quadratic_on_cuda(scale, tier):
    """Components far apart relative to their noise would lose ~eps·Σ(μ−c)²/d nats to the
    expanded quadratic form in float32 (≈ 3 at scale 200, ≈ 30 at 600): the near-top entries
    are recomputed directly (``refine``) or the whole form runs in float64 (``precise``)."""
    g = gen(6)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((3,), 1 / 3, dtype=F64),
        scale * torch.randn(3, 16, generator=g, dtype=F64),
        torch.zeros(3, 16, 0, dtype=F64),
        torch.full((3, 16), 1e-2, dtype=F64),
    )
    x, _ = truth.sample(200, generator=g)
    reference = truth.log_prob(x)
    model = _on(truth).float()
    assert getattr(model.component_terms(), tier)
    with torch.no_grad():
        got = model.log_prob(x.float().to(DEVICE)).cpu().double()
    assert (got - reference).abs().max() < 0.05


def test_float32_residual_form_on_cuda_matches_float64():
    """Noise at the quantisation level under loadings that explain most of the variance: the
    Woodbury subtraction cancels ~10⁶-sized terms; the near-top entries' residual form (on
    CUDA: gathered loadings, no per-component loop) keeps float32 within 0.05 nats."""
    g = gen(7)
    k, d, lat = 3, 200, 4
    params = [torch.full((k,), 1 / 3, dtype=F64), torch.rand(k, d, generator=g, dtype=F64),
              0.3 * torch.randn(k, d, lat, generator=g, dtype=F64),
              torch.full((k, d), 1.3e-6, dtype=F64)]
    truth = MixtureOfFactorAnalyzers.from_parameters(*(t.float().double() for t in params))
    x, _ = truth.sample(300, generator=g)
    x = x.float()
    reference = truth.log_prob(x.double())
    model = _on(truth).float()
    with torch.no_grad():
        got = model.log_prob(x.to(DEVICE)).cpu().double()
    assert (got - reference).abs().max() < 0.05


def test_marginal_and_condition_on_cuda_match_cpu():
    model = random_model(3, 8, 2, seed=8)
    cuda = _on(model)
    features = [6, 1, 3]
    x = torch.randn(50, 3, generator=gen(9), dtype=F64)
    with torch.no_grad():
        marg = cuda.marginal(features)
        assert _is_on_device(marg.means)
        torch.testing.assert_close(marg.log_prob(x.to(DEVICE)).cpu(),
                                   model.marginal(features).log_prob(x), rtol=1e-10, atol=1e-10)
        values = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
        cond_cpu = model.condition(features, values)
        cond_cuda = cuda.condition(features, values.to(DEVICE))
        h = torch.randn(40, 5, generator=gen(10), dtype=F64)
        torch.testing.assert_close(cond_cuda.log_prob(h.to(DEVICE)).cpu(), cond_cpu.log_prob(h),
                                   rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cond_cuda.weights.cpu(), cond_cpu.weights, rtol=1e-9,
                                   atol=1e-12)


def test_masked_inference_on_cuda_matches_cpu():
    model = random_model(4, 12, 3, seed=11)
    x = torch.randn(120, 12, generator=gen(12), dtype=F64)
    observed = torch.rand(120, 12, generator=gen(13)) < 0.6
    observed[0] = False  # nothing observed: log p = 0, the mean is the prior mean
    observed[1] = True  # everything observed: log p is the full density
    cuda, xc, oc = _on(model), x.to(DEVICE), observed.to(DEVICE)
    with torch.no_grad():
        lp = cuda.observed_log_prob(xc, oc).cpu()
        torch.testing.assert_close(lp, model.observed_log_prob(x, observed), rtol=1e-10,
                                   atol=1e-10)
        assert lp[0] == 0 and lp[1] == pytest.approx(model.log_prob(x[1]).item(), rel=1e-10)
        mean, samples = inpaint(cuda, xc, oc, n_samples=2, generator=_device_generator(0))
    assert _is_on_device(mean) and samples.shape == (2, 120, 12) and _is_on_device(samples)
    torch.testing.assert_close(mean.cpu(), model.conditional_mean(x, observed), rtol=1e-10,
                               atol=1e-10)
    assert torch.equal(samples[:, observed.to(DEVICE)],
                       xc[oc].expand(2, -1))  # observed entries copied through


def test_kde_on_cuda_matches_cpu():
    train = torch.randn(200, 6, generator=gen(14), dtype=F64)
    val = torch.randn(80, 6, generator=gen(15), dtype=F64)
    kde_cpu = kde(train, 0.7)
    kde_cuda = kde(train.to(DEVICE), 0.7)
    assert _is_on_device(kde_cuda.means)
    with torch.no_grad():
        torch.testing.assert_close(kde_cuda.log_prob(val.to(DEVICE)).cpu(), kde_cpu.log_prob(val),
                                   rtol=1e-10, atol=1e-10)
    candidates = [0.2, 0.5, 1.0, 2.0]
    best_cpu, scores_cpu = select_kde_bandwidth(train, val, candidates)
    best_cuda, scores_cuda = select_kde_bandwidth(train.to(DEVICE), val.to(DEVICE), candidates)
    assert best_cuda == best_cpu
    torch.testing.assert_close(scores_cuda.cpu(), scores_cpu, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- sampling on the device


def _mixture_moments(model: MixtureOfFactorAnalyzers):
    """Exact mean [D] and covariance [D, D] of the mixture (float64, dense: D is small)."""
    w, mu = model.weights.double(), model.means.double()
    a, d = model.factor_loadings.double(), model.noise_variance.double()
    covs = a @ a.mT + torch.diag_embed(d)  # [K, D, D]
    mean = w @ mu
    second = (w.view(-1, 1, 1) * (covs + mu.unsqueeze(-1) * mu.unsqueeze(-2))).sum(0)
    return mean, second - torch.outer(mean, mean)


def test_samples_drawn_on_cuda_have_the_model_moments():
    model = _on(random_model(3, 5, 2, seed=16))
    n = 40_000
    x, comp = model.sample(n, generator=_device_generator(3))
    assert _is_on_device(x) and _is_on_device(comp)
    mean, cov = _mixture_moments(model)
    se = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    # Sample covariance: a generous bound, 5 standard errors of a variance ≈ 5·√(2/n)·σ².
    scale = cov.diagonal().sqrt()
    corr_err = (torch.cov(x.T) - cov) / torch.outer(scale, scale)
    assert corr_err.abs().max() < 5 * (2 / n) ** 0.5
    freq = torch.bincount(comp, minlength=3).double() / n
    w = model.weights
    assert ((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()


def test_conditional_samples_on_cuda_average_to_the_conditional_mean():
    model = _on(random_model(3, 6, 2, seed=17))
    row = torch.randn(1, 6, generator=gen(18), dtype=F64).to(DEVICE)
    observed = torch.tensor([[True, False, True, False, False, True]], device=DEVICE)
    n = 20_000
    rows, masks = row.expand(n, -1).contiguous(), observed.expand(n, -1).contiguous()
    with torch.no_grad():
        draws = model.conditional_sample(rows, masks, _device_generator(4))
        mean = model.conditional_mean(row, observed)[0]
    assert torch.equal(draws[:, observed[0]], rows[:, observed[0]])
    hidden = ~observed[0]
    se = draws[:, hidden].std(0) / n**0.5
    assert ((draws[:, hidden].mean(0) - mean[hidden]).abs() < 5 * se).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_mask_on_another_cuda_device_is_refused_by_name():
    """The mask check compared the device type only: a mask on cuda:1 for a model on cuda:0
    got past it and failed inside torch."""
    model = random_model(2, 4, 1, seed=160).to("cuda:0")
    x = torch.zeros(3, 4, dtype=model.dtype, device="cuda:0")
    observed = torch.ones(3, 4, dtype=torch.bool, device="cuda:1")
    with pytest.raises(ValueError, match="observed is on device cuda:1 but the model is on"):
        model.conditional_mean(x, observed)
