"""What an Adam fit (mfa.sgd.SGDTrainer) records and keeps, checked against dense float64
references and hand counts: the epochs' scores, the schedule's learning rates over uneven
batches, the start's part in early stopping."""

from __future__ import annotations

import copy
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
    """``log p(x)`` per row ``[N]``, from a dense float64 MultivariateNormal (differentiable
    through the model's parameters)."""
    a = model.factor_loadings
    cov = a @ a.mT + torch.diag_embed(model.noise_variance)
    comp = MultivariateNormal(model.means, covariance_matrix=cov)
    return torch.logsumexp(model.log_weights + comp.log_prob(x.unsqueeze(1)), -1)


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


def _checkpoints(x, v, **config):
    """``(trainer, model, [(state, model state)] per checkpoint)`` of a fit checkpointing
    every epoch."""
    saved = []
    model = random_model(2, 4, 1, seed=3)
    trainer = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False,
                                   noise_prior_strength=0.0, checkpoint_every=1, **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=v, checkpoint_fn=lambda t, m: saved.append(
            (copy.deepcopy(t.state_dict()), copy.deepcopy(m.state_dict()))))
    return trainer, model, saved


def test_an_old_checkpoint_of_the_early_stopping_epoch_stops_there():
    """A checkpoint written before 'stopped' and 'final' were saved, at the epoch where the fit
    stopped early (patience 2 epochs past its best): resumed, it is read from bad_epochs and
    patience and returns the best epoch at once, with the start's validation score kept."""
    truth = random_model(2, 4, 1, seed=3)
    x, v = random_data(800, truth, seed=4), random_data(200, truth, seed=5)
    config = dict(lr=0.2, epochs=40, patience=2, batch_size=64, seed=0)
    trainer, model, saved = _checkpoints(x, v, **config)
    stopped_at = len(trainer.history)
    assert stopped_at < 40
    state, _ = saved[-2]  # (the last epoch's, inside the loop: the model there is its own)
    assert state["epoch"] == stopped_at and state["stopped"] and not state["final"]
    longer = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False,
                                  noise_prior_strength=0.0, checkpoint_every=1,
                                  **{**config, "epochs": 80}))
    with pytest.raises(ValueError, match=rf"finished fit \({stopped_at} of 40 epochs, "
                                         r"stopped early\)"):
        longer.load_state_dict(state)  # (saved inside the loop, but its fit had ended)
    del state["stopped"], state["final"]
    resumed = random_model(2, 4, 1, seed=3)
    resumed.load_state_dict(saved[-2][1])
    again = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False,
                                 noise_prior_strength=0.0, checkpoint_every=1, **config))
    again.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        again.fit(resumed, x, validation=v)
    assert len(again.history) == stopped_at
    assert again.start_val_log_likelihood == trainer.start_val_log_likelihood
    assert again.start_val_log_likelihood == pytest.approx(
        _dense_rows(random_model(2, 4, 1, seed=3), v).mean().item(), rel=1e-10)
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name).detach(), getattr(model, name).detach()), name


def test_an_old_checkpoint_of_a_finished_fit_is_not_extended():
    """A checkpoint without 'final' (saved before it existed) whose epochs are all done was
    written after fit returned (its model the best epoch): resuming it with more epochs is
    refused as a finished fit; one of an unfinished fit (epoch 1 of 2) may be extended."""
    truth = random_model(2, 4, 1, seed=3)
    x, v = random_data(400, truth, seed=4), random_data(100, truth, seed=5)
    config = dict(lr=0.02, patience=0, batch_size=200, seed=0)
    _, _, saved = _checkpoints(x, v, epochs=2, **config)
    (first, _), (last, _) = saved[0], saved[-1]
    for state in (first, last):
        del state["stopped"], state["final"]
    longer = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False,
                                  noise_prior_strength=0.0, checkpoint_every=1, epochs=4,
                                  **config))
    with pytest.raises(ValueError, match="finished fit"):
        longer.load_state_dict(last)
    longer.load_state_dict(first)


def test_a_fit_cut_to_the_epochs_it_has_done_ends_as_a_fit_of_that_length():
    """The checkpoint of epoch 2 of a constant-rate 4-epoch fit, resumed with epochs=2 (as
    many as done: allowed, only fewer are refused), runs no epoch and returns what a 2-epoch
    fit returns: the best of the start and both epochs."""
    truth = random_model(2, 4, 1, seed=3)
    x, v = random_data(400, truth, seed=4), random_data(100, truth, seed=5)
    config = dict(lr=0.05, patience=0, batch_size=100, seed=0)
    _, _, saved = _checkpoints(x, v, epochs=4, **config)
    state, params = saved[1]
    assert state["epoch"] == 2 and not state["final"]
    short, short_model, _ = _checkpoints(x, v, epochs=2, **config)
    again = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False,
                                 noise_prior_strength=0.0, checkpoint_every=1, epochs=2,
                                 **config))
    again.load_state_dict(state)
    resumed = random_model(2, 4, 1, seed=3)
    resumed.load_state_dict(params)
    again.fit(resumed, x, validation=v)
    assert [h["val_log_likelihood"] for h in again.history] == pytest.approx(
        [h["val_log_likelihood"] for h in short.history], rel=1e-12, abs=0)
    for name in PARAMS:
        torch.testing.assert_close(getattr(resumed, name).detach(),
                                   getattr(short_model, name).detach(), rtol=1e-12, atol=0)


def test_adam_steps_follow_the_map_objective_written_out_by_hand():
    """Two full-batch steps (plain Adam, no clipping, weight decay 0.01) on the MAP objective
    per row: −mean log p(x) by a dense MultivariateNormal plus −log p(θ)/N written from the
    priors' formula (ν, s₀, α, λ all on), stepped by torch.optim.Adam(weight_decay=0.01) on a
    twin's own parameters."""
    nu, s0, alpha, lam, n = 5.0, 0.3, 3.0, 2.0, 120
    model = random_model(2, 4, 2, seed=3)
    twin = random_model(2, 4, 2, seed=3)
    x = random_data(n, model, seed=4)
    reference = torch.optim.Adam(list(twin.parameters()), lr=0.02, weight_decay=0.01)
    for _ in range(2):
        reference.zero_grad()
        d, a = twin.noise_variance, twin.factor_loadings
        log_prior = (-(nu / 2) * (d.log() + s0 / d).sum()
                     + (alpha - 1) * twin.log_weights.sum()
                     + (-(a.shape[-1] / 2) * d.log() - lam * a.square().sum(-1) / (2 * d)).sum())
        (-_dense_rows(twin, x).mean() - log_prior / n).backward()
        reference.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        SGDTrainer(SGDConfig(
            progress=False, init="none", em_start=False, lr=0.02, step_scale="none",
            grad_clip=None, weight_decay=0.01, epochs=2, batch_size=n, val_fraction=0.0,
            noise_prior_strength=nu, noise_prior_variance=s0, weight_concentration=alpha,
            loading_ridge=lam)).fit(model, x)
    for name in PARAMS:
        torch.testing.assert_close(getattr(model, name).detach(), getattr(twin, name).detach(),
                                   rtol=1e-9, atol=1e-12, msg=name)


def _script_epoch_scores(monkeypatch, scores: list[float]) -> None:
    """Make each minibatch's mean −log p the next of ``scores`` (one minibatch an epoch), its
    gradients Adam's own."""
    import mfa.sgd

    left = iter(scores)
    real = mfa.sgd.distributed.backward_mean

    def scripted(values, parameters):
        nll, rows = real(values, parameters)
        return torch.full_like(nll, next(left)), rows

    monkeypatch.setattr(mfa.sgd.distributed, "backward_mean", scripted)


def test_divergence_is_judged_against_the_best_epoch_by_ten_times_its_size_plus_d(
        monkeypatch):
    """The train scores are scripted (full batches: one a step and an epoch; D = 4): −5 (the
    first minibatch's too), −58, −100. Divergence is a fall of more than 10·(|best| + D) =
    90 below the best so far: −58 is not one (a threshold of 10·|best| = 50 called it one),
    −100 is, against −5 (the last epoch, −58, as reference allowed down to −678)."""
    _script_epoch_scores(monkeypatch, [5.0, 58.0, 100.0])
    model = random_model(2, 4, 1, seed=3)
    x = random_data(100, model, seed=4)
    trainer = SGDTrainer(SGDConfig(progress=False, init="none", em_start=False, lr=1e-6,
                                   noise_prior_strength=0.0, val_fraction=0.0, batch_size=100,
                                   epochs=5))
    with pytest.raises(FloatingPointError, match=r"Adam diverged at epoch 3: the mean train "
                       r"log-likelihood is -100 nats per row, down from -5;"):
        trainer.fit(model, x)
    assert [h["train_log_likelihood"] for h in trainer.history] == [-5.0, -58.0]


def test_an_old_checkpoint_takes_its_best_epoch_as_the_divergence_reference(monkeypatch):
    """A checkpoint without reference_log_likelihood (saved before it existed), after scripted
    epochs of −5 and −58 (D = 4): resumed, an epoch of −100 is divergence against the best,
    −5 (more than 90 below), not against the worst, −58 (which allowed down to −678)."""
    _script_epoch_scores(monkeypatch, [5.0, 58.0, 100.0])
    model = random_model(2, 4, 1, seed=3)
    x = random_data(100, model, seed=4)
    config = dict(progress=False, init="none", em_start=False, lr=1e-6, checkpoint_every=1,
                  noise_prior_strength=0.0, val_fraction=0.0, batch_size=100)
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        SGDTrainer(SGDConfig(epochs=2, **config)).fit(
            model, x, checkpoint_fn=lambda t, m: saved.append(
                (copy.deepcopy(t.state_dict()), copy.deepcopy(m.state_dict()))))
    state, params = saved[1]  # (epoch 2's, inside the loop: it may grow)
    assert state["epoch"] == 2 and state.pop("reference_log_likelihood") == -5.0
    again = SGDTrainer(SGDConfig(epochs=3, **config))
    again.load_state_dict(state)
    model.load_state_dict(params)
    with pytest.raises(FloatingPointError, match=r"Adam diverged at epoch 3: the mean train "
                       r"log-likelihood is -100 nats per row, down from -5;"):
        again.fit(model, x)
