"""What an Adam fit (mfa.sgd.SGDTrainer) records and keeps, checked against dense float64
references and hand counts: the epochs' scores, the schedule's learning rates over uneven
batches, the start's part in early stopping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import F64, random_data, random_model
from torch.distributions import MultivariateNormal

from mfa import MixtureOfFactorAnalyzers
from mfa.sgd import SGDConfig, SGDTrainer
from mfa.training import ConvergenceWarning

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = ("weights", "means", "factor_loadings", "noise_variance")


def _dense_rows(model: MixtureOfFactorAnalyzers, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` per row ``[N]``, from a dense float64 MultivariateNormal."""
    a = model.factor_loadings.detach()
    cov = a @ a.mT + torch.diag_embed(model.noise_variance.detach())
    comp = MultivariateNormal(model.means.detach(), covariance_matrix=cov)
    return torch.logsumexp(model.log_weights.detach() + comp.log_prob(x.unsqueeze(1)), -1)


def _fit(model, x, validation, **config):
    config = dict(progress=False, init="none", em_start=False, noise_prior_strength=0.0,
                  **config)
    trainer = SGDTrainer(SGDConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=validation)
    return trainer


def test_an_epochs_train_score_is_the_mean_over_its_rows_not_over_its_batches():
    """800 rows in batches of 300, 300, 200: the epoch's train log-likelihood is the mean per
    row (the last batch weighs 200/800, not 1/3). With lr = 1e-9 the parameters stay put, so
    every epoch's scores are the dense log-likelihoods of the start."""
    model = random_model(2, 4, 1, seed=3)
    x, v = random_data(800, model, seed=4), random_data(100, model, seed=5)
    train_ll, val_ll = _dense_rows(model, x).mean().item(), _dense_rows(model, v).mean().item()
    trainer = _fit(model, x, v, lr=1e-9, epochs=2, batch_size=300, patience=0)
    assert [h["epoch"] for h in trainer.history] == [1, 2]
    for record in trainer.history:
        assert record["train_log_likelihood"] == pytest.approx(train_ll, rel=1e-7, abs=0)
        assert record["val_log_likelihood"] == pytest.approx(val_ll, rel=1e-7, abs=0)
        assert record["lr"] == 1e-9


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedules_count_a_short_last_batch_as_a_step(schedule):
    """800 rows in batches of 300: three steps an epoch (the last of 200 rows is one), so the
    per-batch schedules reach each epoch's first step after 3e steps: cosine at
    lr (1 + cos(π·3e/12))/2 over 4 epochs, "step" ×0.3 every 2 epochs (6 steps) of 6."""
    model = random_model(2, 4, 1, seed=3)
    x, v = random_data(800, model, seed=4), random_data(100, model, seed=5)
    lr = 1e-3
    epochs = 4 if schedule == "cosine" else 6
    trainer = _fit(model, x, v, lr=lr, epochs=epochs, batch_size=300, patience=0,
                   schedule=schedule)
    got = [h["lr"] for h in trainer.history]
    if schedule == "cosine":
        expected = [lr * (1 + math.cos(math.pi * 3 * e / 12)) / 2 for e in range(epochs)]
    else:
        expected = [lr * 0.3 ** (e // 2) for e in range(epochs)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_start_no_epoch_beats_on_validation_is_kept():
    """The start competes with the epochs: from the maximum-likelihood fit of the validation
    rows themselves, every Adam epoch on other training rows scores worse on validation, so
    with patience 2 the fit stops after two epochs and returns the start unchanged."""
    from mfa.em import EMConfig, EMTrainer

    truth = random_model(2, 4, 1, seed=3)
    v = random_data(300, truth, seed=5)
    x = random_data(800, truth, seed=4) + 0.5  # (their optimum is elsewhere)
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=100, tol=0.0, noise_prior_strength=0.0, patience=0,
                           val_fraction=0.0, progress=False)).fit(model, v)
    start = {name: getattr(model, name).detach().clone() for name in PARAMS}
    start_val = _dense_rows(model, v).mean().item()
    trainer = _fit(model, x, v, lr=0.05, epochs=6, batch_size=100, patience=2)
    assert trainer.start_val_log_likelihood == pytest.approx(start_val, rel=1e-10)
    vals = [h["val_log_likelihood"] for h in trainer.history]
    assert len(vals) == 2 and max(vals) < start_val
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), start[name]), name
