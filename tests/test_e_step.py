"""mfa.e_step: the streamed pass equals one batch's statistics, and is EMTrainer.e_step."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import random_data, random_model

from mfa import MixtureOfFactorAnalyzers, statistics
from mfa._data_stream import DataSource
from mfa.e_step import streamed_e_step
from mfa.em import EMTrainer
from mfa.statistics import accumulate_statistics


def test_streamed_e_step_equals_one_batch_and_is_the_trainers():
    model = random_model(3, 5, 2, "diagonal", seed=8)
    x = random_data(150, model, seed=9)
    got = streamed_e_step(model, DataSource(x, model, 40), "float64")
    ref = accumulate_statistics(model, x, model.component_terms())
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz", "log_likelihood"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-10,
                                   atol=1e-10, msg=name)
    assert EMTrainer.e_step is streamed_e_step


def test_capacitance_condition_is_the_condition_number_of_the_dense_capacitance():
    from helpers import random_parameters

    from mfa._terms import capacitance_condition

    p = random_parameters(3, 7, 3, seed=2)
    a, d = p["factor_loadings"], p["noise_variance"]
    dense = torch.eye(3, dtype=torch.float64) + a.mT @ torch.diag_embed(1 / d) @ a
    torch.testing.assert_close(capacitance_condition(a.float(), d.float()),
                               torch.linalg.cond(dense), rtol=1e-5, atol=0)
    assert torch.equal(capacitance_condition(a[..., :0], d), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["auto", "float32", "mixed", "precise", "centred32",
                                  "float64"])
@pytest.mark.parametrize("seed", [4, 7])
def test_float32_e_step_with_an_ill_conditioned_component_matches_float64(mode, seed):
    """One noise variance at 1e-9 under loadings of size 1: every mode's sums were wrong
    (measured: the mass 1.5× off, Σ r E[z]E[z]ᵀ 130×, log p 3.5 nats a row). That
    component's share is now taken in float64 (mfa.exact_components), the rest in the mode's
    precision, without a warning: every sum is within float32's rounding of the float64
    copy's (measured: at most 3.3e-6 of each sum's largest entry)."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = streamed_e_step(m32, DataSource(x, m32, 512), mode)
    ref = streamed_e_step(m64, DataSource(x.double(), m64, 512), "float64")
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz", "log_likelihood"):
        value, expected = getattr(got, name), getattr(ref, name)
        assert value.dtype == torch.float64, name
        error = (value - expected).abs().max() / expected.abs().max()
        assert error < 1e-5, (name, error.item())


def test_ill_conditioned_share_is_exact_in_every_chunk_form():
    """The ill component's share matches float64 with tempered responsibilities too, and is
    the same split over several chunks of one batch."""
    from helpers import heywood_float32_models

    from mfa import statistics

    m32, m64, x = heywood_float32_models(4)
    for kwargs in ({"temperature": 3.0}, {}):
        got = streamed_e_step(m32, DataSource(x, m32, 2000), "centred", **kwargs)
        ref = streamed_e_step(m64, DataSource(x.double(), m64, 2000), "float64", **kwargs)
        torch.testing.assert_close(got.sum_zz, ref.sum_zz, rtol=1e-5, atol=1e-5 * float(
            ref.sum_zz.abs().max()))
    old = statistics.CHUNK_ROWS
    try:
        statistics.CHUNK_ROWS = 300  # seven chunks in the one batch
        chunked = streamed_e_step(m32, DataSource(x, m32, 2000), "centred")
    finally:
        statistics.CHUNK_ROWS = old
    torch.testing.assert_close(chunked.sum_xz, got.sum_xz, rtol=1e-5, atol=1e-5 * float(
        got.sum_xz.abs().max()))


def test_ill_conditioned_model_with_missing_data_takes_the_whole_e_step_in_float64():
    """A source that allows missing entries keeps the whole pass in float64 (the masked path
    has no float64 share of its own), and says so."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(7)
    x = x.clone()
    x[:5, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"E-step in float64: component\(s\) \[1\]"):
        got = streamed_e_step(m32, DataSource(x, m32, 512, allow_missing=True), "auto")
    ref = streamed_e_step(m64, DataSource(x.double(), m64, 512, allow_missing=True), "float64")
    torch.testing.assert_close(got.sum_zz, ref.sum_zz, rtol=1e-6, atol=1e-6)


def test_well_conditioned_float32_model_keeps_its_e_step_dtype():
    model = random_model(3, 5, 2, "diagonal", seed=8, dtype=torch.float32)
    x = random_data(150, model, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = streamed_e_step(model, DataSource(x, model, 40), "float32")
    ref = accumulate_statistics(model, x, model.component_terms(), precise_moments=False)
    torch.testing.assert_close(got.sum_x2, ref.sum_x2, rtol=1e-6, atol=1e-6)


def test_ill_conditioned_flags_the_heywood_component_in_float32_only():
    from helpers import heywood_float32_models

    from mfa._terms import ill_conditioned

    m32, m64, _ = heywood_float32_models(4)
    assert ill_conditioned(m32.factor_loadings, m32.noise_variance).tolist() == [False, True,
                                                                                 False]
    assert not ill_conditioned(m64.factor_loadings, m64.noise_variance).any()


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True])
def test_a_temperature_that_is_not_a_positive_number_is_refused(temperature):
    """0 and NaN gave NaN sums, -1 a zero and a NaN mass, without a word."""
    model = random_model(2, 5, 1, dtype=torch.float64)
    x = random_data(30, model)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        streamed_e_step(model, DataSource(x, model, 40), "float64", temperature)


def test_several_temperatures_in_one_pass_equal_one_pass_each():
    """A sequence of temperatures gives each one's statistics, bit for bit those of one pass
    each (the log-densities are computed once), in the float32 default mode with its pairs,
    over several batches and chunks; a bad or empty sequence is refused by name."""
    from helpers import heywood_float32_models

    model = random_model(4, 30, 3, seed=5)
    x = random_data(700, model, seed=6).float()
    model = model.float()
    heywood, _, rows = heywood_float32_models(4)  # with components taken in float64
    temperatures = [1.0, 7.5, 30.0, 120.0]
    old = statistics.CHUNK_ROWS
    try:
        statistics.CHUNK_ROWS = 100
        flat = random_model(3, 30, 0, seed=8).float()  # L = 0: a diagonal GMM
        for m, data, mode in ((model, x, "auto"), (model, x, "float32"),
                              (model, x, "precise"), (heywood, rows, "centred"),
                              (flat, x, "auto")):
            source = DataSource(data, m, 256)
            together = streamed_e_step(m, source, mode, temperatures)
            assert isinstance(together, list) and len(together) == len(temperatures)
            for temperature, stats in zip(temperatures, together, strict=True):
                alone = streamed_e_step(m, source, mode, temperature)
                for field in dataclasses.fields(alone):
                    assert torch.equal(getattr(stats, field.name),
                                       getattr(alone, field.name)), (mode, temperature, field)
            assert not torch.equal(together[0].sum_x, together[-1].sum_x)  # they differ
    finally:
        statistics.CHUNK_ROWS = old
    # fixed responsibilities (the temperatures then change nothing) and a batch of no rows
    terms = model.component_terms()
    resp = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(9)), -1)
    for rows_, r in ((x[:50], resp), (x[:0], None)):
        together = accumulate_statistics(model, rows_, terms, resp=r, temperature=[1.0, 9.0])
        alone = accumulate_statistics(model, rows_, terms, resp=r)
        for stats in together:
            for field in dataclasses.fields(alone):
                assert torch.equal(getattr(stats, field.name), getattr(alone, field.name))
    source = DataSource(x, model, 256)
    for bad in ([], [2.0, 0.0], (float("nan"),)):
        with pytest.raises(ValueError, match="temperature"):
            streamed_e_step(model, source, "auto", bad)


@pytest.mark.parametrize("mode", ["float64", "centred", "centred32", "mixed", "float32"])
def test_a_component_of_weight_0_stays_at_weight_0(mode):
    """exp of the clamped log-joint (linalg.exp_floor) gave a weight-0 component ~6e-30 of
    every row, and EM regrew it (5.7e-30, 6.8e-28, 1.8e-26, 2.9e-25 in four float32
    iterations); its responsibilities are now exactly 0 in every mode, tempered too, as in
    exact arithmetic."""
    from mfa.m_step import m_step

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g) * 3
    loadings = torch.randn(3, 5, 2, generator=g) * 0.3
    x = mu[torch.arange(3000) % 3] + torch.randn(3000, 5, generator=g) * 0.6
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.0, 0.5]), mu, loadings, torch.full((3, 5), 0.3))
    source = DataSource(x, model, 1000)
    for temperature in (5.0, 1.0):
        stats = EMTrainer.e_step(model, source, mode, [temperature])[0]
        assert float(stats.mass[1]) == 0.0 and float(stats.mass[0]) > 0
    for _ in range(4):
        model.set_parameters(**m_step(EMTrainer.e_step(model, source, mode), model,
                                      variance_floor=1e-6))
        assert float(model.weights.detach()[1]) == 0.0


@pytest.mark.parametrize("mode", ["centred", "float32"])
def test_an_ill_conditioned_component_of_tiny_weight_keeps_its_mass(mode):
    """The float64 share of ill-conditioned components left out every row whose
    responsibilities were all below the pair threshold: a component of weight 1e-14 lost all
    of its mass (5e-11, and with it its weight for good), where the same component
    well-conditioned kept it. Now rows are left out only when their mass is negligible
    beside each component's kept mass, as in the centred mode's sparse chunks."""
    from mfa._terms import ill_conditioned

    g = torch.Generator().manual_seed(0)
    loadings = torch.zeros(2, 4, 2)
    loadings[:, 0, 0] = 1.0
    loadings[:, 1, 1] = 1.0
    x = torch.randn(5000, 4, generator=g) * 1.2
    noise = torch.full((2, 4), 0.5)
    noise[1, 0] = 1e-9
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([1 - 1e-14, 1e-14]), torch.zeros(2, 4), loadings, noise)
    assert ill_conditioned(model.factor_loadings, model.noise_variance).tolist() == [False,
                                                                                     True]
    reference = EMTrainer.e_step(model, DataSource(x, model, 5000), "float64")
    stats = EMTrainer.e_step(model, DataSource(x, model, 5000), mode)
    assert float(reference.mass[1]) > 1e-11
    assert float(stats.mass[1]) == pytest.approx(float(reference.mass[1]), rel=1e-4)


def test_an_e_step_whose_components_lie_beyond_its_precision_says_so():
    """Four outlier rows at 1e12 among 500 of scale 3 pulled a component and the reference
    point there: the float64 fit's MAP objective fell (-2.4e6 to -4.0e6 a row under a fixed
    prior) and the float32 one recorded +36 nats a row where float64 gave -2e7, silently."""
    gen = torch.Generator().manual_seed(0)
    means = torch.stack([torch.zeros(6), torch.full((6,), 1e12)]).double()
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.99, 0.01], dtype=torch.float64), means,
        torch.zeros(2, 6, 1, dtype=torch.float64), torch.full((2, 6), 1e-6, dtype=torch.float64))
    x = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    for m in (model, model.float()):
        with pytest.warns(RuntimeWarning, match="components lie so far apart"):
            streamed_e_step(m, x.to(m.dtype))
    with warnings.catch_warnings():  # a model of image-like rows: no warning
        warnings.simplefilter("error")
        plain = random_model(3, 6, 2, "diagonal", seed=1, dtype=torch.float32)
        streamed_e_step(plain, random_data(100, plain, seed=2))
        # ... nor one sharp enough for float32's densities to go to float64 (a default
        # Fashion-MNIST fit at K = 200 reached that; the warning said "outliers" there)
        means = torch.rand(3, 784, generator=gen)
        sharp = MixtureOfFactorAnalyzers.from_parameters(
            torch.full((3,), 1 / 3), means, torch.zeros(3, 784, 1), torch.full((3, 784), 1e-7))
        assert sharp.component_terms().precise
        streamed_e_step(sharp, means[:1] + 3e-4 * torch.randn(20, 784, generator=gen))
