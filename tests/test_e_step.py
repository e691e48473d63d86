"""mfa.e_step: the streamed pass equals one batch's statistics, and is EMTrainer.e_step."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import random_data, random_model

from mfa import statistics
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
