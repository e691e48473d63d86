"""The start of an Adam fit (mfa.sgd_start.em_start) where its EM step fails: the model
keeps its initialisation, with a warning."""

from __future__ import annotations

import logging

import torch
from helpers import random_data, random_model

import mfa.sgd_start
from mfa._data_stream import DataSource
from mfa.priors import Prior
from mfa.sgd_start import em_start

PARAMS = ("weights", "means", "factor_loadings", "noise_variance")


def test_a_non_finite_em_step_leaves_the_initialisation(monkeypatch, caplog):
    """An M-step with a NaN mean (e.g. an overflow in float32) is not applied: the model
    keeps every parameter as it was, the log says so, and the s₀ and the 300 rows read are
    returned as they would be."""
    model = random_model(2, 3, 1, seed=0)
    x = random_data(300, model, seed=1)
    before = {name: getattr(model, name).detach().clone() for name in PARAMS}
    real = mfa.sgd_start.m_step

    def nan_mean(*args, **kwargs):
        params = real(*args, **kwargs)
        params["means"] = params["means"].clone()
        params["means"][1, 2] = torch.nan
        return params

    monkeypatch.setattr(mfa.sgd_start, "m_step", nan_mean)
    source = DataSource(x, model, 128, "data")
    with caplog.at_level(logging.WARNING, logger="mfa.sgd_start"):
        s0, rows = em_start(model, source, None, Prior(1.0, 0.25), auto=False, step=True,
                            lower=1e-3, per_decade=4, variance_floor=1e-6)
    assert (s0, rows) == (0.25, 300.0)
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), before[name]), name
    assert any("EM step is not finite" in r.getMessage() for r in caplog.records)


def test_a_min_noise_above_the_variance_floor_floors_the_start():
    """A model whose min_noise (1e-3) is above SGDConfig.variance_floor (1e-6), on rows with
    a near-constant feature (variance 1e-8): the initialisation and the start's EM step floor
    the noise just above min_noise (a floor of 1e-6 gave noise variances the model cannot
    hold, and the fit raised), and Adam keeps it there."""
    import warnings

    from mfa import MixtureOfFactorAnalyzers
    from mfa.sgd import SGDConfig, SGDTrainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g, dtype=torch.float64)
    x[:, 3] = 0.5 + 1e-4 * torch.randn(600, generator=g, dtype=torch.float64)
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64, min_noise=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SGDTrainer(SGDConfig(progress=False, epochs=1, noise_prior_strength=0.0)).fit(model, x)
    noise = model.noise_variance.detach()[:, 3]
    assert bool((noise > 1e-3).all()) and bool((noise < 1.01e-3).all()), noise


def test_auto_without_validation_warns_and_takes_the_quantization_variance():
    """noise_prior_variance='auto' with no validation rows (val_fraction=0): a UserWarning
    says so, and s₀ is the grid's lower end, the quantization_variance (0.01 here), as
    selected_noise_prior_variance, prior() and the saved state all say."""
    import warnings

    import pytest

    from mfa.sgd import SGDConfig, SGDTrainer
    from mfa.training import ConvergenceWarning

    model = random_model(2, 3, 1, seed=1)
    x = random_data(120, model, seed=2)
    for em_step in (True, False):  # (with or without the start's pass)
        trainer = SGDTrainer(SGDConfig(progress=False, epochs=1, val_fraction=0.0,
                                       quantization_variance=0.01, noise_prior_strength=2.0,
                                       em_start=em_step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            with pytest.warns(UserWarning, match=r"'auto' needs validation data .* s0 = "
                                                 r"quantization_variance = 0\.01"):
                trainer.fit(model, x)
        assert trainer.selected_noise_prior_variance == 0.01
        assert trainer.prior() == Prior(2.0, 0.01)
        assert trainer.state_dict()["noise_prior_variance"] == 0.01


def test_a_component_the_em_step_leaves_without_rows_keeps_a_positive_weight():
    """Component 1 lies 1e3 from every row (its responsibilities are exactly 0): the start's
    EM step gives it the floor's 1e-3 rows of weight, 1e-3/(300 + 1e-3), not 0, whose logit
    of −inf Adam could never move (and a Dirichlet prior would make every loss inf)."""
    model = random_model(2, 3, 1, seed=0)
    x = random_data(300, model, seed=1)
    params = {name: getattr(model, name).detach().clone() for name in PARAMS}
    params["means"][1] += 1e3
    model.set_parameters(**params)
    em_start(model, DataSource(x, model, 128, "data"), None, Prior(1.0, 0.25), auto=False,
             step=True, lower=1e-3, per_decade=4, variance_floor=1e-6)
    expected = torch.tensor([300.0, 1e-3], dtype=torch.float64) / (300.0 + 1e-3)
    torch.testing.assert_close(model.weights.detach(), expected, rtol=1e-12, atol=0)


def test_no_noise_prior_means_no_search_and_no_warning():
    """noise_prior_strength=0 leaves noise_prior_variance='auto' without effect: no search
    (selected_noise_prior_variance None, with or without validation rows) and no warning
    that 'auto' needs validation data."""
    import warnings

    from mfa.sgd import SGDConfig, SGDTrainer

    model = random_model(2, 3, 1, seed=1)
    x = random_data(150, model, seed=2)
    for validation, fraction in ((None, 0.0), (x[100:], 0.1)):
        trainer = SGDTrainer(SGDConfig(progress=False, epochs=1, val_fraction=fraction,
                                       noise_prior_strength=0.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(random_model(2, 3, 1, seed=1), x[:100], validation=validation)
        assert not [w for w in caught if issubclass(w.category, UserWarning)
                    and "needs validation data" in str(w.message)]
        assert trainer.selected_noise_prior_variance is None
        assert trainer.state_dict()["noise_prior_variance"] is None
