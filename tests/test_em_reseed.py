"""EMTrainer's re-seeding rounds (EMConfig.reseed_rounds, mfa.pruning): after the restarts,
the components that lower the validation score are re-seeded and EM runs again from there;
the round is kept only if its validation score is better; resume inside a round is exact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import F64, random_data, random_model, roundtrip

from mfa import EMConfig, EMTrainer, MixtureOfFactorAnalyzers
from mfa.pruning import harmful_components
from mfa.training import ConvergenceWarning

PARAMS = ("weights", "means", "factor_loadings", "noise_variance")
CFG = dict(noise_prior_strength=0.0, patience=3, max_iter=60, tol=0.0, seed=1,
           min_component_mass=0.0, checkpoint_every=1, search_warmup=0, progress=False)


@pytest.fixture(scope="module")
def overfit():
    """Few train rows in D=12 from 2 components, fitted with K=6: components overfit."""
    model = random_model(2, 12, 3, seed=31)
    return random_data(40, model, seed=32, scale=1.0), random_data(400, model, seed=33, scale=1.0)


def _fit(train, val, model=None, trainer=None, callbacks=(), checkpoint_fn=None, **config):
    model = model or MixtureOfFactorAnalyzers(6, 12, 3, dtype=F64)
    trainer = trainer or EMTrainer(EMConfig(**{**CFG, **config}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, train, validation=val, callbacks=callbacks,
                    checkpoint_fn=checkpoint_fn)
    return model, trainer


def _params(model):
    return {n: getattr(model, n).detach().clone() for n in PARAMS}


def test_a_round_reseeds_the_harmful_components_and_keeps_the_better_validation_score(overfit):
    train, val = overfit
    first, _ = _fit(train, val, reseed_rounds=0)
    harmful = harmful_components(first, val)
    assert harmful, "the case this test is about: some components lower the validation score"
    snapshots = []

    def snap(trainer, model, record):
        snapshots.append((record, _params(model)))

    model, trainer = _fit(train, val, reseed_rounds=1, callbacks=[snap])
    runs = [h["run"] for h in trainer.history]
    assert runs[0] == 0 and runs[-1] == 1 and runs == sorted(runs)  # the round ran after
    first_best = max(h["val_log_likelihood"] for h in trainer.history if h["run"] == 0)
    round_scored = [(r["val_log_likelihood"], i) for i, (r, _) in enumerate(snapshots)
                    if r["run"] == 1 and r["val_log_likelihood"] is not None]
    round_best, at = max(round_scored)
    final = trainer.evaluate(model, val)
    assert final == pytest.approx(max(first_best, round_best), rel=1e-12)
    kept = snapshots[at][1] if round_best > first_best else _params(first)
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), kept[name]), name
    # the round started from the first restart's result with the harmful components re-seeded
    start = snapshots[runs.index(1)][1]
    untouched = [k for k in range(6) if k not in harmful]
    assert not torch.equal(start["means"], first.means.detach())
    assert start["means"].shape == first.means.shape and untouched


def test_no_round_without_validation_or_with_reseed_rounds_0(overfit):
    train, val = overfit
    _, trainer = _fit(train, None, reseed_rounds=1, val_fraction=0.0, patience=0,
                      max_iter=5)
    assert {h["run"] for h in trainer.history} == {0}
    _, trainer = _fit(train, val, reseed_rounds=0)
    assert {h["run"] for h in trainer.history} == {0}
    # max_iter=0 (initialisation only): nothing to re-seed from
    _, trainer = _fit(train, val, reseed_rounds=1, max_iter=0, init="kmeans")
    assert trainer.history == [] and trainer.state_dict()["run"] == 1


#: The automatic noise prior (EMConfig's default) on the same data, tempered step off.
AUTO = dict(noise_prior_strength=1.0, noise_prior_variance="auto", search_warmup=1,
            tempered_step=False)
AUTO_LOWER = EMConfig().quantization_variance  # the weakest s₀, that of the warm-up


def test_a_state_saved_without_its_chosen_noise_prior_gets_rounds_that_search(overfit):
    """A finished fit's state from before the chosen s₀ was recorded: its rounds cannot know
    it, so they warm up and search as a restart does (they ran at the weakest s₀, searchless)."""
    train, val = overfit
    first, first_trainer = _fit(train, val, reseed_rounds=0, **AUTO)
    state = first_trainer.state_dict()
    assert state.pop("selected_noise_prior_variance") > AUTO_LOWER
    del state["config"]["reseed_rounds"]  # (an EMConfig field since the rounds)
    model = MixtureOfFactorAnalyzers(6, 12, 3, dtype=F64)
    model.load_state_dict(first.state_dict())
    trainer = EMTrainer(EMConfig(**{**CFG, **AUTO, "reseed_rounds": 1}))
    trainer.load_state_dict(roundtrip(state))
    _fit(train, val, model=model, trainer=trainer)
    in_round = [h for h in trainer.history if h["run"] == 1]
    assert in_round and in_round[0]["noise_prior_variance"] == AUTO_LOWER  # the warm-up
    assert any(h["step_noise_prior_variance"] not in (AUTO_LOWER, None) for h in in_round)


def test_under_auto_a_round_keeps_the_chosen_noise_prior_and_runs_no_search(overfit):
    """A round refines the kept result under the s₀ its search chose: no warm-up under the
    weakest s₀ (which undid the fit before the search recovered it) and no search."""
    train, val = overfit
    _, first = _fit(train, val, reseed_rounds=0, **AUTO)
    chosen = first.selected_noise_prior_variance
    assert chosen is not None and chosen > AUTO_LOWER
    _, trainer = _fit(train, val, reseed_rounds=2, **AUTO)
    in_rounds = [h for h in trainer.history if h["run"] >= 1]
    assert in_rounds, "the case this test is about: a round ran"
    def timeless(records):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in records]

    assert timeless(h for h in trainer.history if h["run"] == 0) == timeless(first.history)
    for h in in_rounds:
        assert h["noise_prior_variance"] == chosen, h
        assert h["step_noise_prior_variance"] in (chosen, None), h
    assert trainer.selected_noise_prior_variance == chosen


@pytest.mark.parametrize("config", [{}, AUTO], ids=["fixed", "auto"])
@pytest.mark.parametrize("stop_in_round", [1, 3])
def test_resume_inside_a_round_is_exact(overfit, stop_in_round, config):
    """Interrupted at the round's first or third iteration and resumed from the saved state,
    the fit ends exactly as the uninterrupted one, history and state included."""
    train, val = overfit
    full, full_trainer = _fit(train, val, reseed_rounds=1, **config)
    saved = {}

    class _Interrupt(KeyboardInterrupt):
        pass

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    def stop(trainer, model, record):
        if record["run"] == 1 and record["iteration"] == stop_in_round:
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(train, val, reseed_rounds=1, callbacks=[stop], checkpoint_fn=checkpoint, **config)
    resumed = MixtureOfFactorAnalyzers(6, 12, 3, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(**{**CFG, "reseed_rounds": 1, **config}))
    trainer.load_state_dict(roundtrip(saved["trainer"]))
    _fit(train, val, model=resumed, trainer=trainer)
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert [(h["run"], h["iteration"], h["val_log_likelihood"]) for h in trainer.history] == [
        (h["run"], h["iteration"], h["val_log_likelihood"]) for h in full_trainer.history]
    got, want = trainer.state_dict(), full_trainer.state_dict()
    assert set(got) == set(want) and got["run"] == want["run"] == 2
    assert got["best_run_val"] == want["best_run_val"]


def test_reseed_rounds_is_validated():
    with pytest.raises(ValueError, match="reseed_rounds"):
        EMConfig(reseed_rounds=-1).validate()


def test_a_round_that_does_not_pay_leaves_the_first_result(overfit, monkeypatch):
    """Every validation score of the round lowered by 100 nats (so the round cannot beat the
    first restart): the first restart's parameters and score stay."""
    import mfa.pruning

    in_round = []
    reseed = mfa.pruning.reseed_components
    score = EMTrainer._score_validation

    def reseed_and_mark(model, components, generator):
        in_round.append(True)
        reseed(model, components, generator)

    def lowered(self, model, ctx):
        value = score(self, model, ctx)
        return value - 100.0 if in_round and value is not None else value

    train, val = overfit
    first, _ = _fit(train, val, reseed_rounds=0)
    monkeypatch.setattr(mfa.pruning, "reseed_components", reseed_and_mark)
    monkeypatch.setattr(EMTrainer, "_score_validation", lowered)
    model, trainer = _fit(train, val, reseed_rounds=1)
    assert in_round and {h["run"] for h in trainer.history} == {0, 1}
    first_best = max(h["val_log_likelihood"] for h in trainer.history if h["run"] == 0)
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), getattr(first, name).detach()), name
    assert trainer.state_dict()["best_run_val"] == pytest.approx(first_best, rel=1e-12)


def test_a_fit_saved_before_the_rounds_gets_them_against_its_own_score(overfit, monkeypatch):
    """A finished fit's state without ``best_run_val`` (saved before re-seeding rounds
    existed): fit again runs the rounds and keeps them only above the saved fit's own
    validation score (here every score of the round is lowered by 100 nats: none is kept)."""
    import mfa.pruning

    in_round = []
    reseed = mfa.pruning.reseed_components
    score = EMTrainer._score_validation
    monkeypatch.setattr(mfa.pruning, "reseed_components",
                        lambda m, c, g: (in_round.append(True), reseed(m, c, g)))
    monkeypatch.setattr(EMTrainer, "_score_validation", lambda self, m, ctx: (
        score(self, m, ctx) - (100.0 if in_round else 0.0)))
    train, val = overfit
    first, first_trainer = _fit(train, val, reseed_rounds=0)
    state = first_trainer.state_dict()
    state.pop("best_run_val", None)
    del state["config"]["reseed_rounds"]  # (an EMConfig field since the rounds)
    model = MixtureOfFactorAnalyzers(6, 12, 3, dtype=F64)
    model.load_state_dict(first.state_dict())
    trainer = EMTrainer(EMConfig(**{**CFG, "reseed_rounds": 1}))
    trainer.load_state_dict(roundtrip(state))
    _fit(train, val, model=model, trainer=trainer)
    assert in_round  # the round ran
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), getattr(first, name).detach()), name


def test_the_progress_bar_names_a_round_as_a_round(overfit, monkeypatch):
    """A round's bar read "EM run 2/1" (the run counter past n_init); it now reads as a
    re-seeding round of reseed_rounds."""
    from mfa import training

    labels = []
    real = training.progress_bar

    def spy(iterable, enabled, **kwargs):
        labels.append(kwargs.get("desc"))
        return real(iterable, enabled, **kwargs)

    monkeypatch.setattr(training, "progress_bar", spy)
    train, val = overfit
    _, trainer = _fit(train, val, reseed_rounds=2)
    assert {h["run"] for h in trainer.history} >= {0, 1}  # (a round ran)
    assert labels[0] == "EM run 1/1"
    assert labels[1] == "EM re-seeding round 1/2"


def test_no_rounds_on_fewer_validation_rows_than_a_choice_needs(caplog):
    """On 1 to 5 validation rows a round was kept whenever their mean rose by chance: on
    three blobs (350 training rows) the kept round's test log-likelihood was -8.4 nats a row
    against -5.6 without rounds, its training likelihood halved."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=gen) * 3
    x = centres[torch.randint(3, (600,), generator=gen)] + 0.5 * torch.randn(600, 6,
                                                                             generator=gen)
    for rows, ran in ((3, False), (10, True)):
        trainer = EMTrainer(EMConfig(max_iter=30, progress=False))
        with warnings.catch_warnings(), caplog.at_level("INFO", logger="mfa"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            caplog.clear()
            trainer.fit(MixtureOfFactorAnalyzers(3, 6, 2), x[:350], validation=x[350:350 + rows])
        skipped = "EM's re-seeding rounds skipped: 3 validation row(s)" in caplog.text
        assert skipped is not ran
        if not ran:
            assert max(r["run"] for r in trainer.history) == 0
