"""Adam training (mfa.sgd.SGDTrainer): optimisation quality against EM's optimum, early
stopping, schedules, gradient clipping, resuming, determinism and validation."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from helpers import gen, random_data, random_model, roundtrip
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.sgd import SGDConfig, SGDTrainer

F64 = torch.float64
PARAMS = ("weights", "means", "factor_loadings", "noise_variance")


pytestmark = pytest.mark.usefixtures("one_thread")




def _sample(n: int, k: int, d: int, lat: int, seed: int, spread: float = 2.0):
    """Rows of a random MFA, sampled by hand (parameters seeded by 0, rows by ``seed``)."""
    g = gen(0)
    raw = torch.arange(2, k + 2, dtype=F64)
    weights = raw / raw.sum()
    means = spread * torch.randn(k, d, generator=g, dtype=F64)
    loadings = torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = 0.2 + 0.5 * torch.rand(k, d, generator=g, dtype=F64)
    g = gen(seed)
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    z = torch.randn(n, lat, 1, generator=g, dtype=F64)
    x = means[comp] + torch.randn(n, d, generator=g, dtype=F64) * noise[comp].sqrt()
    return x + (loadings[comp] @ z).squeeze(-1)


@pytest.fixture(scope="module")
def problem():
    """K=2, D=5, L=1: 5000 training, 500 validation and 1000 test rows."""
    x = _sample(6500, 2, 5, 1, seed=1)
    return x[:5000], x[5000:5500], x[5500:]


@pytest.fixture(scope="module")
def small():
    """A quick problem for the mechanics: 800 training and 200 validation rows."""
    x = _sample(1000, 2, 4, 1, seed=2)
    return x[:800], x[800:]


def _dense_log_lik(model: MixtureOfFactorAnalyzers, x: torch.Tensor) -> float:
    a = model.factor_loadings.detach()
    cov = a @ a.mT + torch.diag_embed(model.noise_variance.detach())
    comp = MultivariateNormal(model.means.detach(), covariance_matrix=cov)
    lp = model.log_weights.detach() + comp.log_prob(x.unsqueeze(1))
    return torch.logsumexp(lp, -1).mean().item()


def _fit(x, k, lat, validation=None, callbacks=(), checkpoint_fn=None, model=None,
         trainer=None, noise="diagonal", **config):
    config.setdefault("progress", False)
    if model is None:
        model = MixtureOfFactorAnalyzers(k, x.shape[1], lat, noise, dtype=F64)
    trainer = trainer or SGDTrainer(SGDConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=validation, callbacks=callbacks,
                    checkpoint_fn=checkpoint_fn)
    return model, trainer


def _assert_same_params(a, b, rtol: float, atol: float) -> None:
    for name in PARAMS:
        torch.testing.assert_close(
            getattr(a, name).detach(), getattr(b, name).detach(), rtol=rtol, atol=atol, msg=name
        )


def _vals(trainer) -> list[float]:
    return [h["val_log_likelihood"] for h in trainer.history]


# --------------------------------------------------------------------- optimisation quality


@pytest.fixture(scope="module")
def em_optimum(problem):
    train, _, test = problem
    model = MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64)
    # Plain EM (no prior, no early stopping): the maximum-likelihood optimum.
    EMTrainer(EMConfig(max_iter=500, tol=1e-8, progress=False, noise_prior_strength=0.0,
                       patience=0)).fit(model, train)
    return _dense_log_lik(model, test)


@pytest.mark.parametrize("seed", [0, 1])
def test_adam_approaches_the_em_optimum(problem, em_optimum, seed):
    train, val, test = problem
    model, trainer = _fit(train, 2, 1, validation=val, lr=0.05, epochs=15, batch_size=256,
                          schedule="cosine", patience=0, seed=seed)
    vals = _vals(trainer)
    assert len(vals) == 15
    assert vals[-1] > vals[0]  # Adam lowered the held-out NLL
    assert em_optimum - _dense_log_lik(model, test) < 0.05
    for record in trainer.history:
        assert {"epoch", "train_log_likelihood", "val_log_likelihood", "seconds"} <= set(record)
        assert math.isfinite(record["train_log_likelihood"])
    assert [h["epoch"] for h in trainer.history] == list(range(1, 16))


def test_random_init_improves(small):
    train, val = small
    model, trainer = _fit(train, 2, 1, validation=val, init="random", lr=0.05, epochs=8,
                          patience=0, seed=0)
    vals = _vals(trainer)
    assert vals[-1] > vals[0] + 0.1
    assert all(math.isfinite(p) for p in vals)


# --------------------------------------------------------------------- early stopping


def test_early_stopping_keeps_the_best_validation_parameters(small):
    train, val = small
    model, trainer = _fit(train, 2, 1, validation=val, lr=0.1, epochs=60, patience=2,
                          batch_size=64, seed=0)
    vals = _vals(trainer)
    scores = [trainer.start_val_log_likelihood, *vals]  # the start competes (index 0)
    best = max(range(len(scores)), key=scores.__getitem__)
    assert len(vals) < 60, "the noisy lr=0.1 run should have stopped early"
    assert len(vals) == best + 2  # stopped exactly `patience` epochs after the best
    assert _dense_log_lik(model, val) == pytest.approx(scores[best], rel=1e-10)


def test_resuming_a_fit_that_stopped_early_returns_it_unchanged(small):
    train, val = small
    saved = {}

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    config = dict(lr=0.1, epochs=60, patience=2, batch_size=64, seed=0)
    model, trainer = _fit(train, 2, 1, validation=val, checkpoint_fn=checkpoint, **config)
    stopped_at = len(trainer.history)
    assert stopped_at < 60 and saved["trainer"]["stopped"] is True
    for _ in range(2):  # (it trained on to epoch ~26, then further, before)
        resumed = MixtureOfFactorAnalyzers(2, train.shape[1], 1, dtype=F64)
        resumed.load_state_dict(roundtrip(saved["model"]))
        again = SGDTrainer(SGDConfig(progress=False, **config))
        again.load_state_dict(roundtrip(saved["trainer"]))
        _fit(train, 2, 1, validation=val, model=resumed, trainer=again,
             checkpoint_fn=checkpoint)
        assert len(again.history) == stopped_at
        _assert_same_params(resumed, model, rtol=0, atol=0)


def test_no_early_stopping_with_patience_zero_still_returns_the_best(small):
    train, val = small
    model, trainer = _fit(train, 2, 1, validation=val, lr=0.1, epochs=12, patience=0,
                          batch_size=64, seed=0)
    vals = _vals(trainer)
    assert len(vals) == 12
    assert _dense_log_lik(model, val) == pytest.approx(max(vals), rel=1e-10)


def test_validation_split_from_training_data(small):
    """Without validation data a seeded val_fraction of the rows is held out and scored."""
    train, _ = small
    model, trainer = _fit(train, 2, 1, val_fraction=0.25, epochs=3, patience=0,
                          progress=True)
    assert all(v is not None and math.isfinite(v) for v in _vals(trainer))
    # The held-out quarter is a subset of the rows, so its score lies near the training one.
    assert abs(_vals(trainer)[-1] - trainer.history[-1]["train_log_likelihood"]) < 0.5


def test_warning_without_validation_data(small):
    train, _ = small
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    trainer = SGDTrainer(SGDConfig(val_fraction=0.0, epochs=2, progress=False))
    with pytest.warns(ConvergenceWarning, match="without validation"):
        trainer.fit(model, train)
    assert all(h["val_log_likelihood"] is None for h in trainer.history)


def test_without_validation_every_epoch_runs_and_the_last_is_kept(small):
    """Without validation data Adam early-stopped on the epoch's running mean train
    log-likelihood (patience is about validation), kept the parameters of the epoch that
    mean favoured, and the 'ran all epochs' warning never came."""
    train, _ = small
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    epochs_seen, last = [], {}

    def remember(trainer, m, record):
        epochs_seen.append(record["epoch"])
        last.update({k: v.clone() for k, v in m.state_dict().items()})

    trainer = SGDTrainer(SGDConfig(val_fraction=0.0, epochs=8, patience=1, lr=0.3,
                                   noise_prior_strength=0.0, progress=False))
    with pytest.warns(ConvergenceWarning, match="ran all 8 epochs without validation"):
        trainer.fit(model, train, callbacks=[remember])
    assert epochs_seen == list(range(1, 9))
    scores = [h["train_log_likelihood"] for h in trainer.history]
    # patience 1 would have stopped at the first epoch that scored no better
    assert any(b <= a for a, b in zip(scores, scores[1:], strict=False))
    for name, value in model.state_dict().items():
        assert torch.equal(value, last[name]), name


def test_no_warning_with_validation_data(small):
    train, val = small
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        SGDTrainer(SGDConfig(epochs=2, progress=False)).fit(
            MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), train, validation=val
        )


# --------------------------------------------------------------------- schedules, clipping


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_schedules(small, schedule):
    train, val = small
    lr, epochs = 0.01, 6
    model, trainer = _fit(train, 2, 1, validation=val, lr=lr, epochs=epochs, patience=0,
                          schedule=schedule, batch_size=200)
    lrs = [h["lr"] for h in trainer.history]  # at each epoch's first step
    assert len(lrs) == epochs
    if schedule == "constant":
        assert lrs == pytest.approx([lr] * epochs)
    elif schedule == "cosine":
        # Annealed over all steps: from lr, strictly decreasing, the last epoch's above 0.
        assert lrs[0] == lr and lrs[-1] > 0
        assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
        assert lrs[3] == pytest.approx(lr / 2)  # half-way: cos(π/2)
    else:
        # Decays by 0.3 every epochs // 3 = 2 epochs.
        assert lrs == pytest.approx([lr, lr, lr * 0.3, lr * 0.3, lr * 0.09, lr * 0.09])
    assert all(math.isfinite(v) for v in _vals(trainer))


def test_gradient_clipping_is_applied(small, monkeypatch):
    train, val = small
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = original(parameters, max_norm, *args, **kwargs)
        grads = [p.grad for p in parameters if p.grad is not None]
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        calls.append((float(max_norm), float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model, trainer = _fit(train, 2, 1, validation=val, grad_clip=0.5, epochs=2,
                          batch_size=100, init="random", em_start=False, patience=0)
    steps = 2 * math.ceil(800 / 100)
    assert len(calls) == steps
    assert all(c[0] == 0.5 for c in calls)
    assert any(c[1] > 0.5 for c in calls), "the random start should produce large gradients"
    assert all(c[2] <= 0.5 * (1 + 1e-6) for c in calls)
    assert all(math.isfinite(v) for v in _vals(trainer))

    calls.clear()
    _fit(train, 2, 1, validation=val, grad_clip=None, epochs=1, patience=0)
    assert calls == []


# --------------------------------------------------------------------- determinism and resume


def test_same_seed_same_result_different_seed_differs(small):
    train, _ = small
    a, ta = _fit(train, 2, 1, epochs=3, seed=3, patience=0)
    b, tb = _fit(train, 2, 1, epochs=3, seed=3, patience=0)
    c, _ = _fit(train, 2, 1, epochs=3, seed=4, patience=0)
    _assert_same_params(a, b, rtol=0, atol=0)
    assert _vals(ta) == _vals(tb)
    assert not torch.allclose(a.means, c.means)




class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_resume_after_interrupt_equals_uninterrupted(small, schedule):
    train, _ = small  # no validation given: the seeded split must be reproduced on resume
    config = dict(epochs=6, lr=0.02, schedule=schedule, patience=0, checkpoint_every=1,
                  batch_size=128, seed=2)
    full, full_trainer = _fit(train, 2, 1, **config)

    saved = {}

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    def stop(trainer, model, record):
        if record["epoch"] == 3:  # the checkpoint of epoch 3 is written before the callbacks
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(train, 2, 1, callbacks=[stop], checkpoint_fn=checkpoint, **config)
    assert saved["trainer"]["epoch"] == 3

    state = roundtrip(saved["trainer"])  # safe-loadable
    resumed = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = SGDTrainer(SGDConfig(progress=False, **config))
    trainer.load_state_dict(state)
    _fit(train, 2, 1, model=resumed, trainer=trainer)

    _assert_same_params(resumed, full, rtol=1e-6, atol=1e-6)
    assert [h["epoch"] for h in trainer.history] == list(range(1, 7))
    assert _vals(trainer) == pytest.approx(_vals(full_trainer), rel=1e-6)
    assert [h["lr"] for h in trainer.history] == pytest.approx(
        [h["lr"] for h in full_trainer.history]
    )


def test_interrupted_inside_an_epoch_the_model_is_the_state_dicts(small):
    """Ctrl-C (or an error from the data) half-way through epoch 3: the model held that
    epoch's half-trained parameters while state_dict() described the end of epoch 2, and a
    fit resumed from the pair (saved after catching the interrupt) ended 0.018 off the
    uninterrupted fit, without a word. The model now goes back to where the epoch started,
    and the resume is exact."""
    from torch.utils.data import Dataset

    train, _ = small
    config = dict(epochs=5, batch_size=64, patience=0, seed=3, val_fraction=0.0)

    class Rows(Dataset):
        def __init__(self, fail_at=None):
            self.reads, self.fail_at = 0, fail_at

        def __len__(self):
            return train.shape[0]

        def __getitem__(self, i):
            self.reads += 1
            if self.reads == self.fail_at:
                raise self.error
            return train[i]

    probe = Rows()
    full, _ = _fit(probe, 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), **config)
    # (a FloatingPointError from the data, as numpy's seterr raises, too: only fit's own
    # divergence error leaves the model as its message says)
    for error in (_Interrupt, FloatingPointError):
        model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
        trainer = SGDTrainer(SGDConfig(progress=False, **config))
        data = Rows(fail_at=probe.reads - 5 * 800 // 2)  # half-way through epoch 3 of 5
        data.error = error
        with pytest.raises(error):
            _fit(data, 2, 1, model=model, trainer=trainer)
        assert len(trainer.history) == 2
        state = roundtrip(trainer.state_dict())
        saved = roundtrip(model.state_dict())
        resumed = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
        resumed.load_state_dict(saved)
        again = SGDTrainer(SGDConfig(progress=False, **config))
        again.load_state_dict(state)
        _fit(Rows(), 2, 1, model=resumed, trainer=again)
        for name, value in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], value), (error, name)
    # A trainer reused for a fresh fit, interrupted in its first epoch: its state described
    # the earlier fit's end (epoch 5, "final", its best parameters) beside the new model.
    data = Rows(fail_at=probe.reads - 9 * 800 // 2)  # half-way through epoch 1
    data.error = _Interrupt
    with pytest.raises(KeyboardInterrupt):
        _fit(data, 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), trainer=again)
    assert "epoch" not in again.state_dict() and again.history == []


@pytest.mark.parametrize("seed", [0, 5])
def test_resume_from_the_checkpoint_of_the_early_stopping_epoch_stops_there(seed):
    """The checkpoint written in the epoch where early stopping fires said stopped=False (the
    decision came after it): resumed from it, the fit trained on (5 epochs instead of 2 at
    seed 0) and ended elsewhere. It now stops where the uninterrupted fit stopped."""
    truth = random_model(3, 4, 1, seed=0)
    x = random_data(600, truth, seed=1, scale=1.0)
    val = random_data(200, truth, seed=2, scale=1.0)
    config = dict(lr=0.05, epochs=60, patience=1, batch_size=64, seed=seed, checkpoint_every=1,
                  progress=False)
    saved = []

    def checkpoint(trainer, model):
        saved.append((copy.deepcopy(trainer.state_dict()), copy.deepcopy(model.state_dict())))

    full = MixtureOfFactorAnalyzers(3, 4, 1, dtype=F64)
    full_trainer = SGDTrainer(SGDConfig(**config))
    full_trainer.fit(full, x, validation=val, checkpoint_fn=checkpoint)
    state, params = saved[-2]  # the stopping epoch's own checkpoint (the last is the final one)
    assert state["epoch"] == len(full_trainer.history) and state["stopped"]
    resumed = MixtureOfFactorAnalyzers(3, 4, 1, dtype=F64)
    resumed.load_state_dict(params)
    trainer = SGDTrainer(SGDConfig(**config))
    trainer.load_state_dict(roundtrip(state))
    trainer.fit(resumed, x, validation=val)
    assert len(trainer.history) == len(full_trainer.history)
    _assert_same_params(resumed, full, rtol=0, atol=0)


#: A cosine-schedule fit whose states the resume tests below take.
COSINE = dict(lr=0.02, schedule="cosine", patience=0, checkpoint_every=1, batch_size=128)


def _saved_at_epoch_2(train, config: dict) -> dict:
    """The trainer's and model's states saved at epoch 2 of a 4-epoch fit of ``config``."""
    saved = {}

    def checkpoint(trainer, model):
        if trainer.state_dict()["epoch"] == 2:
            saved["trainer"] = copy.deepcopy(trainer.state_dict())
            saved["model"] = copy.deepcopy(model.state_dict())

    _fit(train, 2, 1, epochs=4, checkpoint_fn=checkpoint, **config)
    return saved


def test_resume_with_other_epochs_under_a_schedule_is_refused(small):
    """A cosine or step schedule is laid out over the saved epochs: resumed with another
    number, the old schedule went on (cosine back up from 0 after its end) without a word."""
    train, _ = small
    config = dict(COSINE)
    saved = _saved_at_epoch_2(train, config)
    trainer = SGDTrainer(SGDConfig(progress=False, epochs=8, **config))
    with pytest.raises(ValueError, match=r"schedule='cosine', laid out over epochs=4"):
        trainer.load_state_dict(saved["trainer"])
    SGDTrainer(SGDConfig(progress=False, epochs=4, **config)).load_state_dict(saved["trainer"])
    constant = {**config, "schedule": "constant"}  # an interrupted constant-rate fit may grow
    saved = _saved_at_epoch_2(train, constant)
    SGDTrainer(SGDConfig(progress=False, epochs=8, **constant)).load_state_dict(saved["trainer"])


@pytest.mark.parametrize("change, match", [
    ({"epochs": 8}, r"schedule='cosine', laid out over epochs=4"),
    ({"lr": 0.5}, r"saved with lr=0.02 but this trainer's config has lr=0.5"),
])
def test_a_config_changed_after_load_state_dict_is_checked_by_fit(small, change, match):
    """fit validates a config set after __init__; the resume checks ran only in
    load_state_dict, so a field set between them went through: restoring the optimizer and
    scheduler then overwrote it (the cosine rate fell to 0 and climbed back; lr=0.5 was
    ignored while the next checkpoint recorded it)."""
    train, _ = small
    config = dict(COSINE)
    saved = _saved_at_epoch_2(train, config)
    trainer = SGDTrainer(SGDConfig(progress=False, epochs=4, **config))
    trainer.load_state_dict(saved["trainer"])
    for key, value in change.items():
        setattr(trainer.config, key, value)
    model = MixtureOfFactorAnalyzers(2, train.shape[1], 1, dtype=F64)
    model.load_state_dict(saved["model"])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_killed_fit_extends_from_its_last_epochs_checkpoint_but_a_returned_one_does_not(small):
    """The checkpoint written inside the last epoch (the model at that epoch) may grow into a
    longer constant-rate fit, equal to the uninterrupted one; the one written after fit
    returned holds the best epoch and refuses (it continued from the best epoch with the last
    epoch's Adam state, off by 0.18 from the uninterrupted fit)."""
    train, val = small
    config = dict(lr=0.02, patience=0, checkpoint_every=1, batch_size=128, seed=1)
    saved = []
    _fit(train, 2, 1, validation=val, epochs=2, **config,
         checkpoint_fn=lambda t, m: saved.append((roundtrip(t.state_dict()),
                                                  copy.deepcopy(m.state_dict()))))
    (in_loop, params), (final, _) = saved[-2], saved[-1]
    assert in_loop["epoch"] == final["epoch"] == 2 and final["final"] and not in_loop["final"]
    longer = SGDTrainer(SGDConfig(progress=False, epochs=4, **config))
    with pytest.raises(ValueError, match="finished fit"):
        longer.load_state_dict(final)
    longer.load_state_dict(in_loop)
    resumed = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    resumed.load_state_dict(params)
    _fit(train, 2, 1, validation=val, model=resumed, trainer=longer)
    full, _ = _fit(train, 2, 1, validation=val, epochs=4, **config)
    _assert_same_params(resumed, full, rtol=1e-9, atol=1e-9)


def test_state_dict_is_weights_only_loadable(small):
    train, val = small
    _, trainer = _fit(train, 2, 1, validation=val, epochs=2, patience=0)
    state = roundtrip(trainer.state_dict())
    assert state["epoch"] == 2
    assert state["config"]["epochs"] == 2
    assert len(state["history"]) == 2
    fresh = SGDTrainer(SGDConfig(progress=False, patience=0, epochs=2, checkpoint_every=3))
    fresh.load_state_dict(state)  # how often it saves may change (how long: not when finished)
    longer = SGDTrainer(SGDConfig(progress=False, patience=0, epochs=5))
    with pytest.raises(ValueError, match=r"finished fit \(2 of 2 epochs\).*best epoch"):
        longer.load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_state_dict({"epoch": 1})
    # anything else would be ignored (Adam's saved state carries lr on): refused, named
    for change in ({"lr": 1e-4}, {"patience": 5}, {"batch_size": 32}):
        other = SGDTrainer(SGDConfig(**{"progress": False, "patience": 0, **change}))
        key, value = next(iter(change.items()))
        with pytest.raises(ValueError, match=rf"saved with {key}=.* config has {key}={value}"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="'epoch' must be >= 0, got -3"):
        fresh.load_state_dict({**state, "epoch": -3})
    with pytest.raises(TypeError, match="'scheduler' must be dict"):
        fresh.load_state_dict({**state, "scheduler": None})


def _recording(seen: list, config: SGDConfig) -> SGDTrainer:
    """An SGDTrainer that appends the ``n_train`` of each prior penalty it takes to ``seen``."""

    class Recording(SGDTrainer):
        @staticmethod
        def penalty(model, prior, n_train):
            seen.append(n_train)
            return SGDTrainer.penalty(model, prior, n_train)

    return Recording(config)


def _first_epoch_state(train, val) -> dict:
    """The trainer state saved after epoch 1 of a 2-epoch fit (one epoch left to run)."""
    saved = []
    _fit(train, 2, 1, validation=val, epochs=2, patience=0, checkpoint_every=1,
         checkpoint_fn=lambda trainer, model: saved.append(roundtrip(trainer.state_dict())))
    assert saved[0]["epoch"] == 1
    return saved[0]


@pytest.mark.parametrize("k, d", [(3, 4), (2, 5), (1, 4)])
def test_resume_onto_another_model_is_refused_before_adam_runs(small, k, d):
    """The fused Adam kernel read past the saved moment buffers (munmap_chunk(): invalid
    pointer, exit 134) when the state was resumed onto a model of another size."""
    train, val = small
    state = _first_epoch_state(train, val)
    fresh = SGDTrainer(SGDConfig(progress=False, patience=0, epochs=2))
    fresh.load_state_dict(state)
    rows = torch.randn(50, d, dtype=F64, generator=gen(1))
    with pytest.raises(ValueError, match="saved for another model"):
        fresh.fit(MixtureOfFactorAnalyzers(k, d, 1, dtype=F64), rows)


def test_resume_with_adam_buffers_of_the_wrong_shape_is_refused(small):
    train, val = small
    model, _ = _fit(train, 2, 1, validation=val, epochs=2, patience=0)
    state = _first_epoch_state(train, val)
    for buffers in state["optimizer"]["state"].values():
        buffers["exp_avg"] = torch.zeros(1, dtype=F64)
    fresh = SGDTrainer(SGDConfig(progress=False, patience=0, epochs=2))
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match=r"Adam's exp_avg of parameter 0 has shape \(1,\)"):
        fresh.fit(model, train, val)


def test_one_shot_iterators_are_refused_up_front(small):
    train, val = small
    trainer = SGDTrainer(SGDConfig(progress=False, epochs=2))
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    with pytest.raises(TypeError, match="data is a one-shot iterator"):
        trainer.fit(model, iter(list(train.split(64))))
    with pytest.raises(TypeError, match="validation is a one-shot iterator"):
        trainer.fit(model, train, validation=(b for b in val.split(20)))


def test_prior_penalty_counts_the_rows_a_sampler_draws(small):
    from torch.utils.data import BatchSampler, SubsetRandomSampler

    from mfa.adam import count_rows

    train, _ = small
    data = TensorDataset(train)
    loader = DataLoader(data, batch_size=50, sampler=SubsetRandomSampler(range(100)))
    assert count_rows(loader) == 100
    assert count_rows(DataLoader(data, batch_size=50)) == len(train)
    # A batch_sampler's own sampler draws the rows (the loader's `sampler` is then a
    # default one over every row: 400 were counted), with drop_last too (the prior's
    # rows are the data's, as for batch_size with drop_last); a list of index lists counts
    # its indices; another kind of batch sampler's rows are the start's pass's (it may draw a
    # subset: 400 were counted for 100), else the dataset's (Adam raised without a pass).
    for drop_last in (False, True):
        batches = BatchSampler(SubsetRandomSampler(range(100)), 30, drop_last)
        assert count_rows(DataLoader(data, batch_sampler=batches)) == 100
    assert count_rows(DataLoader(data, batch_sampler=[[0, 1], [2, 3, 4]])) == 5

    class Pairs(torch.utils.data.Sampler):  # another kind: the start's pass counts them,
        def __iter__(self):  # else (no pass) the dataset's rows
            return iter([[0, 1], [2, 3]])

    assert count_rows(DataLoader(data, batch_sampler=Pairs())) is None
    assert count_rows(DataLoader(data, batch_sampler=Pairs()), dataset_if_unknown=True) == len(
        train)

    class FirstHundred(torch.utils.data.Sampler):  # unsized: it may draw a subset (it was
        def __iter__(self):  # counted as the dataset's 400 rows where the pass counts 100)
            return iter(range(100))

    unsized = DataLoader(data, batch_size=10, sampler=FirstHundred())
    assert count_rows(unsized) is None
    assert count_rows(unsized, dataset_if_unknown=True) == len(train)


def test_a_resumed_fit_whose_state_lacks_the_row_count_takes_the_datas(small):
    """A state without n_train (an older one) resumed on a loader whose rows only a pass
    counts: no pass runs on a resume, and it raised (advising the pass)."""
    train, val = small
    state = _first_epoch_state(train, val)
    state.pop("n_train")

    class Batches(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([list(range(i, min(i + 50, len(train)))) for i in range(0, len(train), 50)])

    seen = []
    trainer = _recording(seen, SGDConfig(progress=False, patience=0, epochs=2))
    trainer.load_state_dict(state)
    _fit(DataLoader(TensorDataset(train), batch_sampler=Batches()), 2, 1, validation=val,
         trainer=trainer, model=MixtureOfFactorAnalyzers(2, train.shape[1], 1, dtype=F64))
    assert set(seen) == {len(train)}


def test_prior_penalty_counts_rows_not_batches_of_a_loader_without_batching(small):
    """DataLoader(batch_size=None) over a Dataset of batches: its items are batches, and
    count_rows gave their number (7 for 400 rows: a prior 57x too strong); the start's pass
    now counts the rows, as for a list of the same batches."""
    from mfa.adam import count_rows

    train, val = small

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return train[index * 50:(index + 1) * 50]

    loader = DataLoader(Batches(), batch_size=None)
    assert count_rows(loader) is None
    seen = []
    for data in (loader, list(loader)):
        _recording(seen, SGDConfig(progress=False, epochs=1, seed=0)).fit(
            MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), data, validation=val)
    assert set(seen) == {200.0}


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_per_batch_schedules_need_data_with_a_length(small, schedule):
    train, _ = small

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(train)

    trainer = SGDTrainer(SGDConfig(progress=False, epochs=2, schedule=schedule))
    with pytest.raises(ValueError, match=f"schedule='{schedule}' needs the number of batches"):
        trainer.fit(MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), Stream(), validation=train)


def test_checkpoint_fn_schedule(small):
    train, val = small
    calls = []
    _fit(train, 2, 1, validation=val, epochs=4, patience=0, checkpoint_every=2,
         checkpoint_fn=lambda trainer, model: calls.append(len(trainer.history)))
    assert calls == [2, 4, 4]


# --------------------------------------------------------------------- inputs and config


def test_init_none_starts_from_the_given_model(small):
    train, val = small
    start = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64, generator=gen(0))
    with torch.no_grad():
        start.loc.copy_(train[:2])
    before = _dense_log_lik(start, val)
    model, trainer = _fit(train, 2, 1, validation=val, model=start, init="none", epochs=3,
                          lr=0.05, patience=0)
    assert model is start
    assert max(_vals(trainer)) > before


def test_data_errors(small):
    train, val = small
    bad = train.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _fit(bad, 2, 1, epochs=1)
    with pytest.raises(ValueError, match="non-finite"):
        _fit(train, 2, 1, validation=bad, epochs=1)
    with pytest.raises(ValueError, match="4 features"):
        _fit(train[:, :3], 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), epochs=1)
    with pytest.raises(TypeError, match="floating point"):
        _fit((train * 10).long(), 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64),
             epochs=1)
    with pytest.raises(TypeError, match="numpy array"):
        _fit(train.numpy(), 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), epochs=1)
    with pytest.raises(TypeError, match="must be a tensor, a Dataset or a DataLoader"):
        _fit(3.0, 2, 1, model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), epochs=1)


@pytest.mark.parametrize("wrap", ["dataset", "dataloader"])
def test_training_data_as_dataset_or_loader(small, wrap):
    """A Dataset is shuffled by the trainer's seeded DataLoader (reproducible); a DataLoader
    is used as it comes. Both train and score the validation data."""
    train, val = small
    data = TensorDataset(train) if wrap == "dataset" else DataLoader(TensorDataset(train), 64)
    model_a, trainer_a = _fit(data, 2, 1, validation=val, epochs=3, patience=0,
                              model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64))
    model_b, _ = _fit(data, 2, 1, validation=val, epochs=3, patience=0,
                      model=MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64))
    _assert_same_params(model_a, model_b, rtol=0, atol=0)
    vals = _vals(trainer_a)
    assert len(vals) == 3 and all(math.isfinite(v) for v in vals)
    with torch.no_grad():
        assert model_a.log_prob(val).mean().item() == pytest.approx(
            max(vals + [trainer_a.start_val_log_likelihood]), rel=1e-9)


@pytest.mark.parametrize("wrap", ["dataset", "dataloader"])
def test_validation_as_dataset_is_used_or_rejected(small, wrap):
    train, val = small
    _, reference = _fit(train, 2, 1, validation=val, epochs=2, patience=0)
    wrapped = TensorDataset(val) if wrap == "dataset" else DataLoader(TensorDataset(val), 50)
    try:
        _, trainer = _fit(train, 2, 1, validation=wrapped, epochs=2, patience=0)
    except TypeError:
        return  # rejecting it explicitly is fine too
    assert _vals(trainer) == pytest.approx(_vals(reference), rel=1e-10)


def test_more_components_than_distinct_points_with_weight_decay():
    x = torch.randn(5, 3, generator=gen(0), dtype=F64).repeat(40, 1)
    model, trainer = _fit(x, 8, 1, val_fraction=0.0, epochs=3, weight_decay=1e-3)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_more_components_than_distinct_points_no_nan():
    x = torch.randn(5, 3, generator=gen(0), dtype=F64).repeat(40, 1)
    model, trainer = _fit(x, 8, 1, val_fraction=0.0, epochs=3)
    for name in PARAMS:
        assert bool(torch.isfinite(getattr(model, name)).all())
    assert all(math.isfinite(h["train_log_likelihood"]) for h in trainer.history)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lr", 0.0, "lr"),
        ("lr", -1e-3, "lr"),
        ("batch_size", 0, "batch_size"),
        ("epochs", 0, "epochs"),
        ("epochs", 1.5, "epochs"),
        ("kmeans_iter", 0, "kmeans_iter"),
        ("init_samples", 0, "init_samples"),
        ("schedule", "linear", "schedule"),
        ("grad_clip", 0.0, "grad_clip"),
        ("grad_clip", -1.0, "grad_clip"),
        ("val_fraction", 1.0, "val_fraction"),
        ("val_fraction", -0.1, "val_fraction"),
        ("patience", -1, "patience"),
        ("init", "kmeans++", "init"),
    ],
)
def test_bad_config_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        SGDTrainer(SGDConfig(**{field: value}))


@pytest.mark.parametrize(
    "field, value",
    [("weight_decay", -1.0), ("variance_floor", -1.0), ("complete_iter", -1),
     ("checkpoint_every", -1), ("lr", float("inf"))],
)
def test_unchecked_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SGDTrainer(SGDConfig(**{field: value}))


# --------------------------------------------------------------------- divergence


def test_too_large_learning_rate_is_reported_as_divergence():
    """The review's probe: Adam with lr=1e3 on [0, 1) data ended silently at about −1e9 nats
    per row. Now the first epoch that falls far below the initial fit raises, names the
    learning rate, and leaves the model with its initial (finite) parameters."""
    x = torch.rand(600, 12, generator=gen(0), dtype=F64)
    start = MixtureOfFactorAnalyzers(3, 12, 2, dtype=F64)
    EMTrainer(EMConfig(max_iter=0, progress=False)).fit(start, x)  # the K-means start
    model = copy.deepcopy(start)
    config = SGDConfig(lr=1e3, epochs=5, init="none", val_fraction=0, progress=False)
    with pytest.raises(FloatingPointError,
                       match=r"Adam diverged at epoch 1: .*smaller learning rate than "
                             r"SGDConfig\.lr=1000; the model holds the initial parameters"):
        SGDTrainer(config).fit(model, x)
    _assert_same_params(model, start, rtol=0, atol=0)
    assert math.isfinite(EMTrainer.evaluate(model, x))


def test_divergence_after_good_epochs_keeps_the_best_epoch(small, monkeypatch):
    """An epoch that diverges after good ones restores the best epoch's parameters."""
    train, val = small
    kept, absurd_lr = {}, []

    def keep(trainer, model, record):
        kept[record["epoch"]] = copy.deepcopy(model.state_dict())
        if record["epoch"] == 2:
            absurd_lr.append(1e4)  # from epoch 3 on, Adam steps with lr = 1e4

    adam_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        for group in self.param_groups:
            group["lr"] = absurd_lr[0] if absurd_lr else group["lr"]
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    trainer = SGDTrainer(SGDConfig(lr=0.02, epochs=6, patience=0, progress=False))
    with pytest.raises(FloatingPointError, match="Adam diverged at epoch 3.*best epoch"):
        trainer.fit(model, train, validation=val, callbacks=[keep])
    best = max(trainer.history, key=lambda r: r["val_log_likelihood"])["epoch"]
    assert len(trainer.history) == 2
    for name, value in kept[best].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_resume_from_a_state_without_the_divergence_reference(small):
    """States saved before the divergence check (no ``reference_log_likelihood`` key)
    still resume to the uninterrupted result."""
    train, _ = small
    config = dict(epochs=4, lr=0.02, patience=0, batch_size=128, seed=2, progress=False)
    full, _ = _fit(train, 2, 1, **config)
    snapshots = []  # (trainer state, model state) after each epoch
    _fit(train, 2, 1, callbacks=[lambda t, m, r: snapshots.append(
        roundtrip((t.state_dict(), copy.deepcopy(m.state_dict()))))], **config)
    trainer_state, model_state = snapshots[1]
    assert trainer_state.pop("reference_log_likelihood") is not None
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    model.load_state_dict(model_state)
    trainer = SGDTrainer(SGDConfig(**config))
    trainer.load_state_dict(trainer_state)
    _fit(train, 2, 1, model=model, trainer=trainer)
    _assert_same_params(model, full, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0.0), ("lr", math.nan), ("epochs", 0), ("kmeans_iter", 0), ("variance_floor", 0.0),
     ("grad_clip", -1.0), ("val_fraction", 1.0), ("schedule", "linear"), ("seed", -1),
     ("device", "gpu0"), ("progress", 1), ("weight_decay", -1e-3),
     ("noise_prior_strength", -1.0), ("noise_prior_variance", 0.0),
     ("noise_prior_variance", "max"), ("weight_concentration", 0.5), ("loading_ridge", -1.0),
     ("step_scale", "pixel"), ("search_per_decade", 0), ("quantization_variance", 0.0),
     ("em_start", 1)],
)
def test_validate_names_the_field_and_the_bad_value(field, value):
    """SGDConfig.validate() holds the trainer's limits; messages name ``SGDConfig.<field>``
    and the bad value."""
    config = SGDConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^SGDConfig\.{field} .*got {re.escape(repr(value))}"):
        config.validate()
    with pytest.raises(ValueError, match=rf"^SGDConfig\.{field} "):
        SGDTrainer(config)


def test_validate_accepts_the_limits():
    SGDConfig(epochs=1, kmeans_iter=1, complete_iter=0, patience=0, grad_clip=None,
              val_fraction=0.0, weight_decay=0.0, device="cpu").validate()


# --------------------------------------------------------------------- prior penalty


def _reference_log_prior(weights, loadings, noise, nu, s0, alpha, ridge):
    """log p(θ) from torch.distributions (an independent writing of mfa.priors)."""
    from torch.distributions import Dirichlet, InverseGamma, Normal

    ig = InverseGamma(torch.tensor(nu / 2 - 1, dtype=F64), torch.tensor(nu * s0 / 2, dtype=F64))
    scale = (noise / ridge).sqrt().unsqueeze(-1).expand_as(loadings)
    return (ig.log_prob(noise).sum()
            + Dirichlet(torch.full_like(weights, alpha)).log_prob(weights)
            + Normal(torch.zeros_like(loadings), scale).log_prob(loadings).sum())


def test_prior_penalty_gradient_matches_autograd_of_the_log_prior():
    nu, s0, alpha, ridge, n = 6.0, 0.2, 2.5, 0.4, 321
    trainer = SGDTrainer(SGDConfig(noise_prior_strength=nu, noise_prior_variance=s0,
                                   weight_concentration=alpha, loading_ridge=ridge))
    model = MixtureOfFactorAnalyzers(3, 4, 2, dtype=F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen(5), dtype=F64))
    def grads():
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in model.parameters()]

    trainer.penalty(model, trainer.prior(), n).backward()
    got = grads()
    assert sum(bool(g.abs().sum() > 0) for g in got) == 3  # weights, loadings, noise; no means
    model.zero_grad()
    reference = -_reference_log_prior(model.weights, model.factor_loadings,
                                      model.noise_variance, nu, s0, alpha, ridge) / n
    reference.backward()
    for a, b in zip(got, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_zero_prior_strength_changes_nothing_and_a_prior_changes_the_fit(small):
    train, val = small
    base = dict(epochs=2, lr=1e-2, batch_size=200, progress=False, seed=3)
    fits = []
    for extra in ({"noise_prior_strength": 0.0},
                  {"noise_prior_strength": 0.0, "noise_prior_variance": 0.123},
                  {"noise_prior_strength": 50.0, "noise_prior_variance": 5.0}):
        model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
        trainer = SGDTrainer(SGDConfig(**base, **extra))
        trainer.fit(model, train, validation=val)
        fits.append((model, trainer))
    (plain, plain_t), (zero, zero_t), (strong, _) = fits
    for name in PARAMS:
        assert torch.equal(getattr(plain, name), getattr(zero, name)), name
    assert _vals(plain_t) == _vals(zero_t)
    # A strong prior towards s0 = 5 visibly raises the noise variances.
    assert bool((strong.noise_variance > plain.noise_variance).all())


def test_prior_penalty_counts_an_unsized_training_set_in_the_starts_pass(small):
    """An iterable of batches has no length: the start's E-step pass counts its rows for the
    penalty's 1/N, as a tensor's length does; without a pass it is refused before any work."""
    train, val = small
    batches = [train[:400], train[400:]]  # an iterable of batches: its size is unknown
    for data in (batches, train):
        model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
        trainer = SGDTrainer(SGDConfig(epochs=1, progress=False, init="none", lr=1e-2))
        with torch.no_grad():
            model.loc.copy_(train[:2])
        trainer.fit(model, data, validation=val)
        assert trainer.state_dict()["n_train"] == 800
    no_pass = SGDTrainer(SGDConfig(epochs=1, progress=False, init="none",
                                   noise_prior_variance=1e-3))
    with pytest.raises(ValueError, match="need the number of training rows.*keep em_start"):
        no_pass.fit(MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), batches, validation=val)


def test_a_nan_minibatch_loss_mid_epoch_restores_finite_parameters(small, monkeypatch):
    """A NaN loss at step 5 (of the first epoch) raises naming the learning rate, before any
    step with it: the model is left with its initial parameters, all finite."""
    train, val = small
    original = MixtureOfFactorAnalyzers._component_log_prob
    calls = []

    def nan_at_step_5(self, x, terms=None, exact=True, near_rows_only=False):
        out = original(self, x, terms, exact, near_rows_only)
        if torch.is_grad_enabled():  # the training steps, not the validation passes
            calls.append(1)
            if len(calls) == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(MixtureOfFactorAnalyzers, "_component_log_prob", nan_at_step_5)
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    trainer = SGDTrainer(SGDConfig(lr=0.02, epochs=3, batch_size=50, progress=False,
                                   init="random"))
    with pytest.raises(FloatingPointError, match=r"epoch 1: the minibatch loss is nan.*"
                                                 r"SGDConfig\.lr.*initial parameters"):
        trainer.fit(model, train, validation=val)
    assert len(calls) == 5
    for name, value in model.state_dict().items():
        assert bool(torch.isfinite(value).all()), name


def test_quantized_rows_train_as_their_float_tensor():
    """Adam on uint8 QuantizedRows (rows drawn by index, made float per batch) takes exactly
    the steps it takes on the same rows converted up front."""
    from mfa.data import QuantizedRows
    levels = (60 + 30 * torch.randn(300, 8, generator=gen(0))).clamp(0, 255).round()
    rows = QuantizedRows(levels.to(torch.uint8), dequantize=True, seed=1)
    cfg = dict(epochs=2, batch_size=50, lr=1e-2, kmeans_iter=2, complete_iter=1,
               progress=False, noise_prior_strength=1.0)
    models = []
    for data in (rows, rows[0:300]):
        model = MixtureOfFactorAnalyzers(2, 8, 1, generator=gen(2))
        SGDTrainer(SGDConfig(**cfg)).fit(model, data)
        models.append(model)
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name


def test_adam_is_fused_where_the_device_has_the_kernel_and_falls_back_otherwise(monkeypatch):
    """The trainer's Adam uses the fused kernel on CPUs (the same update as the default
    implementation, to rounding), and the default implementation where ``fused=True`` is
    refused (a device or dtype without the kernel)."""
    import mfa.adam as sgd

    params = [torch.zeros(3, requires_grad=True)]
    assert sgd.make_adam(params, 1e-3).defaults["fused"] is True

    real_adam = torch.optim.Adam

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real_adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    fallback = sgd.make_adam(params, 1e-3)
    assert not fallback.defaults["fused"]
    monkeypatch.undo()

    # One step of each on the same gradient agrees to float32 rounding.
    steps = []
    for fused in (True, False):
        p = torch.linspace(-1.0, 1.0, 50, requires_grad=True)
        opt = torch.optim.Adam([p], lr=1e-2, fused=fused)
        for _ in range(3):
            opt.zero_grad()
            (p.sin() * p).sum().backward()
            opt.step()
        steps.append(p.detach())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-6, atol=1e-7)


def test_adam_loss_is_exact_for_a_float32_heywood_component():
    """A float32 component with one noise variance at 1e-9 under loadings of size 1: Adam's
    loss took the plain Woodbury form, 3 nats a row off with gradients 30-90x off; an epoch
    with such a component now takes the exact form (the float64 model's value)."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(4)
    trainer = SGDTrainer(SGDConfig(epochs=1, lr=1e-9, batch_size=4096, progress=False,
                                   init="none", patience=0))
    trainer.fit(m32, x, validation=x[:100])
    with torch.no_grad():
        expected = m64.log_prob(x.double()).mean().item()
    assert trainer.history[0]["train_log_likelihood"] == pytest.approx(expected, abs=1e-4)


def test_resume_with_fewer_epochs_than_done_is_refused(small):
    train, val = small
    saved = []
    config = dict(lr=0.02, patience=0, checkpoint_every=1, batch_size=128)
    _fit(train, 2, 1, validation=val, epochs=5, **config,
         checkpoint_fn=lambda t, m: saved.append(roundtrip(t.state_dict())))
    third = next(s for s in saved if s["epoch"] == 3 and not s["final"])
    with pytest.raises(ValueError, match=r"already done 3 epochs; epochs=2 is below that"):
        SGDTrainer(SGDConfig(progress=False, epochs=2, **config)).load_state_dict(third)
    SGDTrainer(SGDConfig(progress=False, epochs=4, **config)).load_state_dict(third)


# --------------------------------------------------------------------- the start, noise steps


def _start_of(trainer: SGDTrainer, model, train, val, monkeypatch) -> dict:
    """Adam's start (after the initialisation and mfa.sgd_start), captured before any step."""
    captured = {}
    real = SGDTrainer._start

    def spy(self, *args, **kwargs):
        s0 = real(self, *args, **kwargs)
        captured.update({name: getattr(model, name).detach().clone() for name in PARAMS})
        return s0

    monkeypatch.setattr(SGDTrainer, "_start", spy)
    _fit(train, 2, 1, validation=val, model=model, trainer=trainer)
    return captured


@pytest.mark.parametrize("s0", ["auto", 0.05])
def test_the_start_is_one_map_em_iteration_with_ems_noise_prior(small, monkeypatch, s0):
    """Adam's start equals EM after one iteration from the same initialisation: EM with
    search_warmup=0 chooses s₀ from the same statistics (auto), or uses the fixed one."""
    train, val = small
    common = dict(seed=4, kmeans_iter=5, complete_iter=1, noise_prior_variance=s0,
                  progress=False)
    trainer = SGDTrainer(SGDConfig(epochs=1, **common))
    start = _start_of(trainer, MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), train, val,
                      monkeypatch)
    em_model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    em = EMTrainer(EMConfig(max_iter=1, search_warmup=0, patience=0, tempered_step=False,
                            **common))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em.fit(em_model, train, validation=val)
    if s0 == "auto":
        assert trainer.selected_noise_prior_variance == em.selected_noise_prior_variance
        assert trainer.prior().noise_variance == em.selected_noise_prior_variance
    else:
        assert trainer.selected_noise_prior_variance is None
        assert trainer.prior().noise_variance == s0
    for name in PARAMS:
        torch.testing.assert_close(start[name], getattr(em_model, name).detach(),
                                   rtol=1e-10, atol=1e-12)
    # the start's validation score is the first the epochs compete with
    with torch.no_grad():
        assert trainer.start_val_log_likelihood == pytest.approx(
            _dense_log_lik(MixtureOfFactorAnalyzers.from_parameters(
                *(start[name] for name in PARAMS)), val), rel=1e-10)


def test_without_em_start_or_prior_the_start_is_the_initialisation(small, monkeypatch):
    train, val = small
    common = dict(seed=4, kmeans_iter=5, complete_iter=1, progress=False,
                  noise_prior_strength=0.0)
    trainer = SGDTrainer(SGDConfig(epochs=1, em_start=False, **common))
    start = _start_of(trainer, MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), train, val,
                      monkeypatch)
    em_model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    EMTrainer(EMConfig(max_iter=0, patience=0, tempered_step=False, **common)).fit(
        em_model, train, validation=val)  # initialisation only
    for name in PARAMS:
        assert torch.equal(start[name], getattr(em_model, name).detach()), name


@pytest.mark.parametrize("reuse", [False, True])
def test_noise_scaled_steps_are_adam_on_means_and_loadings_over_the_noise_std(reuse):
    """step_scale='noise': three steps of the trainer's update equal Adam on θ = μ/√d and
    Λ = A/√d (d held fixed: the noise parameter frozen), mapped back; with the trainer's
    buffers reused across steps, too."""
    from mfa.adam import make_adam, scaled_step, step_buffers

    model = random_model(3, 5, 2, seed=1)
    x = random_data(64, model, seed=2)
    model.raw_noise.requires_grad_(False)  # d fixed, so the reparametrisation is linear
    scale = model.noise_variance.detach().sqrt()  # [K, D]
    theta = (model.loc.detach() / scale).requires_grad_(True)
    lam = (model.loadings.detach() / scale[..., None]).requires_grad_(True)
    logits = model.logits.detach().clone().requires_grad_(True)
    reference = torch.optim.Adam([logits, theta, lam], lr=0.05)
    optimizer = make_adam([model.logits, model.loc, model.loadings], 0.05)
    before = step_buffers(model) if reuse else None
    for _ in range(3):
        optimizer.zero_grad()
        (-model.log_prob(x).mean()).backward()
        scaled_step(optimizer, model, by_noise=True, before=before)
        reference.zero_grad()
        log_w = torch.log_softmax(logits, 0)
        cov = (lam * scale[..., None]) @ (lam * scale[..., None]).mT + torch.diag_embed(
            model.noise_variance.detach())
        comp = MultivariateNormal(theta * scale, covariance_matrix=cov)
        (-torch.logsumexp(log_w + comp.log_prob(x.unsqueeze(1)), -1).mean()).backward()
        reference.step()
    # (Adam's eps=1e-8 acts on gradients of another scale: the only difference)
    torch.testing.assert_close(model.loc.detach(), theta.detach() * scale, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.loadings.detach(), lam.detach() * scale[..., None],
                               rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.logits.detach(), logits.detach(), rtol=1e-5, atol=1e-8)


def test_float32_adam_loss_is_exact_on_pixel_like_rows():
    """Means 0.4-0.6, loadings of 0.3, noise variances at 1e-6, a float32 model at the truth
    (a learning rate too small to move it): the epoch's recorded log-likelihood equals a dense
    float64 MultivariateNormal's. The cheap Woodbury loss was +0.05 nats a row off in every
    batch (its errors did not cancel) and its noise gradient 0.47 relative off; ε·cond(M)
    stayed far below the ill-conditioning switch, so nothing turned the exact form on."""
    g = gen(0)
    k, d, lat, n = 2, 20, 2, 1024
    means = 0.4 + 0.2 * torch.rand(k, d, generator=g, dtype=torch.float64)
    loadings = 0.3 * torch.randn(k, d, lat, generator=g, dtype=torch.float64)
    comp = torch.randint(0, k, (n,), generator=g)
    x = (means[comp] + (loadings[comp] @ torch.randn(n, lat, 1, generator=g,
                                                     dtype=torch.float64)).squeeze(-1)
         + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64))
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means.float(), loadings.float(), torch.full((k, d), 1e-6),
        min_noise=0.0)
    trainer = SGDTrainer(SGDConfig(epochs=1, lr=1e-12, batch_size=256, init="none",
                                   em_start=False, noise_prior_strength=0.0, patience=0,
                                   val_fraction=0.0,
                                   progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, x.float())
    w, mu, a, psi = (t.detach().double() for t in (model.weights, model.means,
                                                   model.factor_loadings, model.noise_variance))
    exact = torch.logsumexp(torch.stack([w[j].log() + MultivariateNormal(
        mu[j], a[j] @ a[j].T + torch.diag(psi[j])).log_prob(x) for j in range(k)]), 0).mean()
    assert trainer.history[0]["train_log_likelihood"] == pytest.approx(float(exact), abs=5e-3)


def test_a_loading_ridge_without_loadings_is_no_penalty():
    """A diagonal GMM (L = 0) with loading_ridge > 0 as the only prior term: the ridge has
    nothing to act on, so the fit equals the unregularised one up to rounding (the start's
    M-step takes the MAP form) (it crashed: backward() of the constant 0 penalty, 'element 0
    of tensors does not require grad')."""
    x = torch.randn(100, 6, generator=gen(0), dtype=F64)
    val = torch.randn(30, 6, generator=gen(1), dtype=F64)
    fits = []
    for ridge in (0.0, 1.0):
        model = MixtureOfFactorAnalyzers(2, 6, 0, dtype=F64)
        SGDTrainer(SGDConfig(progress=False, epochs=2, seed=0, noise_prior_strength=0.0,
                             loading_ridge=ridge)).fit(model, x, validation=val)
        fits.append(model.state_dict())
    for key in fits[0]:
        torch.testing.assert_close(fits[1][key], fits[0][key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("lr", math.nan), ("epochs", 2.5),
                                          ("grad_clip", math.nan)])
def test_fit_checks_a_config_changed_after_the_trainer_was_made(small, field, value):
    """The config was checked in __init__ only: a field set afterwards failed deep inside
    (ZeroDivisionError, torch's own message) or, for grad_clip=nan, left a NaN model."""
    train, val = small
    trainer = SGDTrainer(SGDConfig(epochs=2, progress=False))
    setattr(trainer.config, field, value)
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    with pytest.raises(ValueError, match=rf"^SGDConfig\.{field} "):
        trainer.fit(model, train, validation=val)


def test_non_finite_gradients_raise_and_leave_the_best_epoch():
    """A float32 noise variance driven toward 0 on a constant feature (min_noise=0): the loss
    stayed finite while 1/d² overflowed in the gradients, Adam's step made every parameter
    NaN, and the next density call raised a ValueError with the model left NaN."""
    g = gen(0)
    x = torch.randn(300, 4, generator=g)
    v = torch.randn(60, 4, generator=g)
    x[:, 0] = v[:, 0] = 0.5  # one constant feature
    model = MixtureOfFactorAnalyzers(1, 4, 0, min_noise=0.0)
    trainer = SGDTrainer(SGDConfig(progress=False, epochs=60, batch_size=8,
                                   noise_prior_strength=0.0))
    with pytest.raises(FloatingPointError, match=r"the gradient's norm is (nan|inf).*lower the "
                                                 r"learning rate.*the best epoch's parameters"):
        trainer.fit(model, x, validation=v)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    best = max(h["val_log_likelihood"] for h in trainer.history)
    assert model.log_prob(v).mean().item() == pytest.approx(best, rel=1e-5)


def test_weight_decay_keeps_a_component_of_weight_zero():
    """A component of weight 0 (logit −inf, allowed by from_parameters) with weight_decay > 0:
    Adam's decay gave it a gradient −inf and the step made its logit NaN."""
    truth = random_model(2, 4, 1, seed=3)
    x, v = random_data(200, truth, seed=4), random_data(50, truth, seed=5)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5, 0.0], dtype=F64), torch.cat([truth.means.detach(),
                                                            truth.means.detach()[:1]]),
        torch.cat([truth.factor_loadings.detach(), truth.factor_loadings.detach()[:1]]),
        torch.cat([truth.noise_variance.detach(), truth.noise_variance.detach()[:1]]))
    SGDTrainer(SGDConfig(progress=False, epochs=3, init="none", em_start=False,
                         weight_decay=1e-3, noise_prior_strength=0.0)).fit(model, x, validation=v)
    assert model.logits.detach()[2] == -math.inf
    assert all(bool(torch.isfinite(p).all()) for name, p in model.named_parameters()
               if name != "logits")
    assert model.weights.detach()[2] == 0 and torch.isfinite(model.weights.detach()).all()


@pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")
def test_weight_decay_resumes_exactly_from_a_state_saved_when_adam_applied_it(small):
    """The decay moved from Adam's parameter group to the gradients: a state saved by the
    earlier form (group weight_decay > 0) must not decay twice on resume."""
    train, _ = small
    val = None  # without validation the last epoch is the result, so epochs 3 and 4 count
    config = dict(epochs=4, patience=0, weight_decay=0.05, progress=False, checkpoint_every=1,
                  val_fraction=0.0, noise_prior_strength=0.0)
    full = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    SGDTrainer(SGDConfig(**config)).fit(full, train, validation=val)
    saved = {}

    def keep(trainer, model):
        if trainer.history and trainer.history[-1]["epoch"] == 2 and "t" not in saved:
            saved["t"] = copy.deepcopy(trainer.state_dict())
            saved["m"] = copy.deepcopy(model.state_dict())

    SGDTrainer(SGDConfig(**config)).fit(MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), train,
                                        validation=val, checkpoint_fn=keep)
    for group in saved["t"]["optimizer"]["param_groups"]:
        group["weight_decay"] = 0.05  # as the earlier form saved it
    resumed = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    resumed.load_state_dict(saved["m"])
    trainer = SGDTrainer(SGDConfig(**config))
    trainer.load_state_dict(saved["t"])
    trainer.fit(resumed, train, validation=val)
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_divergence_on_validation_names_the_validation_score(small, monkeypatch):
    """An epoch whose validation score was -inf was reported as a fall of the train
    log-likelihood, which had not fallen."""
    train, val = small
    calls = []

    def evaluate(model, source):
        calls.append(1)
        return 0.0 if len(calls) == 1 else -math.inf  # the start scores, the epoch does not

    monkeypatch.setattr("mfa.training.evaluate", evaluate)
    with pytest.raises(FloatingPointError, match=r"diverged at epoch 1: the validation "
                                                 r"log-likelihood is -inf \(train: "):
        SGDTrainer(SGDConfig(epochs=2, progress=False, em_start=False,
                             noise_prior_strength=0.0)).fit(
            MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64), train, validation=val)


def test_a_batch_of_no_rows_is_skipped_not_taken_for_divergence():
    """A 0-row batch from an iterable of batches made the minibatch loss NaN (the mean of no
    rows), reported as divergence with advice to lower the learning rate; EM took it."""
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    # No validation: the last epoch's parameters are returned (with it, early stopping kept
    # the start's, and any two fits compared equal). A constant rate: a schedule counts the
    # batches of a list, the empty one too.
    config = SGDConfig(epochs=2, progress=False, seed=0, schedule="constant")
    fits = []
    for batches in ([x[:100], x[100:100], x[100:350]], [x[:100], x[100:350]]):
        trainer = SGDTrainer(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append((trainer.fit(MixtureOfFactorAnalyzers(3, 6, 2), batches),
                         [r["train_log_likelihood"] for r in trainer.history]))
    (with_empty, seen), (without, expected) = fits
    assert seen == expected and len(seen) == 2 and seen[0] != seen[1]  # (the epochs moved it)
    for a, b in zip(with_empty.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_weight_of_zero_under_a_dirichlet_prior_is_refused_naming_the_setting():
    """from_parameters takes a weight of 0; with weight_concentration > 1 its log-prior
    (α − 1) log 0 is −inf and Adam failed at its first step with "the minibatch loss is inf;
    lower the learning rate", at any lr. EM fits the same start (its counts N_k + α − 1)."""
    truth = random_model(2, 4, 1, seed=3)
    x, v = random_data(200, truth, seed=4), random_data(50, truth, seed=5)

    def start():
        def cat(t):
            return torch.cat([t.detach(), t.detach()[:1]])
        return MixtureOfFactorAnalyzers.from_parameters(
            torch.tensor([0.5, 0.5, 0.0], dtype=F64), cat(truth.means),
            cat(truth.factor_loadings), cat(truth.noise_variance))

    model = start()
    before = {k: p.clone() for k, p in model.state_dict().items()}
    for lr in (0.05, 1e-6):
        config = SGDConfig(progress=False, epochs=2, init="none", lr=lr,
                           weight_concentration=2.0, noise_prior_strength=0.0)
        with pytest.raises(ValueError, match=r"SGDConfig.weight_concentration=2 .*"
                                             r"component\(s\) \[2\], of weight 0"):
            SGDTrainer(config).fit(model, x, validation=v)
    assert all(torch.equal(p, before[k]) for k, p in model.state_dict().items())
    flat = SGDConfig(progress=False, epochs=2, init="none", noise_prior_strength=0.0)
    SGDTrainer(flat).fit(start(), x, validation=v)  # (α = 1: no prior, a weight of 0 stays)
