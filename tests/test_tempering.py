"""mfa.tempering: the tempered E-step against a dense float64 reference, the step's choice
and its bookkeeping, and EMTrainer's use of it (never a lower validation score)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import DenseMixture, gen, random_data, random_model, random_parameters

import mfa.tempering as tempering
from mfa import MixtureOfFactorAnalyzers, training
from mfa._data_stream import DataSource
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.init import floored_weights
from mfa.m_step import m_step
from mfa.prior_search import log_grid, training_variance
from mfa.priors import QUANTIZATION_VARIANCE, Prior
from mfa.statistics import accumulate_statistics

F64 = torch.float64


@pytest.mark.parametrize("temperature", [1.0, 3.0, 50.0])
def test_tempered_e_step_equals_statistics_of_tempered_dense_posterior(temperature):
    """``e_step(T)`` equals the statistics under ``r ∝ (w_k N(x; μ_k, Σ_k))^(1/T)`` with the
    log-densities from dense float64 covariances (T = 1: the plain E-step)."""
    model = random_model(3, 6, 2, "diagonal", seed=1)
    x = random_data(200, model, seed=2)
    log_joint = DenseMixture.from_model(model).component_log_prob(x)  # [n, K], log w + log N
    resp = torch.softmax(log_joint / temperature, -1)
    ref = accumulate_statistics(model, x, model.component_terms(), resp=resp)
    got = EMTrainer.e_step(model, DataSource(x, model, 64), "float64", temperature)
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-9,
                                   atol=1e-9, msg=name)
    if temperature == 1.0:
        plain = EMTrainer.e_step(model, DataSource(x, model, 64), "float64")
        torch.testing.assert_close(got.sum_xz, plain.sum_xz, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stats_dtype", ["auto", "float32", "precise"])
def test_float32_tempered_e_step_keeps_far_components_shares(stats_dtype):
    """A float32 model whose components lie thousands of nats apart: each row's tempered
    shares (``T = 200``) must come from the log-densities before they are clamped for ``exp``
    (a gap of 1,400 nats is 7 nats at ``T = 200``, not the clamp's 67/200); compared with
    the statistics of a float64 model under dense float64 tempered posteriors."""
    params = random_parameters(3, 8, 2, "diagonal", seed=5, dtype=torch.float32)
    params["means"] = params["means"] * 10.0  # 1,000s of nats apart (unit-scale noise)
    single = MixtureOfFactorAnalyzers.from_parameters(**params)
    double = MixtureOfFactorAnalyzers.from_parameters(
        **{name: value.double() for name, value in params.items()})
    x = random_data(300, double, seed=6, scale=1.0).float().double()  # exact in float32
    log_joint = DenseMixture.from_model(double).component_log_prob(x)  # [n, K]
    assert float((log_joint.amax(-1, keepdim=True) - log_joint).max()) > 1000
    temperature = 200.0
    resp = torch.softmax(log_joint / temperature, -1)
    assert float(resp.min()) < 1e-3 and float((resp > 1e-5).sum(-1).float().mean()) > 1.5
    ref = accumulate_statistics(double, x, double.component_terms(), resp=resp)
    got = EMTrainer.e_step(single, DataSource(x.float(), single, 64), stats_dtype, temperature)
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz"):
        want = getattr(ref, name)
        torch.testing.assert_close(getattr(got, name), want, rtol=2e-4,
                                   atol=2e-4 * float(want.abs().max()), msg=name)


def test_tempered_e_step_refuses_missing_data():
    model = random_model(2, 4, 1, "diagonal", seed=3)
    x = random_data(20, model, seed=4)
    x[0, 1] = math.nan
    source = DataSource(x, model, 8, allow_missing=True)
    with pytest.raises(ValueError, match="tempered E-step needs complete data"):
        EMTrainer.e_step(model, source, "float64", 10.0)


def _digits(n_train=1000, n_val=400):
    from mfa.data import load_dataset

    data = load_dataset("embedded-mnist", dequantize=True, seed=0)
    return data.train[:n_train].double(), data.train[n_train:n_train + n_val].double()


def _strongly_regularised_fit(x, k=20, s0=0.05):
    """A float64 MFA fitted under a strong fixed noise prior (broad components: where the
    tempered step pays on the embedded digits)."""
    model = MixtureOfFactorAnalyzers(k, x.shape[1], 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=15, noise_prior_variance=s0, patience=0, reseed_rounds=0,
                           progress=False)).fit(model, x)
    return model


def _step(model, x, val, **kwargs):
    source = DataSource(x, model, 512)
    validation = DataSource(val, model, 512)
    floor = 1e-6 * (1 + 1e-5) + 1e-30
    before = training.evaluate(model, validation)
    result = tempering.tempered_step(
        model, lambda t: EMTrainer.e_step(model, source, "float64", t), validation,
        Prior(noise_strength=1.0, noise_variance=QUANTIZATION_VARIANCE), before=before,
        lower=QUANTIZATION_VARIANCE, per_decade=4, variance_floor=floor, **kwargs)
    return result, before, source, validation, floor


def test_tempered_step_applied_is_the_map_step_of_its_temperature():
    """On a strongly regularised fit of 1,000 real digits the step pays by many standard
    errors; the model it leaves is exactly the MAP M-step of the tempered statistics at the
    reported (T, s₀), and scores the reported validation log-likelihood."""
    x, val = _digits()
    model = _strongly_regularised_fit(x)
    start = training.clone_params(model)
    result, before, source, validation, floor = _step(model, x, val)
    assert result.applied and result.val_log_likelihood > before + 50
    assert result.val_log_likelihood - before > tempering.MARGIN * result.standard_error
    assert result.temperature > 1.0
    # Rebuild it independently from the starting parameters.
    again = MixtureOfFactorAnalyzers(20, x.shape[1], 3, dtype=F64)
    again.load_state_dict(start)
    stats = EMTrainer.e_step(again, DataSource(x, again, 512), "float64", result.temperature)
    prior = Prior(noise_strength=result.noise_prior_strength,
                  noise_variance=result.noise_prior_variance)
    params = m_step(stats, again, variance_floor=floor, prior=prior)
    for name in ("means", "factor_loadings", "noise_variance"):
        torch.testing.assert_close(getattr(model, name), params[name], rtol=1e-10, atol=1e-12)
    assert training.evaluate(model, validation) == pytest.approx(result.val_log_likelihood,
                                                                 rel=1e-9)


def test_an_applied_step_under_a_weight_prior_leaves_its_map_weights():
    """With a Dirichlet weight prior (``α = 20``) the applied step's weights are the MAP
    weights ``(N_k + α − 1) / (N + K(α − 1))`` of the tempered statistics, as every other
    M-step of the fit computes them (not the plain ``N_k / N``)."""
    x, val = _digits()
    model = _strongly_regularised_fit(x)
    start = training.clone_params(model)
    alpha, k = 20.0, 20
    source, validation = DataSource(x, model, 512), DataSource(val, model, 512)
    result = tempering.tempered_step(
        model, lambda t: EMTrainer.e_step(model, source, "float64", t), validation,
        Prior(noise_strength=1.0, noise_variance=QUANTIZATION_VARIANCE,
              weight_concentration=alpha),
        before=training.evaluate(model, validation), lower=QUANTIZATION_VARIANCE,
        per_decade=4, variance_floor=1e-6 * (1 + 1e-5) + 1e-30)
    assert result.applied
    again = MixtureOfFactorAnalyzers(k, x.shape[1], 3, dtype=F64)
    again.load_state_dict(start)
    mass = EMTrainer.e_step(again, DataSource(x, again, 512), "float64",
                            result.temperature).mass
    expected = (mass + alpha - 1) / (mass.sum() + k * (alpha - 1))
    assert float((expected - mass / mass.sum()).abs().max()) > 1e-3  # the prior matters
    torch.testing.assert_close(model.weights.detach(), expected, rtol=1e-10, atol=1e-12)


def test_a_shuffled_validation_loader_gives_the_step_of_the_tensor():
    """The step subtracts per-row scores of separate passes: a shuffled validation DataLoader
    paired other rows (the standard error of unpaired rows, several times the paired one),
    which refused a step that paid (found on 60 rows of pooled digits: gain 13.9 ± 2.4 by
    the tensor, 5.2 ± 8.1 through the loader, not applied). It is now read in a fixed
    order, and the step is the tensor's."""
    from torch.utils.data import DataLoader, TensorDataset

    x, val = _digits()
    model = _strongly_regularised_fit(x)
    start = training.clone_params(model)
    expected, *_ = _step(model, x, val)
    model.load_state_dict(start)
    loader = DataLoader(TensorDataset(val), batch_size=512, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    source = DataSource(x, model, 512)
    before = training.evaluate(model, val)
    got = tempering.tempered_step(
        model, lambda t: EMTrainer.e_step(model, source, "float64", t),
        DataSource(loader, model, 512, "validation"),
        Prior(noise_strength=1.0, noise_variance=QUANTIZATION_VARIANCE), before=before,
        lower=QUANTIZATION_VARIANCE, per_decade=4, variance_floor=1e-6 * (1 + 1e-5) + 1e-30)
    assert expected.applied
    assert (got.temperature, got.noise_prior_variance, got.applied) == (
        expected.temperature, expected.noise_prior_variance, expected.applied)
    assert got.standard_error == pytest.approx(expected.standard_error, rel=1e-9)


def test_in_fixed_order_pairs_rows_across_passes_or_refuses():
    """The same model against itself over two passes of a shuffling loader: gain 0 and
    standard error 0 in a fixed order (not 0 as shuffled), through shuffle=True, a
    BatchSampler over a RandomSampler, a SubsetRandomSampler and a loader without automatic
    batching (the first version fixed only shuffle=True); the loader's other settings are
    kept; a sampler that draws other rows each pass is refused with what it draws."""
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        RandomSampler,
        SubsetRandomSampler,
        TensorDataset,
    )

    model = random_model(3, 5, 2, seed=4)
    rows = random_data(40, model, seed=5)
    data = TensorDataset(rows)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    first_of = lambda items: torch.stack([item[0] for item in items])  # noqa: E731
    loaders = {
        "shuffle": (DataLoader(data, batch_size=8, shuffle=True, generator=seeded(),
                               collate_fn=first_of), rows),
        "batch sampler": (DataLoader(data, batch_sampler=BatchSampler(
            RandomSampler(data, generator=seeded()), 8, False)), rows),
        "subset": (DataLoader(data, batch_size=8, sampler=SubsetRandomSampler(
            range(10, 40), generator=seeded())), rows[10:]),
        "no batching": (DataLoader(TensorDataset(rows.view(5, 8, 5)), batch_size=None,
                                   shuffle=True, generator=seeded()), rows),
    }
    for name, (loader, expected) in loaders.items():
        shuffled = DataSource(loader, model, 8)
        first, second = (tempering._row_log_probs(model, shuffled) for _ in range(2))
        assert tempering._paired_gain(first, second, False)[1] > 0, name  # (it can fail)
        fixed = shuffled.in_fixed_order()
        assert fixed.iterable.collate_fn is loader.collate_fn, name
        first, second = (tempering._row_log_probs(model, fixed) for _ in range(2))
        assert tempering._paired_gain(first, second, False)[:2] == (0.0, 0.0), name
        torch.testing.assert_close(torch.cat(first), model.log_prob(expected).double(),
                                   msg=name)
    tensor = DataSource(rows, model, 8)
    assert tensor.in_fixed_order() is tensor
    plain = DataSource(DataLoader(data, batch_size=8), model, 8)
    assert plain.in_fixed_order() is plain
    drawn = DataLoader(data, batch_size=8, sampler=RandomSampler(data, replacement=True))
    with pytest.raises(ValueError, match=r"validation is a DataLoader that draws its rows at "
                                         r"random each pass \(RandomSampler: with replacement"):
        DataSource(drawn, model, 8, "validation").in_fixed_order()


def test_tempered_step_strengths_are_candidates_too(monkeypatch):
    """The step's M-step prior strength is chosen with ``T`` and ``s₀``: with one strength
    (16× the fit's) it reports and applies that strength; with the default ones, it reports
    the strength that led the coarse temperatures and what that strength reaches alone (the
    same coarse candidates and the same refinement; the other strength is not refined, so
    alone it may reach more: not on these rows, where it also reaches less). The strengths
    compete on their best scores, so the one-standard-error rule, which moves ``s₀`` within
    the chosen strength afterwards, is off here (``ONE_SE = 0``: it then keeps the best)."""
    x, val = _digits(600, 200)
    model = _strongly_regularised_fit(x, k=8)
    start = training.clone_params(model)
    monkeypatch.setattr(tempering, "MARGIN", 1e12)  # keep the model as it is between runs
    monkeypatch.setattr(tempering, "ONE_SE", 0.0)
    alone = {}
    for factor in tempering.STRENGTHS:
        monkeypatch.setattr(tempering, "STRENGTHS", (factor,))
        alone[factor], *_ = _step(model, x, val)
        assert alone[factor].noise_prior_strength == factor  # the fit's prior has ν = 1
        assert alone[factor].noise_prior_variance == alone[factor].best_noise_prior_variance
    monkeypatch.undo()
    monkeypatch.setattr(tempering, "MARGIN", 1e12)
    monkeypatch.setattr(tempering, "ONE_SE", 0.0)
    both, *_ = _step(model, x, val)
    assert both.val_log_likelihood == alone[both.noise_prior_strength].val_log_likelihood
    assert both.val_log_likelihood == max(r.val_log_likelihood for r in alone.values())
    monkeypatch.setattr(tempering, "MARGIN", 0.0)
    monkeypatch.setattr(tempering, "STRENGTHS", (16.0,))
    result, before, source, validation, floor = _step(model, x, val)
    assert result.applied and result.noise_prior_strength == 16.0
    again = MixtureOfFactorAnalyzers(8, x.shape[1], 3, dtype=F64)
    again.load_state_dict(start)
    stats = EMTrainer.e_step(again, DataSource(x, again, 512), "float64", result.temperature)
    params = m_step(stats, again, variance_floor=floor, prior=Prior(
        noise_strength=16.0, noise_variance=result.noise_prior_variance))
    torch.testing.assert_close(model.noise_variance, params["noise_variance"], rtol=1e-10,
                               atol=1e-12)


def test_one_standard_error_rule_takes_the_strongest_s0_within_one_standard_error(
        monkeypatch):
    """From the best-scoring ``s₀``, the step takes the largest grid value such that it and
    every value between lose at most ``ONE_SE`` standard errors of the paired per-row loss
    against the best on the validation rows, and the next value up loses more: checked with
    dense float64 Gaussians of each candidate's M-step. It reports the chosen value's
    validation score and the best one's ``s₀``."""
    x, val = _digits(600, 200)
    model = _strongly_regularised_fit(x, k=8)
    start = training.clone_params(model)
    monkeypatch.setattr(tempering, "MARGIN", 1e12)  # scored, not applied
    result, before, source, validation, floor = _step(model, x, val)
    best, chosen = result.best_noise_prior_variance, result.noise_prior_variance
    assert chosen > best  # the rule moved on these rows: the checks below bite
    again = MixtureOfFactorAnalyzers(8, x.shape[1], 3, dtype=F64)
    again.load_state_dict(start)
    stats = EMTrainer.e_step(again, DataSource(x, again, 512), "float64", result.temperature)
    grid = log_grid(QUANTIZATION_VARIANCE, float(training_variance(stats).max()), 4)

    def rows(s0):
        prior = Prior(noise_strength=result.noise_prior_strength, noise_variance=s0)
        params = m_step(stats, again, variance_floor=floor, prior=prior)
        weights = floored_weights(prior.weight_counts(stats.mass), F64)
        dense = DenseMixture.from_parameters(weights, params["means"],
                                             params["factor_loadings"],
                                             params["noise_variance"])
        return dense.log_prob(val)

    def loss_and_error(s0):
        loss = reference - rows(s0)
        return float(loss.mean()), float(loss.std() / math.sqrt(loss.numel()))

    reference = rows(best)
    first, last = grid.index(best), grid.index(chosen)
    for s0 in grid[first + 1:last + 1]:
        loss, error = loss_and_error(s0)
        assert loss <= tempering.ONE_SE * error * (1 + 1e-6) + 1e-9, s0
    if last + 1 < len(grid):
        loss, error = loss_and_error(grid[last + 1])
        assert loss > tempering.ONE_SE * error * (1 - 1e-6), grid[last + 1]
    assert float(rows(chosen).mean()) == pytest.approx(result.val_log_likelihood, rel=1e-9)


def test_one_standard_error_rule_off_keeps_the_best(monkeypatch):
    """With ``ONE_SE = 0`` the step keeps the best-scoring ``s₀`` (the rule moves only to a
    candidate that loses nothing, which the search's neighbour check already rules out)."""
    x, val = _digits(600, 200)
    model = _strongly_regularised_fit(x, k=8)
    monkeypatch.setattr(tempering, "MARGIN", 1e12)
    monkeypatch.setattr(tempering, "ONE_SE", 0.0)
    result, *_ = _step(model, x, val)
    assert result.noise_prior_variance == result.best_noise_prior_variance


def test_a_tempered_step_recorded_before_the_rule_still_loads():
    """A checkpoint's step saved without ``best_noise_prior_variance`` (before the rule)."""
    fields = {"temperature": 196.0, "noise_prior_variance": 1e-4, "val_log_likelihood": 1.0,
              "before": 0.5, "standard_error": 0.1, "applied": True,
              "noise_prior_strength": 1.0}
    assert tempering.TemperedStep(**fields).best_noise_prior_variance is None


def test_tempered_step_not_applied_leaves_the_model_bit_for_bit(monkeypatch):
    """Demanding an impossible margin: the best candidate is found, not applied, and the
    model's parameters are exactly the fit's."""
    x, val = _digits(600, 200)
    model = _strongly_regularised_fit(x, k=8)
    start = training.clone_params(model)
    monkeypatch.setattr(tempering, "MARGIN", 1e12)
    result, before, *_ = _step(model, x, val)
    assert not result.applied and result.val_log_likelihood > before
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_paired_gain_is_the_mean_difference_and_its_standard_error():
    g = gen(5)
    new = [torch.randn(30, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)]
    old = [torch.randn(30, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)]
    diff = torch.cat(new) - torch.cat(old)
    mean, error, rows = tempering._paired_gain(new, old, sharded=False)
    assert rows == 50
    assert mean == pytest.approx(float(diff.mean()), rel=1e-12)
    assert error == pytest.approx(float(diff.std()) / math.sqrt(50), rel=1e-9)  # n − 1
    # one row: no standard error (it was 0, and any gain passed the margin)
    mean, error, rows = tempering._paired_gain([diff[:1]], [torch.zeros(1, dtype=F64)], False)
    assert rows == 1 and mean == float(diff[0]) and math.isnan(error)
    # a large gain beside a small spread: Σd² − n·mean² cancelled (46 % off here)
    big = 1e4 + 1e-4 * torch.randn(200, generator=g, dtype=F64)
    mean, error, rows = tempering._paired_gain([big], [torch.zeros(200, dtype=F64)], False)
    assert error == pytest.approx(float(big.std()) / math.sqrt(200), rel=1e-6)


@pytest.mark.parametrize("as_loader", [False, True], ids=["tensor", "loader"])
def test_tempered_step_is_not_applied_on_fewer_validation_rows_than_min_rows(monkeypatch,
                                                                           as_loader):
    """With one validation row the step was applied on any gain (its standard error was 0);
    on held-out rows it then lost 1.7 nats a row in 4 of 5 draws. Below MIN_ROWS it never is,
    whatever the margin (here MARGIN 0, where any higher score would apply it), and it is not
    even tried: no tempered pass over the training rows is spent on it."""
    from torch.utils.data import DataLoader, TensorDataset
    g = gen(4)  # four components of 2 factors, two constant features, few rows each
    means = torch.rand(4, 12, generator=g, dtype=F64)
    loadings = 0.1 * torch.randn(4, 12, 2, generator=g, dtype=F64)
    comp = torch.randint(0, 4, (320,), generator=g)
    z = torch.randn(320, 2, 1, generator=g, dtype=F64)
    x = (means[comp] + (loadings[comp] @ z).squeeze(-1)
         + 0.02 * torch.randn(320, 12, generator=g, dtype=F64))
    x[:, :2] = 0.5
    monkeypatch.setattr(tempering, "MARGIN", 0.0)
    tempered_passes = []
    e_step = EMTrainer.e_step

    def counting(model, source, stats_dtype, temperature=1.0):
        tempered_passes.append(temperature != 1.0)
        return e_step(model, source, stats_dtype, temperature)

    monkeypatch.setattr(EMTrainer, "e_step", staticmethod(counting))
    for n_val in (1, tempering.MIN_ROWS - 1, 60):
        trainer = EMTrainer(EMConfig(max_iter=20, progress=False, reseed_rounds=0))
        model = MixtureOfFactorAnalyzers(4, 12, 2, dtype=F64, generator=gen(5))
        val = x[121:121 + n_val]
        if as_loader:
            val = DataLoader(TensorDataset(val), batch_size=3)
        tempered_passes.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, x[:120], val)
        step = trainer.tempered
        if n_val < tempering.MIN_ROWS:
            assert step is None and not any(tempered_passes), n_val
        else:
            assert any(tempered_passes), n_val
            assert step.val_log_likelihood > step.before, n_val  # it scored higher
            assert step.applied, n_val


def test_paired_gain_scores_rows_with_the_exact_log_density():
    """The step's paired gain scored the validation rows in the plain Woodbury form, which
    under a float32 component with one noise variance at 1e-9 put rows up to 12.5 nats off
    float64; its per-row log-densities now match the dense float64 reference."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(4)
    rows = torch.cat(tempering._row_log_probs(m32, DataSource(x[:500], m32, 128)))
    expected = DenseMixture.from_model(m64).log_prob(x[:500].double())
    assert (rows - expected).abs().max() < 1e-2

def test_em_fit_with_the_tempered_step_never_scores_lower_on_validation(monkeypatch):
    """The same fit with and without the step: identical up to the step, and the step's
    model scores at least as well on the validation rows (it is kept only if better); the
    trainer reports what it tried. Resuming the finished fit from its state keeps the model
    and the step's report without trying the step again (it reloaded the best restart's
    parameters and ran the step and its searches again: `mfa train --resume` of a finished
    default digits run took 6.2 s, now 5.4 s; 44 s under load from two other jobs)."""
    x, val = _digits(800, 300)
    models, trainers = {}, {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = MixtureOfFactorAnalyzers(10, x.shape[1], 3, dtype=F64)
        trainer = EMTrainer(EMConfig(max_iter=8, tempered_step=flag, reseed_rounds=1,
                                     progress=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, x, val)
        models[flag], trainers[flag] = model, trainer
    assert trainers[False].tempered is None
    step = trainers[True].tempered
    assert step is not None
    scores = {flag: training.evaluate(m, DataSource(val, m, 512)) for flag, m in models.items()}
    assert step.before == pytest.approx(scores[False], rel=1e-12)
    assert scores[True] >= scores[False]
    if step.applied:
        assert scores[True] == pytest.approx(step.val_log_likelihood, rel=1e-9)
    else:
        for name, value in models[False].state_dict().items():
            assert torch.equal(value, models[True].state_dict()[name]), name
    # Resume the finished fit: its result is kept, the step is not tried again.
    def tried_again(*args, **kwargs):
        raise AssertionError("the tempered step ran again")

    monkeypatch.setattr("mfa.em.tempered_step", tried_again)
    resumed_trainer = EMTrainer(EMConfig(max_iter=8, tempered_step=True, reseed_rounds=1,
                                         progress=False))
    resumed_trainer.load_state_dict(trainers[True].state_dict())
    resumed = MixtureOfFactorAnalyzers(10, x.shape[1], 3, dtype=F64)
    resumed.load_state_dict(models[True].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        resumed_trainer.fit(resumed, x, val)
    for name, value in models[True].state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # The kept run's s₀ (where the step's search starts) comes back with the state.
    assert resumed_trainer.selected_noise_prior_variance is not None
    assert (resumed_trainer.selected_noise_prior_variance
            == trainers[True].selected_noise_prior_variance)
    assert resumed_trainer.tempered == step


def test_a_second_fit_does_not_report_the_first_fits_step_or_search():
    """A trainer fitted again without validation data (no search, no tempered step) kept
    the first fit's ``tempered`` and ``search_seconds``; both now describe this fit."""
    model = random_model(3, 5, 1, seed=2)
    x = random_data(300, model, seed=3)
    trainer = EMTrainer(EMConfig(max_iter=3, progress=False, reseed_rounds=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MixtureOfFactorAnalyzers(3, 5, 1).double(), x[:240], x[240:])
        assert trainer.tempered is not None and trainer.search_seconds is not None
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
        trainer.fit(MixtureOfFactorAnalyzers(3, 5, 1).double(), loader)
    assert trainer.tempered is None and trainer.search_seconds is None
    assert trainer.selection_seconds is None


def test_the_tempered_steps_searches_log_below_info(caplog):
    """Its ten or so s₀ searches logged "noise prior variance X chosen" at INFO after the
    fit's own, in train.log too, though they choose no prior of the fit; its own summary line
    stays at INFO."""
    x, val = _digits(n_train=300, n_val=100)
    model = _strongly_regularised_fit(x, k=5)
    with caplog.at_level("INFO", logger="mfa"):
        _step(model, x, val)
    assert not [r for r in caplog.records if r.name == "mfa.prior_search"
                and r.levelno >= 20]
    assert any(r.name == "mfa.tempering" and r.levelno == 20 for r in caplog.records)


def test_a_step_without_gain_logs_no_nan_standard_error(caplog):
    """Where no candidate beat the fit there is no paired gain: its line read "standard
    error nan", which looked like a numerical failure."""
    x, val = _digits(n_train=300, n_val=100)
    model = _strongly_regularised_fit(x, k=5)
    source, validation = DataSource(x, model, 512), DataSource(val, model, 512)
    with caplog.at_level("INFO", logger="mfa"):
        result = tempering.tempered_step(
            model, lambda t: EMTrainer.e_step(model, source, "float64", t), validation,
            Prior(noise_strength=1.0, noise_variance=QUANTIZATION_VARIANCE), before=1e30,
            lower=QUANTIZATION_VARIANCE, per_decade=4, variance_floor=1e-6)
    assert not result.applied and math.isnan(result.standard_error)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mfa.tempering"]
    assert "no gain over the fit (not applied)" in line and "nan" not in line


def test_the_background_models_fit_logs_one_line_at_info(caplog):
    """mfa outliers --score likelihood_ratio printed the background fit's EM and search
    lines as if they were the run model's."""
    from mfa.outliers import PatchBackground

    x, _ = _digits(n_train=200, n_val=0)
    with caplog.at_level("INFO", logger="mfa"):
        PatchBackground.fit(x.float(), (1, 28, 28), max_iter=2)
    lines = [r for r in caplog.records if r.levelno >= 20]
    assert [r.name for r in lines] == ["mfa.outliers"]
    assert "fitting the background model" in lines[0].getMessage()


def test_warm_starts_come_from_the_nearest_temperature_or_the_other_strength():
    """Each search starts at its strength's s₀ of the nearest temperature tried (between two
    at the same distance, their geometric mean); a strength's first search at the other
    strength's s₀ of that temperature times the strengths' ratio; the first of all at the
    fit's own s₀."""
    warm = tempering._warm_start
    assert warm({}, 196.0, 1.0, 3e-4) == 3e-4
    assert warm({}, 196.0, 1.0, None) is None
    tried = {(196.0, 1.0): (10.0, 4e-4)}
    assert warm(tried, 196.0, 16.0, 3e-4) == pytest.approx(4e-4 / 16, rel=1e-12)
    tried |= {(196.0, 16.0): (9.0, 2e-5), (784.0, 1.0): (11.0, 1e-4),
              (3136.0, 1.0): (12.0, 1e-6)}
    assert warm(tried, 784.0 * 2 ** 0.5, 1.0, 3e-4) == pytest.approx(1e-4, rel=1e-12)
    assert warm(tried, 392.0, 1.0, 3e-4) == pytest.approx(2e-4, rel=1e-12)  # √(4e-4·1e-4)
    assert warm(tried, 1568.0, 1.0, 3e-4) == pytest.approx(1e-5, rel=1e-12)  # √(1e-4·1e-6)
    assert warm(tried, 6272.0, 1.0, 3e-4) == pytest.approx(1e-6, rel=1e-12)
    assert warm(tried, 784.0, 16.0, 3e-4) == pytest.approx(2e-5, rel=1e-12)  # its own strength's


def test_every_strength_that_beats_the_fit_is_refined_around_its_own_best(monkeypatch):
    """After D/4, D and 4D at both strengths (one pass), each strength whose best coarse
    candidate beats the fit is tried at T/2 and 2T of its own best temperature (one more
    pass for all of them), strength by strength; when no candidate beats the fit, nothing
    more. Refining the leader alone missed the best candidate on 3,000 Fashion-MNIST rows."""
    x, val = _digits(600, 200)
    model = _strongly_regularised_fit(x, k=8)
    monkeypatch.setattr(tempering, "MARGIN", 1e12)  # keep the model as it is
    searches = []
    search = tempering.choose_noise_variance

    def recording(model, stats, validation, prior, **kwargs):
        s0, scored = search(model, stats, validation, prior, **kwargs)
        searches.append((prior.noise_strength, max(v for _, v in scored)))
        return s0, scored

    monkeypatch.setattr(tempering, "choose_noise_variance", recording)
    temperatures = []
    source = DataSource(x, model, 512)

    def e_step(t):
        temperatures.append(list(t))
        return EMTrainer.e_step(model, source, "float64", t)

    validation = DataSource(val, model, 512)
    before = training.evaluate(model, validation)
    kwargs = dict(lower=QUANTIZATION_VARIANCE, per_decade=4,
                  variance_floor=1e-6 * (1 + 1e-5) + 1e-30)
    prior = Prior(noise_strength=1.0, noise_variance=QUANTIZATION_VARIANCE)
    result = tempering.tempered_step(model, e_step, validation, prior, before=before, **kwargs)
    d = x.shape[1]
    assert result.val_log_likelihood > before
    assert temperatures[0] == [d / 4, d, 4 * d]  # one pass for the three
    assert [s for s, _ in searches[:6]] == [1.0, 16.0] * 3
    plan: dict[float, list[float]] = {}
    for strength in (1.0, 16.0):
        mine = [i for i in range(6) if searches[i][0] == strength]
        best = max(mine, key=lambda i: searches[i][1])
        if searches[best][1] > before:
            top = temperatures[0][best // 2]
            for t in (top / 2, top * 2):
                plan.setdefault(t, []).append(strength)
    assert len({s for ss in plan.values() for s in ss}) == 2  # both beat the fit: both refined
    assert temperatures[1:] == [list(plan)]  # one pass for the refinement
    assert [s for s, _ in searches[6:]] == [s for t in plan for s in plan[t]]
    temperatures.clear()
    searches.clear()
    tempering.tempered_step(model, e_step, validation, prior, before=math.inf, **kwargs)
    assert temperatures == [[d / 4, d, 4 * d]] and len(searches) == 6
