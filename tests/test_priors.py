"""MAP EM (mfa.priors, mfa.m_step.m_step with a prior), the automatic noise prior
(mfa.prior_search) and early stopping in mfa.em.EMTrainer.

References: the expected complete-data log-posterior written densely per component with
``torch.distributions`` priors (InverseGamma, Dirichlet, Normal), whose gradient must vanish at
the MAP M-step; planted noise variances; snapshots of the parameters during a fit.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from helpers import gen, random_data, random_model, roundtrip
from torch.distributions import Dirichlet, InverseGamma, Normal

from mfa import MixtureOfFactorAnalyzers
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.m_step import m_step, m_steps
from mfa.prior_search import log_grid
from mfa.priors import QUANTIZATION_VARIANCE, Prior, quantization_variance
from mfa.statistics import accumulate_statistics

F64 = torch.float64
PARAMS = ("weights", "means", "factor_loadings", "noise_variance")

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_log_prior(prior: Prior, weights, loadings, noise) -> torch.Tensor:
    """log p(θ) from torch.distributions (constants included), ``noise`` ``[K, D]``."""
    total = torch.zeros((), dtype=F64)
    if prior.noise_strength > 0:
        ig = InverseGamma(torch.tensor(prior.noise_strength / 2 - 1, dtype=F64),
                          torch.tensor(prior.noise_strength * prior.noise_variance / 2, dtype=F64))
        total = total + ig.log_prob(noise).sum()
    if prior.weight_concentration != 1:
        total = total + Dirichlet(torch.full_like(weights, prior.weight_concentration)).log_prob(
            weights)
    if prior.loading_ridge > 0:
        scale = (noise / prior.loading_ridge).sqrt().unsqueeze(-1).expand_as(loadings)
        total = total + Normal(torch.zeros_like(loadings), scale).log_prob(loadings).sum()
    return total


def _stats(model, x):
    with torch.no_grad():
        return accumulate_statistics(model, x, model.component_terms())


def _expected_log_posterior(model, x, prior, weights, means, loadings, noise):
    """Σ_n Σ_k r_nk E[log π_k + log N(x_n | A_k z + μ_k, D_k)] + log p(θ), the expectation
    under the posterior of ``model`` (dense float64 solves, component by component)."""
    a0, d0 = model.factor_loadings.detach(), model.noise_variance.detach()
    k, dim, lat = a0.shape
    resp = torch.softmax(model._component_log_prob(x).detach(), -1)  # [n, K]
    total = torch.zeros((), dtype=F64)
    for j in range(k):
        prec = torch.eye(lat, dtype=F64) + (a0[j].T / d0[j]) @ a0[j]  # M
        cov = torch.linalg.solve(prec, torch.eye(lat, dtype=F64))
        ez = torch.linalg.solve(prec, (a0[j].T / d0[j]) @ (x - model.means.detach()[j]).T).T
        resid = x - ez @ loadings[j].T - means[j]  # [n, D]
        quad = resid.square() + ((loadings[j] @ cov) * loadings[j]).sum(-1)  # [n, D]
        per_row = (weights[j].log() - 0.5 * (math.log(2 * math.pi) * dim + noise[j].log().sum()
                                             + (quad / noise[j]).sum(-1)))
        total = total + (resp[:, j] * per_row).sum()
    return total + _reference_log_prior(prior, weights, loadings, noise)


# --------------------------------------------------------------------- the prior itself


def test_log_prior_matches_torch_distributions_up_to_a_constant():
    prior = Prior(noise_strength=5.0, noise_variance=0.3, weight_concentration=2.5,
                  loading_ridge=0.7)
    values = []
    for seed in (0, 1):
        model = random_model(3, 4, 2, seed=seed)
        w, a, d = model.weights.detach(), model.factor_loadings.detach(), model.noise_variance
        values.append((prior.log_prior(w, a, d.detach()), _reference_log_prior(prior, w, a,
                                                                               d.detach())))
    (ours0, ref0), (ours1, ref1) = values
    torch.testing.assert_close(ours1 - ours0, ref1 - ref0, rtol=1e-12, atol=1e-10)


def test_flat_prior_is_zero_and_flat():
    model = random_model(3, 4, 2, seed=0)
    assert Prior().is_flat and Prior(0.0, 123.0).is_flat
    assert Prior().log_prior_of(model).item() == 0.0
    assert not Prior(loading_ridge=0.1).is_flat


@pytest.mark.parametrize(
    "kwargs, match",
    [({"noise_strength": -1.0}, r"Prior\.noise_strength must be .*>= 0.*-1\.0"),
     ({"noise_variance": 0.0}, r"Prior\.noise_variance must be .*> 0.*0\.0"),
     ({"weight_concentration": 0.5}, r"Prior\.weight_concentration must be .*>= 1.*0\.5"),
     ({"loading_ridge": math.nan}, r"Prior\.loading_ridge must be a finite"),
     ({"noise_strength": True}, r"Prior\.noise_strength .*True")],
)
def test_prior_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Prior(**kwargs)


def test_quantization_variance():
    assert QUANTIZATION_VARIANCE == pytest.approx(1 / (12 * 256**2), rel=1e-15)
    assert quantization_variance(255) == pytest.approx(1 / (12 * 255**2), rel=1e-15)
    with pytest.raises(ValueError, match="levels_per_unit must be a number > 0, got 0"):
        quantization_variance(0)


def test_log_grid():
    grid = log_grid(1e-6, 1e-4, 4)
    assert len(grid) == 9 and grid[0] == 1e-6 and grid[-1] == pytest.approx(1e-4)
    assert log_grid(1.0, 0.5, 4) == [1.0]
    with pytest.raises(ValueError, match="lower > 0"):
        log_grid(0.0, 1.0, 4)


# --------------------------------------------------------------------- the MAP M-step


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("lat, ridge", [(0, 0.0), (2, 0.0), (2, 0.8)])
def test_map_m_step_maximises_the_dense_expected_log_posterior(noise, lat, ridge):
    """The gradient of the dense expected complete-data log-posterior vanishes at the M-step's
    output, in every parameter (weights through softmax logits, variances through logs)."""
    model = random_model(3, 5, lat, noise, seed=3, offset=2.0)
    x = random_data(80, model, seed=4)
    prior = Prior(noise_strength=6.0, noise_variance=0.4, weight_concentration=3.0,
                  loading_ridge=ridge)
    params = m_step(_stats(model, x), model, variance_floor=1e-12, prior=prior)

    logits = params["weights"].log().clone().requires_grad_(True)
    means = params["means"].clone().requires_grad_(True)
    loadings = params["factor_loadings"].clone().requires_grad_(True)
    log_noise = (params["noise_variance"] if noise == "diagonal"
                 else params["noise_variance"][:, :1]).log().clone().requires_grad_(True)
    objective = _expected_log_posterior(
        model, x, prior, torch.softmax(logits, 0), means, loadings,
        log_noise.exp().expand(3, 5),
    )
    objective.backward()
    for name, value in [("weights", logits), ("means", means), ("loadings", loadings),
                        ("noise", log_noise)]:
        if value.numel() == 0:  # no loadings when L = 0
            continue
        assert value.grad.abs().max().item() < 1e-8 * x.shape[0], (name, value.grad)
    # And it is a maximum: moving any parameter a little lowers the objective.
    with torch.no_grad():
        base = objective.item()
        for scale in (1e-3, -1e-3):
            moved = _expected_log_posterior(
                model, x, prior, torch.softmax(logits + scale * torch.arange(3.0, dtype=F64), 0),
                means + scale, loadings * (1 + scale), (log_noise + scale).exp().expand(3, 5))
            assert moved.item() < base


def test_flat_prior_m_step_is_plain_em_bit_for_bit():
    """Strength 0 (ν = 0, α = 1, λ = 0, any s₀) runs exactly the plain M-step."""
    model = random_model(3, 5, 2, seed=1, offset=1.0)
    stats = _stats(model, random_data(70, model, seed=2))
    plain = m_step(stats, model, variance_floor=1e-9)
    flat = m_step(stats, model, variance_floor=1e-9, prior=Prior(0.0, 0.77, 1.0, 0.0))
    for name in PARAMS:
        assert torch.equal(plain[name], flat[name]), name


def test_noise_prior_moves_the_variances_towards_s0():
    """ν pseudo-rows of variance s₀: d = (S + ν s₀) / (N_k + ν), a weighted mean of the
    plain estimate and s₀ (no loadings prior, so the other parameters are unchanged)."""
    model = random_model(2, 4, 1, seed=5)
    stats = _stats(model, random_data(90, model, seed=6))
    plain = m_step(stats, model, variance_floor=1e-12)
    nu, s0 = 7.0, 3.0
    map_ = m_step(stats, model, variance_floor=1e-12, prior=Prior(nu, s0))
    mass = stats.mass.unsqueeze(-1)
    expected = (plain["noise_variance"] * mass + nu * s0) / (mass + nu)
    torch.testing.assert_close(map_["noise_variance"], expected, rtol=1e-12, atol=0)
    for name in ("means", "factor_loadings", "weights"):
        torch.testing.assert_close(map_[name], plain[name], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------- MAP EM


def _fit(x, k, lat, noise="diagonal", validation=None, model=None, trainer=None,
         callbacks=(), checkpoint_fn=None, **config):
    config.setdefault("progress", False)
    if model is None:
        model = MixtureOfFactorAnalyzers(k, x.shape[1], lat, noise, dtype=F64)
    trainer = trainer or EMTrainer(EMConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=validation, callbacks=callbacks,
                    checkpoint_fn=checkpoint_fn)
    return model, trainer


@pytest.fixture(scope="module")
def blobs():
    model = random_model(3, 6, 2, seed=11, offset=0.0)
    return random_data(400, model, seed=12, scale=1.0)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("lat", [0, 2])
def test_map_objective_never_decreases(blobs, noise, lat):
    """Every prior on at once; the objective recorded is log p(x) + log p(θ) per row, checked
    against torch.distributions (differences between iterations, so constants cancel)."""
    prior = dict(noise_strength=4.0, noise_variance=0.5, weight_concentration=2.0,
                 loading_ridge=0.3 if lat else 0.0)
    config = {f"noise_prior_{k[6:]}" if k.startswith("noise_") else k: v
              for k, v in prior.items()}
    snapshots = []

    def snap(trainer, model, record):
        snapshots.append({n: getattr(model, n).detach().clone() for n in PARAMS})

    model = MixtureOfFactorAnalyzers(3, 6, lat, noise, dtype=F64)
    start = {n: getattr(model, n).detach().clone() for n in PARAMS}
    _, trainer = _fit(blobs, 3, lat, noise, model=model, init="none", max_iter=20, tol=0.0,
                      min_component_mass=0.0, variance_floor=1e-9, patience=0,
                      callbacks=[snap], **config)
    objectives = [h["train_objective"] for h in trainer.history]
    assert len(objectives) == 20
    for before, after in zip(objectives, objectives[1:], strict=False):
        assert after >= before - 1e-10 * abs(before), objectives
    assert objectives[-1] > objectives[0] + 0.1
    reference = Prior(**prior)
    params = [start, *snapshots]
    n = blobs.shape[0]
    for i in (0, 5, 18):
        ref = [_reference_log_prior(reference, p["weights"], p["factor_loadings"],
                                    p["noise_variance"]).item() for p in (params[i], params[i + 1])]
        got = objectives[i + 1] - objectives[i]
        lls = trainer.history[i + 1]["train_log_likelihood"] - trainer.history[i][
            "train_log_likelihood"]
        assert got == pytest.approx(lls + (ref[1] - ref[0]) / n, rel=1e-9, abs=1e-11)


def test_strength_zero_reproduces_plain_em_bit_for_bit(blobs):
    """The configs of strength 0 (with any s₀) give the same fit, bit for bit, as the plain
    likelihood M-step, and the recorded objective is the log-likelihood itself."""
    plain_model, plain = _fit(blobs, 3, 2, seed=2, max_iter=8, tol=0.0, patience=0,
                              noise_prior_strength=0.0, noise_prior_variance=1.0)
    other_model, other = _fit(blobs, 3, 2, seed=2, max_iter=8, tol=0.0, patience=0,
                              noise_prior_strength=0.0, noise_prior_variance="auto",
                              weight_concentration=1.0, loading_ridge=0.0)
    for name in PARAMS:
        assert torch.equal(getattr(plain_model, name), getattr(other_model, name)), name
    for a, b in zip(plain.history, other.history, strict=True):
        assert a["train_log_likelihood"] == b["train_log_likelihood"]
        assert a["train_objective"] == a["train_log_likelihood"]


# --------------------------------------------------------------------- automatic s₀


def _planted_isotropic(n, sigma2, seed):
    """Two factor analysers in D=20 whose noise variance is ``sigma2`` everywhere."""
    g = gen(seed)
    d, lat = 20, 2
    means = 3 * torch.randn(2, d, generator=g, dtype=F64)
    loadings = torch.randn(2, d, lat, generator=g, dtype=F64)
    comp = torch.randint(0, 2, (n,), generator=g)
    z = torch.randn(n, lat, 1, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    return means[comp] + (loadings[comp] @ z).squeeze(-1) + sigma2**0.5 * eps


@pytest.mark.parametrize("sigma2", [0.003, 0.05])
def test_automatic_noise_prior_lands_near_the_planted_noise_variance(sigma2):
    """With a prior as strong as the data (ν ≈ N_k), the validation search picks s₀ within a
    factor of 2 of the planted noise variance."""
    x = _planted_isotropic(3000, sigma2, seed=21)
    train, val = x[:1500], x[1500:]
    _, trainer = _fit(train, 2, 2, validation=val, noise_prior_strength=750.0,
                      quantization_variance=1e-4, search_warmup=3, max_iter=6, tol=0.0,
                      patience=0)
    chosen = trainer.selected_noise_prior_variance
    assert chosen is not None
    assert sigma2 / 2 <= chosen <= 2 * sigma2, chosen
    assert [h["noise_prior_variance"] for h in trainer.history][-1] == chosen


def test_automatic_search_holds_out_rows_and_warns_without_validation():
    x = _planted_isotropic(400, 0.05, seed=3)
    _, trainer = _fit(x, 2, 2, max_iter=3, search_warmup=1, patience=0, val_fraction=0.25)
    assert trainer.selected_noise_prior_variance is not None
    assert trainer.history[0]["val_log_likelihood"] is not None  # the held-out quarter
    model = MixtureOfFactorAnalyzers(2, 20, 2, dtype=F64)
    with pytest.warns(UserWarning, match="noise_prior_variance='auto' needs validation data"):
        EMTrainer(EMConfig(max_iter=2, patience=0, val_fraction=0.0, progress=False)).fit(
            model, x)


def test_explicit_noise_prior_variance_skips_the_search(blobs):
    _, trainer = _fit(blobs, 3, 2, max_iter=3, noise_prior_variance=0.25, patience=0)
    assert trainer.selected_noise_prior_variance is None
    assert {h["noise_prior_variance"] for h in trainer.history} == {0.25}


def test_search_picks_what_a_brute_force_loop_of_fixed_prior_fits_picks():
    """With search_warmup=0 the search runs on the initialisation's statistics: with
    max_iter=1 the automatic fit must equal the fixed-prior fit, one per grid value, with the
    best validation score."""
    x = _planted_isotropic(800, 0.05, seed=5)
    train, val = x[:400], x[400:]
    common = dict(noise_prior_strength=150.0, max_iter=1, tol=0.0, patience=0, seed=3,
                  search_warmup=0, tempered_step=False)
    grid = log_grid(1e-4, float(train.var(0, unbiased=False).max()), 4)
    scores, models = [], []
    for s0 in grid:
        model, trainer = _fit(train, 2, 2, validation=val, noise_prior_variance=s0, **common)
        scores.append(trainer.history[-1]["val_log_likelihood"])
        models.append(model)
    best = max(range(len(grid)), key=lambda i: scores[i])
    assert 0 < best < len(grid) - 1, scores  # an interior optimum: the check can fail
    auto, trainer = _fit(train, 2, 2, validation=val, quantization_variance=1e-4, **common)
    assert trainer.selected_noise_prior_variance == pytest.approx(grid[best], rel=1e-12)
    assert trainer.history[-1]["val_log_likelihood"] == pytest.approx(scores[best], rel=1e-12)
    for name in PARAMS:
        torch.testing.assert_close(getattr(auto, name), getattr(models[best], name),
                                   rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("sigma2, strength", [(0.003, 150.0), (0.05, 150.0), (0.05, 20.0)])
def test_search_finds_the_grid_best_with_fewer_passes(sigma2, strength):
    """choose_noise_variance scores about log_φ of the grid's points and returns the
    candidate an exhaustive scoring of every grid point picks; from a weaker previous choice
    (``above``) it climbs to the same best, from a stronger one it still moves one step
    stronger (the trainer judges that stint by the validation score EM reaches), and from
    the grid's top it returns that choice without scoring anything; warm-started (``near``)
    it finds the same best."""
    from mfa._data_stream import DataSource
    from mfa.prior_search import choose_noise_variance, score_candidates

    x = _planted_isotropic(800, sigma2, seed=7)
    train, val = x[:400], x[400:]
    model, _ = _fit(train, 2, 2, max_iter=3, tol=0.0, patience=0, seed=3,
                    noise_prior_variance=1e-3, noise_prior_strength=strength)
    stats = _stats(model, train)
    source = DataSource(val, model, 4096)
    prior = Prior(strength, 1e-4)
    kwargs = dict(lower=1e-4, per_decade=4, variance_floor=1e-6)
    grid = log_grid(1e-4, float((stats.sum_x2.sum(0) / stats.mass.sum()
                                 - (stats.sum_x.sum(0) / stats.mass.sum()) ** 2).max()), 4)
    exhaustive = score_candidates(model, stats, grid, lambda s0: Prior(strength, s0), 1e-6,
                                  source)
    best = max(range(len(grid)), key=lambda i: (exhaustive[i], -i))
    assert 0 < best < len(grid) - 1, exhaustive  # an interior optimum: the check can fail
    chosen, scored = choose_noise_variance(model, stats, source, prior, **kwargs)
    assert chosen == pytest.approx(grid[best], rel=1e-12)
    # a golden-section search: about log_φ(n) + 1 passes (11 with the coarse-to-fine walk)
    assert len(scored) <= math.ceil(math.log(len(grid)) / math.log((1 + 5 ** 0.5) / 2)) + 1
    for s0, value in scored:  # the scores are the exhaustive ones
        assert value == pytest.approx(exhaustive[grid.index(s0)], rel=1e-12)
    climbed, walk = choose_noise_variance(model, stats, source, prior, above=grid[best - 1],
                                          **kwargs)
    assert climbed == pytest.approx(grid[best], rel=1e-12) and len(walk) <= 4
    assert best + 2 < len(grid)
    stepped, walk = choose_noise_variance(model, stats, source, prior, above=grid[best + 1],
                                          **kwargs)
    assert exhaustive[best + 2] < exhaustive[best + 1]  # one step up scores lower: taken anyway
    assert stepped == pytest.approx(grid[best + 2], rel=1e-12)
    assert [s0 for s0, _ in walk] == pytest.approx(grid[best + 2:best + 4], rel=1e-12)
    top, walk = choose_noise_variance(model, stats, source, prior, above=grid[-1], **kwargs)
    assert top == grid[-1] and walk == []
    # Warm starts (the tempered step's): at the best (3 passes: it and its neighbours),
    # near it and far below it (a hill climb, one pass a step) — the same best, from the
    # same scores.
    for start in (best, best - 3, best + 2, best + 1, 0):
        warm, walk = choose_noise_variance(model, stats, source, prior, near=grid[start],
                                           **kwargs)
        assert warm == pytest.approx(grid[best], rel=1e-12), start
        assert len(walk) == 3 + abs(start - best) - (start == 0), (start, walk)
        for s0, value in walk:
            assert value == pytest.approx(exhaustive[grid.index(s0)], rel=1e-12)


def test_default_fit_is_reproducible_with_its_seed(blobs):
    """The default fit (automatic noise prior, early stopping, held-out rows) twice with one
    seed gives the same parameters and s₀; another seed holds out other rows."""
    (a, ta), (b, tb), (c, _) = [_fit(blobs, 3, 2, seed=seed) for seed in (4, 4, 5)]
    for name in PARAMS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert ta.selected_noise_prior_variance is not None
    assert ta.selected_noise_prior_variance == tb.selected_noise_prior_variance
    assert [h["val_log_likelihood"] for h in ta.history] == [
        h["val_log_likelihood"] for h in tb.history]
    assert not torch.equal(a.means, c.means)


# --------------------------------------------------------------------- early stopping


def _saving_into(saved: dict):
    """A ``checkpoint_fn`` that keeps copies of the trainer's and the model's state in
    ``saved`` (keys ``"trainer"``, ``"model"``)."""

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    return checkpoint


@pytest.fixture(scope="module")
def overfit():
    """Few train rows in D=12: plain EM overfits and the validation score turns down."""
    model = random_model(2, 12, 3, seed=31)
    train = random_data(40, model, seed=32, scale=1.0)
    val = random_data(400, model, seed=33, scale=1.0)
    return train, val


# One restart, no re-seeding round after it (those are tested in tests/test_em_reseed.py).
STOP = dict(noise_prior_strength=0.0, patience=3, max_iter=60, tol=0.0, seed=1, n_init=1,
            min_component_mass=0.0, checkpoint_every=1, search_warmup=0, reseed_rounds=0)


def test_early_stopping_restores_the_best_validation_parameters(overfit):
    train, val = overfit
    snapshots = []

    def snap(trainer, model, record):
        snapshots.append({n: getattr(model, n).detach().clone() for n in PARAMS})

    model, trainer = _fit(train, 4, 3, validation=val, callbacks=[snap], **STOP)
    vals = [h["val_log_likelihood"] for h in trainer.history]
    best = max(range(len(vals)), key=vals.__getitem__)
    assert len(vals) == best + 1 + 3 < 60  # stopped `patience` iterations after the best
    assert trainer.history[-1]["early_stop"] and not any(h["early_stop"]
                                                         for h in trainer.history[:-1])
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), snapshots[best][name]), name
    assert trainer.evaluate(model, val) == pytest.approx(vals[best], rel=1e-12)


@pytest.mark.parametrize("stop_at", [2, "after-best", "at-stop"])
def test_resume_after_early_stopping_bookkeeping_is_exact(overfit, stop_at):
    """Interrupted (before the best or between the best and the stop) and resumed from the
    saved state, the fit ends exactly as the uninterrupted one, state included."""
    train, val = overfit
    full, full_trainer = _fit(train, 4, 3, validation=val, **STOP)
    vals = [h["val_log_likelihood"] for h in full_trainer.history]
    best = max(range(len(vals)), key=vals.__getitem__)
    # Records count from 1: the best is record best + 1, the stop record best + 1 + patience.
    stop_iteration = {2: 2, "after-best": best + 3, "at-stop": best + 4}[stop_at]
    saved = {}

    class _Interrupt(KeyboardInterrupt):
        pass

    checkpoint = _saving_into(saved)

    def stop(trainer, model, record):
        if record["iteration"] == stop_iteration:
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(train, 4, 3, validation=val, callbacks=[stop], checkpoint_fn=checkpoint, **STOP)
    state = roundtrip(saved["trainer"])
    if stop_at != 2:
        assert state["bad_iterations"] == stop_iteration - best - 1
        assert state["best_val_params"] is not None
    resumed = MixtureOfFactorAnalyzers(4, 12, 3, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(progress=False, **STOP))
    trainer.load_state_dict(state)
    _fit(train, 4, 3, validation=val, model=resumed, trainer=trainer)
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert [(h["iteration"], h["val_log_likelihood"], h["early_stop"]) for h in trainer.history] \
        == [(h["iteration"], h["val_log_likelihood"], h["early_stop"])
            for h in full_trainer.history]
    got, want = trainer.state_dict(), full_trainer.state_dict()
    assert set(got) == set(want)
    for key in ("run", "iteration", "runs_done", "best_log_likelihood", "converged"):
        assert got[key] == want[key], key


def test_resume_with_automatic_search_is_exact(blobs):
    """Interrupted after the search, the resumed fit keeps the chosen s₀ and ends exactly as
    the uninterrupted one."""
    x, val = blobs[:300], blobs[300:]
    cfg = dict(max_iter=8, tol=0.0, search_warmup=2, patience=2, checkpoint_every=1,
               noise_prior_strength=20.0)
    full, full_trainer = _fit(x, 3, 2, validation=val, **cfg)
    saved = {}

    checkpoint = _saving_into(saved)

    def stop(trainer, model, record):
        if record["iteration"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(x, 3, 2, validation=val, callbacks=[stop], checkpoint_fn=checkpoint, **cfg)
    assert saved["trainer"]["noise_prior_variance"] == full_trainer.selected_noise_prior_variance
    resumed = MixtureOfFactorAnalyzers(3, 6, 2, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(progress=False, **cfg))
    trainer.load_state_dict(roundtrip(saved["trainer"]))
    _fit(x, 3, 2, validation=val, model=resumed, trainer=trainer)
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert trainer.selected_noise_prior_variance == full_trainer.selected_noise_prior_variance


# --------------------------------------------------------------------- repeated searches


def _scripted_search(monkeypatch, choices):
    """Replace the grid search by one that returns ``choices`` in turn; returns the list of
    calls (the model's parameters are not needed: the trainer's control flow is tested)."""
    import mfa.prior_search as prior_search

    calls = []

    def choose(*args, **kwargs):
        calls.append(len(calls))
        return choices[min(len(calls), len(choices)) - 1], []

    monkeypatch.setattr(prior_search, "choose_noise_variance", choose)
    return calls


SEARCH = dict(noise_prior_strength=2.0, patience=2, max_iter=60, tol=0.0, seed=1,
              search_warmup=0, checkpoint_every=1, reseed_rounds=0, tempered_step=False)


def _used_priors(trainer):
    """The s₀ of each recorded iteration's objective, in order, repeats removed."""
    used = []
    for h in trainer.history:
        if not used or used[-1] != h["noise_prior_variance"]:
            used.append(h["noise_prior_variance"])
    return used


def test_repeated_search_continues_with_a_stronger_prior_and_ends_on_a_weaker_one(
        overfit, monkeypatch):
    """When patience runs out, the next E-step searches again; a stronger choice continues
    EM under it, one that is not stronger ends the restart before any M-step with it, and
    the best validation parameters (and their s₀) are returned."""
    train, val = overfit
    calls = _scripted_search(monkeypatch, [0.1, 0.3, 0.2])
    snapshots = []

    def snap(trainer, model, record):
        snapshots.append((record, {n: getattr(model, n).detach().clone() for n in PARAMS}))

    model, trainer = _fit(train, 4, 3, validation=val, callbacks=[snap], max_searches=4,
                          **SEARCH)
    assert len(calls) == 3
    assert _used_priors(trainer)[1:] == [0.1, 0.3]  # 0.2 (weaker than 0.3) was never used
    assert trainer.history[-1]["early_stop"] and trainer.history[-1]["val_log_likelihood"] is None
    assert snapshots[-1][0] is trainer.history[-1]  # the callbacks see the last record too
    scored = [(r["val_log_likelihood"], i) for i, (r, _) in enumerate(snapshots)
              if r["val_log_likelihood"] is not None]
    best = max(scored)[1]
    for name in PARAMS:
        assert torch.equal(getattr(model, name).detach(), snapshots[best][1][name]), name
    # The s₀ reported is the one the kept parameters were fitted under: the prior of the
    # next record's objective.
    assert trainer.selected_noise_prior_variance == trainer.history[best + 1][
        "noise_prior_variance"]


def test_a_stronger_prior_whose_stint_does_not_beat_the_best_ends_the_restart(
        overfit, monkeypatch):
    """A repeated search's stronger prior runs for its stint; when no iteration of it beats
    the best validation score, the restart ends there (no third search) and returns the
    best parameters, fitted under the first choice."""
    train, val = overfit
    calls = _scripted_search(monkeypatch, [0.1, 1e5, 2e5])  # 1e5: far too smooth
    model, trainer = _fit(train, 4, 3, validation=val, max_searches=4, **SEARCH)
    assert len(calls) == 2 and _used_priors(trainer)[1:] == [0.1, 1e5]
    vals = [h["val_log_likelihood"] for h in trainer.history]
    switch = next(i for i, h in enumerate(trainer.history) if h["noise_prior_variance"] == 1e5)
    # Record switch - 1 ran the search: its M-step (and validation score) is the stint's first.
    best = max(v for v in vals[:switch - 1] if v is not None)
    assert all(v < best for v in vals[switch - 1:] if v is not None)  # the stint never beat it
    assert len(vals) - switch <= 2 * SEARCH["patience"] + 1
    assert trainer.history[-1]["early_stop"]
    assert trainer.selected_noise_prior_variance == 0.1
    assert trainer.evaluate(model, val) == pytest.approx(best, rel=1e-12)


def test_one_search_when_max_searches_is_1(overfit, monkeypatch):
    train, val = overfit
    calls = _scripted_search(monkeypatch, [0.1, 0.3])
    _, trainer = _fit(train, 4, 3, validation=val, max_searches=1, **SEARCH)
    assert len(calls) == 1 and _used_priors(trainer)[1:] == [0.1]
    assert trainer.history[-1]["early_stop"]


@pytest.mark.parametrize("stop_offset", [0, 1, 2])
def test_resume_across_a_repeated_search_is_exact(overfit, monkeypatch, stop_offset):
    """Interrupted at the iteration whose patience ran out (the second search due), at the
    second search, or after it: the resumed fit ends exactly as the uninterrupted one."""
    train, val = overfit
    _scripted_search(monkeypatch, [0.1, 0.3, 0.2])
    full, full_trainer = _fit(train, 4, 3, validation=val, max_searches=4, **SEARCH)
    first_stronger = next(i for i, h in enumerate(full_trainer.history)
                          if h["noise_prior_variance"] == 0.3)  # the record after the search
    stop_iteration = first_stronger - 1 + stop_offset  # records count from 1
    saved = {}

    checkpoint = _saving_into(saved)

    def stop(trainer, model, record):
        if record["iteration"] == stop_iteration:
            raise KeyboardInterrupt

    _scripted_search(monkeypatch, [0.1, 0.3, 0.2])
    with pytest.raises(KeyboardInterrupt):
        _fit(train, 4, 3, validation=val, callbacks=[stop], checkpoint_fn=checkpoint,
             max_searches=4, **SEARCH)
    # The resumed fit's search calls continue the script where the interrupted one stopped.
    state = roundtrip(saved["trainer"])
    done = state["searches"]
    _scripted_search(monkeypatch, [0.1, 0.3, 0.2][done:])
    resumed = MixtureOfFactorAnalyzers(4, 12, 3, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(progress=False, max_searches=4, **SEARCH))
    trainer.load_state_dict(state)
    _fit(train, 4, 3, validation=val, model=resumed, trainer=trainer)
    _assert_same_fit(resumed, trainer, full, full_trainer)
    assert trainer.selected_noise_prior_variance == full_trainer.selected_noise_prior_variance


def _assert_same_fit(resumed, trainer, full, full_trainer) -> None:
    """The resumed fit's parameters and history equal the uninterrupted one's, bit for bit."""
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert [(h["iteration"], h["val_log_likelihood"], h["noise_prior_variance"])
            for h in trainer.history] == [
        (h["iteration"], h["val_log_likelihood"], h["noise_prior_variance"])
        for h in full_trainer.history]


def test_resume_after_the_last_allowed_search_searches_no_more(overfit, monkeypatch):
    """max_searches=2, interrupted one iteration after the second search: the resumed fit
    must know both searches ran (a state resumed with searches=0 searched twice more, under
    ever stronger priors, and ended elsewhere than the uninterrupted fit)."""
    train, val = overfit
    choices = [0.1, 0.3, 0.9, 2.7, 8.1]  # each search would choose a stronger prior
    calls = _scripted_search(monkeypatch, choices)
    full, full_trainer = _fit(train, 4, 3, validation=val, max_searches=2, **SEARCH)
    assert len(calls) == 2 and _used_priors(full_trainer)[-2:] == [0.1, 0.3]
    after_second = next(i for i, h in enumerate(full_trainer.history)
                        if h["noise_prior_variance"] == 0.3)  # the record after the search
    stop_iteration = after_second + 2  # records count from 1: one iteration under 0.3 done
    assert stop_iteration < full_trainer.history[-1]["iteration"]  # (interrupted mid-fit)
    saved = {}

    def stop(trainer, model, record):
        if record["iteration"] == stop_iteration:
            raise KeyboardInterrupt

    _scripted_search(monkeypatch, choices)
    with pytest.raises(KeyboardInterrupt):
        _fit(train, 4, 3, validation=val, callbacks=[stop], checkpoint_fn=_saving_into(saved),
             max_searches=2, **SEARCH)
    state = roundtrip(saved["trainer"])
    assert state["searches"] == 2 and state["iteration"] == stop_iteration
    resumed_calls = _scripted_search(monkeypatch, choices[2:])
    resumed = MixtureOfFactorAnalyzers(4, 12, 3, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(progress=False, max_searches=2, **SEARCH))
    trainer.load_state_dict(state)
    _fit(train, 4, 3, validation=val, model=resumed, trainer=trainer)
    assert resumed_calls == []
    _assert_same_fit(resumed, trainer, full, full_trainer)


# --------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [("noise_prior_strength", -1.0), ("noise_prior_variance", 0.0),
     ("noise_prior_variance", "fixed"), ("weight_concentration", 0.5), ("loading_ridge", -0.1),
     ("quantization_variance", 0.0), ("search_warmup", -1), ("search_per_decade", 0),
     ("patience", -1), ("val_fraction", 1.0), ("max_searches", 0)],
)
def test_new_em_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"^EMConfig\.{field} .*got {re.escape(repr(value))}"):
        EMTrainer(EMConfig(**{field: value}))


@pytest.mark.parametrize("noise,lat", [("diagonal", 3), ("isotropic", 2), ("diagonal", 0)])
def test_m_steps_share_the_solve_and_equal_one_m_step_each(noise, lat):
    """The search's batched M-steps (one loadings' solve per loading ridge) give bit for bit
    what one m_step per prior gives: noise priors of several s₀ and strengths, a weight
    prior, loading ridges, a flat prior and none."""
    from mfa.m_step import m_steps

    model = random_model(4, 7, lat, noise, seed=61)
    x = random_data(300, model, seed=62)
    stats = _stats(model, x)
    priors = [Prior(1.0, 1e-3), Prior(1.0, 3e-2), Prior(16.0, 1e-3), None,
              Prior(1.0, 1e-3, 2.0, 0.0), Prior(1.0, 1e-3, 1.0, 0.5), Prior(0.0, 0.7, 1.0, 0.0),
              Prior(2.0, 1e-2, 1.0, 0.5)]
    together = list(m_steps(stats, model, priors, variance_floor=1e-9))
    for prior, got in zip(priors, together, strict=True):
        want = m_step(stats, model, variance_floor=1e-9, prior=prior)
        for name in want:
            assert torch.equal(got[name], want[name]), (prior, name)
    assert not torch.equal(together[0]["noise_variance"], together[1]["noise_variance"])


def test_prior_takes_numpy_numbers_and_names_huge_ones():
    """np.float32(2.0) was refused with a message its value met; 10**400 raised a bare
    OverflowError."""
    import numpy as np

    prior = Prior(noise_strength=np.float32(2.0), noise_variance=np.int64(3),
                  weight_concentration=np.float64(1.5))
    assert (prior.noise_strength, prior.noise_variance, prior.weight_concentration) == (
        2.0, 3.0, 1.5)
    assert all(type(v) is float for v in (prior.noise_strength, prior.noise_variance))
    for bad in (10**400, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="Prior.noise_strength must be a finite number"):
            Prior(noise_strength=bad)


def test_m_step_refuses_a_floor_that_is_not_a_number():
    """variance_floor=NaN gave every noise variance NaN, without an error."""
    model = random_model(2, 4, 1, seed=3)
    x = random_data(50, model, seed=4)
    stats = EMTrainer.e_step(model, x)  # (a tensor: streamed as a DataSource)
    for bad in (float("nan"), -1.0, float("inf"), "1e-3"):
        with pytest.raises(ValueError, match="variance_floor must be a finite number >= 0"):
            m_step(stats, model, variance_floor=bad)
        with pytest.raises(ValueError, match="variance_floor must be a finite number >= 0"):
            m_steps(stats, model, [None], variance_floor=bad)  # (public too: NaN gave NaN)
    assert torch.isfinite(m_step(stats, model, variance_floor=1e-6)["noise_variance"]).all()


@pytest.mark.parametrize("trainer", ["em", "adam"])
def test_data_below_the_noise_floor_warns(trainer):
    """Rows whose every feature varies less than the default floor (1e-6) fitted ~18 nats a
    row below the same rows rescaled, with no word; both trainers now warn, once, naming the
    variance and the floor, and rows of ordinary scale do not."""
    from mfa import SGDConfig, SGDTrainer

    x, _ = MixtureOfFactorAnalyzers(3, 10, 2, generator=torch.Generator().manual_seed(0)).sample(
        300, generator=torch.Generator().manual_seed(1))

    def fit(data):
        model = MixtureOfFactorAnalyzers(3, 10, 2)
        fitter = (EMTrainer(EMConfig(max_iter=3, progress=False, seed=0)) if trainer == "em"
                  else SGDTrainer(SGDConfig(epochs=1, progress=False, seed=0)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitter.fit(model, data)
        return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "noise variances' floor" in str(w.message)]

    assert fit(x.detach()) == []
    messages = fit(x.detach() * 1e-4)
    assert len(messages) == 1
    assert "largest per-feature variance" in messages[0] and "(1e-06)" in messages[0]


@pytest.mark.parametrize("times, warns", [(4.0, True), (20.0, False)])
def test_the_floor_warning_comes_below_ten_times_the_floor(times, warns):
    """The warning's margin: rows whose largest per-feature variance is 4× the floor (1e-6)
    are warned about (the noise variances cannot follow them); 20× is not."""
    from mfa.e_step import streamed_e_step
    from mfa.prior_search import warn_if_floored

    x = torch.randn(300, 5, generator=gen(0), dtype=F64) * torch.linspace(0.5, 1, 5,
                                                                          dtype=F64)
    x = x * (times * 1e-6 / x.var(0, unbiased=False).max()).sqrt()
    stats = streamed_e_step(random_model(3, 5, 1, seed=1), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_floored(stats, 1e-6, dtype=F64)
    messages = [str(w.message) for w in caught if "noise variances' floor" in str(w.message)]
    assert len(messages) == warns, messages
    if warns:
        assert f"largest per-feature variance ({times * 1e-6:.3g}) is below 10x" in messages[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_training_rows_that_do_not_vary_are_named_not_told_to_rescale(dtype, k):
    """One training row (or identical rows): the search grid has one point, the quantisation
    variance, and held-out rows scored -4.9e6 nats against -24.5 with s0 = 0.5; the warning
    said to rescale the data, which cannot help. With K > 1 the sums over components left a
    rounding residue (4e-25 in float32) in place of 0 and the warning said to rescale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 5, generator=g, dtype=torch.float64).to(dtype)
    for train in ((x[:1],) if k == 1 else ()) + (x[:1].expand(100, 5),):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            EMTrainer(EMConfig(max_iter=2, progress=False)).fit(
                MixtureOfFactorAnalyzers(k, 5, 1, dtype=dtype), train, x[1:])
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("the training rows do not vary" in m and "noise_prior_variance" in m
                   for m in messages), messages
        assert not any("Rescale the data" in m for m in messages)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_that_vary_little_about_a_large_mean_are_not_called_constant(dtype):
    """One bound from the largest mean (and float32's ε for float64 rows) called rows of a
    small spread about a large mean, or any rows beside one large constant column, "do not
    vary". The bound is per feature now, in the rows' dtype."""
    from mfa.e_step import streamed_e_step
    from mfa.prior_search import warn_if_floored

    g = torch.Generator().manual_seed(0)
    spread = 1e-6 if dtype == torch.float64 else 1e-3
    cases = {
        "small spread": 0.5 + spread * torch.rand(200, 4, generator=g, dtype=F64),
        "large column": torch.cat([torch.rand(200, 3, generator=g, dtype=F64),
                                   torch.full((200, 1), 1e6, dtype=F64)], 1),
    }
    for name, x in cases.items():
        x = x.to(dtype)
        model = random_model(3, 4, 1, seed=1).to(dtype)
        stats = streamed_e_step(model, x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_floored(stats, 0.0, dtype=dtype)
        assert not [w for w in caught if "do not vary" in str(w.message)], name


def test_training_variance_is_the_rows_variance_about_their_own_mean():
    """The statistics are moments about the model's reference point ``c``; the training
    variance is about the rows' mean: ``x.var(0, unbiased=False)`` whatever ``c`` (here the
    model's means lie 10 away from every feature's mean)."""
    from mfa.prior_search import training_variance

    model = random_model(3, 6, 2, seed=2, offset=10.0)
    x = 0.5 + torch.randn(300, 6, generator=gen(3), dtype=F64) * torch.linspace(0.5, 2, 6,
                                                                               dtype=F64)
    stats = EMTrainer.e_step(model, x)
    assert float((stats.reference - x.mean(0)).abs().min()) > 5  # c is far from the mean
    torch.testing.assert_close(training_variance(stats), x.var(0, unbiased=False), rtol=0,
                               atol=1e-12)


def test_golden_section_search_leaves_a_non_finite_weak_end(monkeypatch):
    """Where the weak priors' candidates score -inf (a non-finite M-step or score), the
    golden-section search moves toward the stronger priors and finds the finite peak (ties
    between finite scores still go to the smaller)."""
    import mfa.prior_search as prior_search
    from mfa._data_stream import DataSource

    x = _planted_isotropic(400, 0.05, seed=7)
    model = random_model(2, x.shape[1], 2, seed=3)
    stats = _stats(model, x)
    grid = log_grid(1e-4, float(prior_search.training_variance(stats).max()), 4)
    peak = len(grid) - 3
    assert peak > 2 * len(grid) // 3  # both first probes lie in the -inf region

    def fake(model, stats, candidates, prior_for, floor, validation):
        index = [min(range(len(grid)), key=lambda i: abs(grid[i] - c)) for c in candidates]
        return [-math.inf if i < 2 * len(grid) // 3 else -float((i - peak) ** 2)
                for i in index]

    monkeypatch.setattr(prior_search, "score_candidates", fake)
    chosen, scored = prior_search.choose_noise_variance(
        model, stats, DataSource(x, model, 512), Prior(1.0, 1e-4), lower=1e-4, per_decade=4,
        variance_floor=1e-6)
    assert chosen == pytest.approx(grid[peak], rel=1e-12)


def test_a_noise_prior_whose_pseudo_sum_overflows_is_refused():
    """Prior(1e300, 1e10): each field finite, ν·s₀ not; the M-step's noise variances came out
    inf without a word."""
    from mfa.priors import Prior

    with pytest.raises(ValueError, match=r"noise_strength × noise_variance must be finite"):
        Prior(1e300, 1e10)
    Prior(1e10, 1e10)  # (large but finite)
