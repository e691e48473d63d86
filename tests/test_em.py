"""Streaming EM (mfa.em.EMTrainer).

Correctness is checked against independent references: scikit-learn's GaussianMixture (one EM
step from the same parameters), FactorAnalysis and PCA (the K = 1 optimum), dense float64
log-likelihoods, and planted parameters. Streaming, input types, restarts, seeding, resuming,
warnings, degenerate data and input validation are checked on small problems.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import gen, random_model, roundtrip
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA, FactorAnalysis
from sklearn.mixture import GaussianMixture
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers
from mfa.data import load_dataset
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.em_state import restart_seed

F64 = torch.float64
PARAMS = ("weights", "means", "factor_loadings", "noise_variance")
#: EMConfig values of plain EM: no prior, no early stopping (the defaults use both).
PLAIN_EM = {"noise_prior_strength": 0.0, "patience": 0}


pytestmark = pytest.mark.usefixtures("one_thread")




def _planted(k: int, d: int, lat: int, seed: int, spread: float = 4.0):
    """Parameters of a well-separated mixture (float64)."""
    g = gen(seed)
    raw = torch.arange(2, k + 2, dtype=F64)
    weights = raw / raw.sum()
    means = spread * torch.randn(k, d, generator=g, dtype=F64)
    loadings = torch.randn(k, d, lat, generator=g, dtype=F64)
    noise = 0.2 + 0.5 * torch.rand(k, d, generator=g, dtype=F64)
    return weights, means, loadings, noise


def _sample(n: int, weights, means, loadings, noise, seed: int):
    """Ancestral sampling written out here (not the library's sampler)."""
    g = gen(seed)
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    lat = loadings.shape[-1]
    z = torch.randn(n, lat, 1, generator=g, dtype=F64)
    eps = torch.randn(n, means.shape[1], generator=g, dtype=F64)
    x = means[comp] + eps * noise[comp].sqrt()
    if lat:
        x = x + (loadings[comp] @ z).squeeze(-1)
    return x, comp


@pytest.fixture(scope="module")
def mixture_data():
    """600 rows from a K=3, D=5, L=2 mixture, plus 300 held-out rows."""
    params = _planted(3, 5, 2, seed=0, spread=2.5)
    x, _ = _sample(900, *params, seed=1)
    return x[:600], x[600:]


def _dense_log_lik(model: MixtureOfFactorAnalyzers, x: torch.Tensor) -> float:
    """Mean log-likelihood from dense covariances."""
    a = model.factor_loadings.detach()
    cov = a @ a.mT + torch.diag_embed(model.noise_variance.detach())
    comp = MultivariateNormal(model.means.detach(), covariance_matrix=cov)
    lp = model.log_weights.detach() + comp.log_prob(x.unsqueeze(1))
    return torch.logsumexp(lp, -1).mean().item()


def _fit(x, k, lat, noise="diagonal", validation=None, callbacks=(), checkpoint_fn=None,
         model=None, trainer=None, **config):
    """Fit a fresh float64 model, silencing the ConvergenceWarning of fixed-length runs.

    Plain (maximum-likelihood) EM unless the test asks for priors or early stopping: these
    tests check EM against references of the likelihood (tests/test_priors.py checks MAP EM).
    """
    config.setdefault("progress", False)
    for key, value in PLAIN_EM.items():
        config.setdefault(key, value)
    if model is None:
        model = MixtureOfFactorAnalyzers(k, 5 if not hasattr(x, "shape") else x.shape[1], lat,
                                         noise, dtype=F64)
    trainer = trainer or EMTrainer(EMConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=validation, callbacks=callbacks,
                    checkpoint_fn=checkpoint_fn)
    return model, trainer


def _params(model) -> dict[str, torch.Tensor]:
    return {name: getattr(model, name).detach().clone() for name in PARAMS}


def _assert_same_params(a, b, rtol: float, atol: float) -> None:
    pa, pb = _params(a), _params(b)
    for name in PARAMS:
        torch.testing.assert_close(pa[name], pb[name], rtol=rtol, atol=atol, msg=name)


def _lls(trainer, run: int = 0) -> list[float]:
    return [h["train_log_likelihood"] for h in trainer.history if h.get("run", 0) == run]


# --------------------------------------------------------------------- monotonicity


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
@pytest.mark.parametrize("lat", [0, 2])
def test_em_never_decreases_the_log_likelihood(mixture_data, seed, noise, lat):
    x, _ = mixture_data
    model, trainer = _fit(x, 3, lat, noise, init="random", seed=seed, max_iter=25, tol=0.0,
                          min_component_mass=0.0)
    lls = _lls(trainer)
    assert len(lls) == 25
    for before, after in zip(lls, lls[1:], strict=False):
        assert after >= before - 1e-9 * abs(before), lls
    assert lls[-1] > lls[0]  # and it actually improved from the random start
    # The final parameters are at least as good as the last recorded ones.
    assert _dense_log_lik(model, x) >= lls[-1] - 1e-9 * abs(lls[-1])


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
@pytest.mark.parametrize("seed", [4, 7])
@pytest.mark.parametrize("mode", ["auto", "float32"])
def test_float32_em_with_a_heywood_component_never_decreases_the_objective(seed, mode):
    """Float32 EM from a model whose component has one noise variance at 1e-9 under loadings of
    size 1 (the variance floor and the prior off): that component's share of the E-step is
    taken in float64 (mfa.exact_components), so the objective rises from the float64 model's
    own log-likelihood. Before, the float32 sums scored the start 3 nats a row too high and
    the objective fell by up to 5 nats a row."""
    from helpers import heywood_float32_models

    m32, m64, x = heywood_float32_models(seed)
    trainer = EMTrainer(EMConfig(
        max_iter=6, tol=0.0, init="none", variance_floor=1e-12, noise_prior_strength=0.0,
        patience=0, reseed_rounds=0, tempered_step=False, progress=False, stats_dtype=mode))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(m32, x)
    objective = [h["train_objective"] for h in trainer.history]
    assert objective[0] == pytest.approx(m64.log_prob(x.double()).mean().item(), abs=1e-4)
    for before, after in zip(objective, objective[1:], strict=False):
        assert after >= before - 1e-6 * abs(before), objective


def test_history_scores_the_parameters_before_each_m_step(mixture_data):
    """init='none': the first record's train log-likelihood is the dense log-likelihood of the
    given starting parameters."""
    x, _ = mixture_data
    weights, means, loadings, noise = _planted(3, 5, 2, seed=5)
    model = MixtureOfFactorAnalyzers.from_parameters(weights, means, loadings, noise)
    expected = _dense_log_lik(model, x)
    _, trainer = _fit(x, 3, 2, model=model, init="none", max_iter=3, tol=0.0)
    assert trainer.history[0]["train_log_likelihood"] == pytest.approx(expected, rel=1e-12)
    assert [h["iteration"] for h in trainer.history] == [1, 2, 3]
    for record in trainer.history:
        assert {"iteration", "train_log_likelihood", "val_log_likelihood", "seconds"} <= set(
            record
        )
        assert record["val_log_likelihood"] is None
        assert record["seconds"] >= 0


# --------------------------------------------------------------------- scikit-learn: one step


@pytest.mark.parametrize("noise, covariance_type", [("diagonal", "diag"),
                                                    ("isotropic", "spherical")])
def test_one_em_step_matches_sklearn_gaussian_mixture(mixture_data, noise, covariance_type):
    x, _ = mixture_data
    k, d = 3, 5
    g = gen(7)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    means = x[torch.randperm(600, generator=g)[:k]].clone()
    var = 0.5 + torch.rand(k, d, generator=g, dtype=F64)
    if noise == "isotropic":
        var = var[:, :1].expand(k, d).contiguous()
    model = MixtureOfFactorAnalyzers.from_parameters(
        weights, means, torch.zeros(k, d, 0, dtype=F64), var, noise=noise
    )
    _fit(x, k, 0, model=model, init="none", max_iter=1, variance_floor=1e-300)

    precisions = 1.0 / (var if noise == "diagonal" else var[:, 0])
    gm = GaussianMixture(
        k, covariance_type=covariance_type, max_iter=1, reg_covar=0.0, n_init=1,
        init_params="random_from_data", weights_init=weights.numpy(),
        means_init=means.numpy(), precisions_init=precisions.numpy(), random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's own ConvergenceWarning at max_iter=1
        gm.fit(x.numpy())
    sk_var = gm.covariances_ if noise == "diagonal" else np.repeat(gm.covariances_[:, None], d, 1)
    np.testing.assert_allclose(model.weights.detach().numpy(), gm.weights_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.means.detach().numpy(), gm.means_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.noise_variance.detach().numpy(), sk_var, rtol=1e-8, atol=0)


# --------------------------------------------------------------------- K = 1 optimum


@pytest.fixture(scope="module")
def fa_data():
    """1000 rows of one factor-analysis model (a draw on which FA EM converges quickly)."""
    rng = np.random.default_rng(1)
    d, lat = 6, 2
    a = 2.0 * rng.normal(size=(d, lat))
    noise = rng.uniform(0.3, 1.0, d)
    x = rng.normal(size=d) * 3 + rng.normal(size=(1000, lat)) @ a.T
    x = x + rng.normal(size=(1000, d)) * np.sqrt(noise)
    return torch.from_numpy(x)


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_single_component_reaches_factor_analysis_optimum(fa_data, init):
    x = fa_data
    model, trainer = _fit(x, 1, 2, "diagonal", init=init, max_iter=1000, tol=1e-9,
                          variance_floor=1e-9)
    assert trainer.converged
    reference = FactorAnalysis(2, tol=1e-8, max_iter=100_000).fit(x.numpy()).score(x.numpy())
    assert _dense_log_lik(model, x) == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_single_isotropic_component_reaches_ppca_optimum(fa_data, init):
    """sklearn's PPCA score uses n − 1 normalisation, so it lies O(D/n²) below the MLE."""
    x = fa_data
    model, trainer = _fit(x, 1, 2, "isotropic", init=init, max_iter=1000, tol=1e-10,
                          variance_floor=1e-9)
    assert trainer.converged
    reference = PCA(2).fit(x.numpy()).score(x.numpy())
    ours = _dense_log_lik(model, x)
    assert reference - 1e-6 <= ours <= reference + 1e-4


# --------------------------------------------------------------------- planted parameters


def test_recovers_planted_parameters():
    k, d, lat = 3, 10, 2
    weights, means, loadings, noise = _planted(k, d, lat, seed=0)
    x, _ = _sample(20_000, weights, means, loadings, noise, seed=1)
    model, trainer = _fit(x, k, lat, max_iter=200, tol=1e-6)
    assert trainer.converged
    row, col = linear_sum_assignment(torch.cdist(means, model.means.detach()).numpy())
    true_cov = loadings @ loadings.mT + torch.diag_embed(noise)
    fitted_cov = model.covariance().detach()
    for i, j in zip(row, col, strict=True):
        err = torch.linalg.norm(true_cov[i] - fitted_cov[j]) / torch.linalg.norm(true_cov[i])
        assert float(err) < 0.1
        assert float(model.weights.detach()[j]) == pytest.approx(float(weights[i]), abs=0.02)
        assert float((model.means.detach()[j] - means[i]).norm()) < 0.1 * float(means[i].norm())


# --------------------------------------------------------------------- streaming and inputs


@pytest.mark.parametrize("noise, lat", [("diagonal", 2), ("isotropic", 1), ("diagonal", 0)])
def test_streaming_equals_full_batch(noise, lat):
    params = _planted(3, 5, 2, seed=3, spread=2.0)
    x, _ = _sample(1500, *params, seed=4)
    results = [
        _fit(x, 3, lat, noise, batch_size=size, max_iter=15, tol=0.0)[0]
        for size in (1500, 64, 999)
    ]
    for other in results[1:]:
        _assert_same_params(other, results[0], rtol=1e-8, atol=1e-8)


def test_tensor_dataset_and_dataloader_inputs_agree(mixture_data):
    x, _ = mixture_data
    labels = torch.zeros(600, dtype=torch.int64)
    inputs = [
        x,
        TensorDataset(x),
        TensorDataset(x, labels),  # (rows, label) tuples
        DataLoader(TensorDataset(x), batch_size=77),
        DataLoader(TensorDataset(x, labels), batch_size=128),
        [x[:250], x[250:]],  # any iterable of batches
    ]
    results = [_fit(data, 3, 2, batch_size=100, max_iter=10, tol=0.0)[0] for data in inputs]
    for other in results[1:]:
        _assert_same_params(other, results[0], rtol=1e-8, atol=1e-8)


def test_image_shaped_tensor_is_flattened():
    x = torch.rand(200, 1, 2, 3, generator=gen(0), dtype=F64)
    flat, _ = _fit(x.reshape(200, 6), 2, 1, max_iter=5, tol=0.0)
    images, _ = _fit(x, 2, 1, max_iter=5, tol=0.0,
                     model=MixtureOfFactorAnalyzers(2, 6, 1, dtype=F64))
    _assert_same_params(images, flat, rtol=0, atol=0)


def test_float32_statistics_stay_close_to_float64(mixture_data):
    x, _ = mixture_data
    a, _ = _fit(x, 3, 2, max_iter=10, tol=0.0)
    b, _ = _fit(x, 3, 2, max_iter=10, tol=0.0, stats_dtype="float32")
    assert b.dtype == F64
    _assert_same_params(b, a, rtol=1e-4, atol=1e-4)


def test_init_samples_subset_is_seeded_and_progress_bar_runs(mixture_data):
    """A seeded subset of 100 rows initialises the fit (a different start from all 600),
    reproducibly; progress=True only adds a progress bar."""
    x, _ = mixture_data
    full, _ = _fit(x, 3, 2, max_iter=3, tol=0.0)
    a, _ = _fit(x, 3, 2, max_iter=3, tol=0.0, init_samples=100, progress=True)
    b, _ = _fit(x, 3, 2, max_iter=3, tol=0.0, init_samples=100)
    _assert_same_params(a, b, rtol=0, atol=0)
    assert not torch.allclose(a.means, full.means)


# --------------------------------------------------------------------- restarts and seeds


def test_n_init_keeps_the_best_run(mixture_data):
    x, _ = mixture_data
    singles = []
    for run in range(3):  # restart r starts as a single fit seeded restart_seed(0, r)
        model, _ = _fit(x, 4, 1, init="random", seed=restart_seed(0, run), max_iter=20,
                        tol=0.0)
        singles.append(_dense_log_lik(model, x))
    best, trainer = _fit(x, 4, 1, init="random", seed=0, n_init=3, max_iter=20, tol=0.0)
    ll = _dense_log_lik(best, x)
    for single in singles:
        assert ll >= single - 1e-9
    assert ll == pytest.approx(max(singles), abs=1e-9)
    assert sorted({h["run"] for h in trainer.history}) == [0, 1, 2]


def test_consecutive_seeds_share_no_restart(mixture_data):
    """Restart r was seeded seed + r: seed 1's restarts 0 and 1 were seed 0's restarts 1
    and 2, and the two fits often kept the same model."""
    x, _ = mixture_data
    runs = {}
    for seed in (0, 1):
        _, trainer = _fit(x, 4, 1, init="random", seed=seed, n_init=3, max_iter=3, tol=0.0)
        runs[seed] = [[h["train_log_likelihood"] for h in trainer.history if h["run"] == r]
                      for r in range(3)]
    assert not any(a == b for a in runs[0] for b in runs[1])
    assert restart_seed(7, 0) == 7 and len({restart_seed(s, r) for s in range(20)
                                            for r in range(5)}) == 100


def test_same_seed_same_result_different_seed_differs(mixture_data):
    x, _ = mixture_data
    a, ta = _fit(x, 3, 2, seed=4, max_iter=8, tol=0.0)
    b, tb = _fit(x, 3, 2, seed=4, max_iter=8, tol=0.0)
    c, _ = _fit(x, 3, 2, seed=5, max_iter=8, tol=0.0, init="random")
    d, _ = _fit(x, 3, 2, seed=6, max_iter=8, tol=0.0, init="random")
    _assert_same_params(a, b, rtol=0, atol=0)
    assert _lls(ta) == _lls(tb)
    assert not torch.allclose(c.means, d.means)


# --------------------------------------------------------------------- resuming




class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("n_init, stop_run, stop_iteration", [(1, 0, 3), (2, 1, 2)])
def test_resume_after_interrupt_equals_uninterrupted(mixture_data, n_init, stop_run,
                                                     stop_iteration):
    x, val = mixture_data
    config = dict(max_iter=8, tol=0.0, checkpoint_every=1, n_init=n_init, init="random",
                  seed=1)
    full, full_trainer = _fit(x, 3, 2, validation=val, **config)

    saved = {}

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    def stop(trainer, model, record):
        if record["run"] == stop_run and record["iteration"] == stop_iteration:
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(x, 3, 2, validation=val, callbacks=[stop], checkpoint_fn=checkpoint, **config)
    state = roundtrip(saved["trainer"])  # safe-loadable: primitives and tensors only
    model_state = roundtrip(saved["model"])

    resumed = MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64)
    resumed.load_state_dict(model_state)
    trainer = EMTrainer(EMConfig(progress=False, **PLAIN_EM, **config))
    trainer.load_state_dict(state)
    _fit(x, 3, 2, validation=val, model=resumed, trainer=trainer)

    _assert_same_params(resumed, full, rtol=1e-12, atol=1e-12)
    assert len(trainer.history) == len(full_trainer.history) == n_init * 8
    for got, want in zip(trainer.history, full_trainer.history, strict=True):
        assert (got["run"], got["iteration"]) == (want["run"], want["iteration"])
        for key in ("train_log_likelihood", "val_log_likelihood"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12)


def _reseeded_at(caplog) -> list[int]:
    """The EM iterations (from 1) whose re-seeding warning ``caplog`` holds, in order."""
    found = [re.match(r"EM iteration (\d+): component\(s\) .* re-seeded", r.getMessage())
             for r in caplog.records if r.name == "mfa.em"]
    return [int(m.group(1)) for m in found if m]


def test_resume_continues_the_reseeding_generator_exactly(caplog):
    """Dead components are re-seeded from a generator kept in the state: interrupted after
    iteration 2 with re-seedings before and after, the resumed fit must draw what the
    uninterrupted one drew (restarted from its seed, it re-drew the first draws)."""
    g = gen(0)
    x = torch.cat([torch.randn(200, 6, generator=g, dtype=F64) * 0.3 + 2,
                   torch.randn(200, 6, generator=g, dtype=F64) * 0.3 - 2])
    config = dict(max_iter=6, tol=0.0, n_init=1, init="random", seed=3,
                  min_component_mass=70.0, checkpoint_every=1)
    with caplog.at_level(logging.WARNING, logger="mfa.em"):
        full, _ = _fit(x, 5, 2, **config)
    full_reseeds = _reseeded_at(caplog)
    assert min(full_reseeds) <= 2 < max(full_reseeds), full_reseeds  # (not vacuous)
    saved = {}

    def checkpoint(trainer, model):
        saved["trainer"] = copy.deepcopy(trainer.state_dict())
        saved["model"] = copy.deepcopy(model.state_dict())

    def stop(trainer, model, record):
        if record["iteration"] == 2:
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(x, 5, 2, callbacks=[stop], checkpoint_fn=checkpoint, **config)
    state = roundtrip(saved["trainer"])
    assert state["iteration"] == 2 and state["generator"] is not None
    resumed = MixtureOfFactorAnalyzers(5, 6, 2, dtype=F64)
    resumed.load_state_dict(roundtrip(saved["model"]))
    trainer = EMTrainer(EMConfig(progress=False, **PLAIN_EM, **config))
    trainer.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mfa.em"):
        _fit(x, 5, 2, model=resumed, trainer=trainer)
    assert _reseeded_at(caplog) == [i for i in full_reseeds if i > 2]
    for name in PARAMS:
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name


def test_state_dict_is_weights_only_loadable_after_fit(mixture_data):
    x, _ = mixture_data
    _, trainer = _fit(x, 3, 2, max_iter=3, tol=0.0, n_init=2)
    state = roundtrip(trainer.state_dict())
    assert state["config"]["n_init"] == 2
    assert len(state["history"]) == len(trainer.history)
    same = {**PLAIN_EM, "tol": 0.0, "n_init": 2}
    fresh = EMTrainer(EMConfig(progress=True, max_iter=3, checkpoint_every=4, **same))
    fresh.load_state_dict(state)  # how often it saves, progress: may change
    with pytest.raises(ValueError, match=r"earlier ones ran with max_iter=3"):  # finished
        EMTrainer(EMConfig(progress=False, max_iter=9, **same)).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_state_dict({"run": 0})
    # anything else would be ignored or change the rest of the fit: refused, named
    with pytest.raises(ValueError, match=r"saved with n_init=2 but .* config has n_init=1"):
        EMTrainer(EMConfig(progress=False)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with stats_dtype="):
        EMTrainer(EMConfig(**{**same, "stats_dtype": "float32"})).load_state_dict(state)


def test_resume_onto_another_model_is_refused_before_the_fit(mixture_data):
    """It ran the rest of the restart, then failed with torch's 'size mismatch for logits'."""
    x, _ = mixture_data
    _, trainer = _fit(x, 3, 2, max_iter=2, tol=0.0)
    fresh = EMTrainer(EMConfig(**{**PLAIN_EM, "progress": False, "max_iter": 2, "tol": 0.0}))
    fresh.load_state_dict(roundtrip(trainer.state_dict()))
    with pytest.raises(ValueError, match="'best_params' 'logits' has shape .* saved for another"):
        fresh.fit(MixtureOfFactorAnalyzers(4, x.shape[1], 2, dtype=torch.float64), x)
    with pytest.raises(TypeError, match="data is a one-shot iterator"):
        EMTrainer(EMConfig(progress=False)).fit(
            MixtureOfFactorAnalyzers(3, x.shape[1], 2, dtype=torch.float64), iter([x]))


def test_checkpoint_fn_schedule(mixture_data):
    x, _ = mixture_data
    calls = []
    _fit(x, 2, 1, max_iter=6, tol=0.0, checkpoint_every=2,
         checkpoint_fn=lambda trainer, model: calls.append(len(trainer.history)))
    assert calls == [2, 4, 6, 6]  # every 2 iterations and once at the end
    calls.clear()
    _fit(x, 2, 1, max_iter=6, tol=0.0,
         checkpoint_fn=lambda trainer, model: calls.append(len(trainer.history)))
    assert calls == [6]


# --------------------------------------------------------------------- convergence warnings


def test_convergence_warning_at_max_iter(mixture_data):
    x, _ = mixture_data
    model = MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64)
    trainer = EMTrainer(EMConfig(max_iter=2, tol=1e-12, progress=False, **PLAIN_EM))
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        trainer.fit(model, x)
    assert not trainer.converged
    assert issubclass(ConvergenceWarning, UserWarning)
    # one warning a restart, each naming its own (two identical lines read as one repeated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EMTrainer(EMConfig(max_iter=2, tol=1e-12, progress=False, n_init=2, **PLAIN_EM)).fit(
            MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64), x)
    messages = [str(w.message) for w in caught if w.category is ConvergenceWarning]
    assert [m.split(":")[0] for m in messages] == ["EM run 1/2", "EM run 2/2"], messages


def test_no_warning_when_tol_is_met(mixture_data):
    x, _ = mixture_data
    model = MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64)
    trainer = EMTrainer(EMConfig(max_iter=500, tol=1e-3, progress=False, **PLAIN_EM))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        trainer.fit(model, x)
    assert trainer.converged
    assert len(trainer.history) < 500
    lls = _lls(trainer)
    assert abs(lls[-1] - lls[-2]) < 1e-3


# --------------------------------------------------------------------- degenerate data


def _assert_finite_model(model, x) -> None:
    for name in PARAMS:
        assert bool(torch.isfinite(getattr(model, name)).all()), name
    for name, value in model.state_dict().items():  # the raw logits too: no -inf weight
        assert bool(torch.isfinite(value).all()), name
    assert bool((model.noise_variance > 0).all())
    assert math.isfinite(_dense_log_lik(model, x))


@pytest.mark.parametrize("noise, lat", [("diagonal", 2), ("isotropic", 2), ("diagonal", 0)])
def test_constant_feature_and_duplicated_rows(noise, lat):
    x = torch.randn(300, 4, generator=gen(0), dtype=F64)
    x[:, 2] = 7.0
    x = torch.cat([x, x[:60]])  # duplicated rows
    model, trainer = _fit(x, 3, lat, noise, max_iter=30, variance_floor=1e-5)
    _assert_finite_model(model, x)
    assert all(math.isfinite(v) for v in _lls(trainer))
    if noise == "diagonal":
        torch.testing.assert_close(
            model.noise_variance[:, 2].detach(), torch.full((3,), 1e-5, dtype=F64)
        )


@pytest.mark.parametrize("noise, lat", [("diagonal", 1), ("isotropic", 2), ("diagonal", 0)])
def test_more_components_than_distinct_points(noise, lat, caplog):
    distinct = torch.randn(5, 4, generator=gen(1), dtype=F64)
    x = distinct.repeat(40, 1)
    with caplog.at_level(logging.WARNING, logger="mfa.em"):
        model, trainer = _fit(x, 8, lat, noise, max_iter=20, min_component_mass=2.0)
    _assert_finite_model(model, x)
    assert all(math.isfinite(v) for v in _lls(trainer))
    assert any("re-seeded" in r.getMessage() for r in caplog.records)


def test_far_away_component_is_reseeded(caplog):
    x = torch.randn(400, 3, generator=gen(2), dtype=F64)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64),
        torch.tensor([[0.0, 0.0, 0.0], [1e3, 1e3, 1e3]], dtype=F64),
        torch.full((2, 3, 1), 0.1, dtype=F64),
        torch.ones(2, 3, dtype=F64),
    )
    with caplog.at_level(logging.WARNING, logger="mfa.em"):
        _fit(x, 2, 1, model=model, init="none", max_iter=10, min_component_mass=2.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "mfa.em"]
    assert any("[1]" in m and "re-seeded" in m for m in messages), messages
    _assert_finite_model(model, x)
    # The re-seeded component was moved next to the data and now carries real weight.
    assert float(model.means.detach().abs().max()) < 10
    assert float(model.weights.detach().min()) > 0.05


def test_a_min_component_mass_the_data_cannot_give_every_component_is_refused():
    """K · min_component_mass above the row count: the masses sum to N, so some component
    would fall below it (and be re-seeded) at every iteration, with only a log line saying
    so; refused at the first M-step, the model left as it was."""
    x = torch.randn(40, 3, generator=gen(2), dtype=F64)
    model = random_model(4, 3, 1, seed=0, dtype=F64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"min_component_mass=11 with 4 components needs at "
                                         r"least 44 rows, the data has 40"):
        _fit(x, 4, 1, model=model, init="none", max_iter=5, min_component_mass=11.0)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)
    _fit(x, 4, 1, model=model, init="none", max_iter=2, min_component_mass=10.0)  # 40: allowed


# --------------------------------------------------------------------- validation and errors


def test_validation_history_is_recorded(mixture_data):
    x, val = mixture_data
    model, trainer = _fit(x, 3, 2, validation=val, max_iter=5, tol=0.0)
    vals = [h["val_log_likelihood"] for h in trainer.history]
    assert len(vals) == 5 and all(isinstance(v, float) and math.isfinite(v) for v in vals)
    # The last record scores the parameters after the last M-step: the returned ones.
    assert vals[-1] == pytest.approx(_dense_log_lik(model, val), rel=1e-10)
    # As a DataLoader too.
    _, trainer2 = _fit(x, 3, 2, validation=DataLoader(TensorDataset(val), batch_size=50),
                       max_iter=5, tol=0.0)
    assert [h["val_log_likelihood"] for h in trainer2.history] == pytest.approx(vals, rel=1e-10)


def test_data_errors(mixture_data):
    x, _ = mixture_data
    bad = x.clone()
    bad[17, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _fit(bad, 3, 2, max_iter=2)
    with pytest.raises(ValueError, match="non-finite"):
        _fit(x, 3, 2, validation=bad, max_iter=2)
    with pytest.raises(ValueError, match="5 features"):
        _fit(x[:, :4], 3, 2, model=MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64), max_iter=2)
    with pytest.raises(TypeError, match="floating point"):
        _fit((x * 10).long(), 3, 2, max_iter=2)
    with pytest.raises(TypeError, match="numpy array; convert it with torch.from_numpy"):
        _fit(x.numpy(), 3, 2, max_iter=2)
    with pytest.raises(ValueError, match="empty"):
        _fit(DataLoader(TensorDataset(x[:0]), batch_size=4), 3, 2, max_iter=2)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("max_iter", -1, "max_iter"),
        ("max_iter", 2.5, "max_iter"),
        ("batch_size", 0, "batch_size"),
        ("n_init", 0, "n_init"),
        ("kmeans_iter", 0, "kmeans_iter"),
        ("init_samples", 0, "init_samples"),
        ("tol", -1e-3, "tol"),
        ("variance_floor", 0.0, "variance_floor"),
        ("stats_dtype", "float16", "stats_dtype"),
        ("init", "kmeans++", "init"),
    ],
)
def test_bad_config_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        EMTrainer(EMConfig(**{field: value}))


@pytest.mark.parametrize(
    "field, value",
    [("complete_iter", -1), ("min_component_mass", -1.0), ("checkpoint_every", -1),
     ("n_init", True)],
)
def test_unchecked_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        EMTrainer(EMConfig(**{field: value}))


def test_n_init_needs_a_random_init():
    with pytest.raises(ValueError, match="n_init"):
        EMTrainer(EMConfig(n_init=2, init="none"))


# --------------------------------------------------------------------- float32 cancellation


def test_float32_offset_data_matches_float64_fit():
    """float32 rows around 1e4 with spread ~0.01: the fitted variances stay positive, finite
    and close to a float64 fit of the same values (scikit-learn#30382's case)."""
    rng = np.random.default_rng(0)
    n = 3000
    lab = rng.integers(0, 2, n)
    centres = np.array([[0.0, 0.0, 0.0], [0.08, -0.05, 0.06]])
    x = 1e4 + centres[lab] + rng.normal(size=(n, 3)) * np.array([0.01, 0.02, 0.005])
    x32 = torch.from_numpy(x).float()
    x64 = x32.double()
    fits = []
    for data in (x32, x64):
        model = MixtureOfFactorAnalyzers(2, 3, 1, dtype=data.dtype, min_noise=0.0)
        _fit(data, 2, 1, model=model, init="random", seed=0, max_iter=60, tol=0.0,
             variance_floor=1e-12)
        fits.append(model)
    nv32, nv64 = (m.noise_variance.detach().double() for m in fits)
    assert bool(torch.isfinite(nv32).all()) and bool((nv32 > 1e-8).all())
    order32 = fits[0].means[:, 0].detach().double().argsort()
    order64 = fits[1].means[:, 0].detach().argsort()
    torch.testing.assert_close(nv32[order32], nv64[order64], rtol=0.05, atol=0)
    torch.testing.assert_close(
        fits[0].weights.detach().double()[order32], fits[1].weights.detach()[order64],
        rtol=0, atol=0.01,
    )


def test_float32_offset_data_with_kmeans_init_reaches_the_float64_optimum():
    rng = np.random.default_rng(0)
    n = 3000
    lab = rng.integers(0, 3, n)
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x32 = torch.from_numpy(1e4 + centres[lab] + rng.normal(size=(n, 3)) * 0.05).float()
    x64 = x32.double()
    lls = []
    for data in (x32, x64):
        model = MixtureOfFactorAnalyzers(3, 3, 1, dtype=data.dtype)
        _fit(data, 3, 1, model=model, max_iter=100)
        weights, *rest = (getattr(model, name).detach().double() for name in PARAMS)
        as64 = MixtureOfFactorAnalyzers.from_parameters(weights / weights.sum(), *rest)
        lls.append(_dense_log_lik(as64, x64))
    assert lls[0] == pytest.approx(lls[1], abs=0.01)


# --------------------------------------------------------------------- weight floor


def test_zero_min_component_mass_keeps_every_weight_positive():
    """The review's probe: with ``min_component_mass=0`` (no re-seeding) a component far from
    every row got weight exactly 0 (logit −inf), and Adam with weight decay from that model
    then failed with NaN. The M-step now floors the mass at ``MIN_WEIGHT_MASS`` rows, the
    rule the complete-data initialisation uses."""
    from mfa.init import MIN_WEIGHT_MASS
    from mfa.sgd import SGDConfig, SGDTrainer

    g = gen(0)
    x = torch.cat([torch.randn(200, 3, generator=g, dtype=F64),
                   8 + torch.randn(200, 3, generator=g, dtype=F64)])
    means = torch.tensor([[0.0] * 3, [8.0] * 3, [1e3] * 3], dtype=F64)  # the third: no rows
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((3,), 1 / 3, dtype=F64), means, 0.1 * torch.ones(3, 3, 1, dtype=F64),
        torch.ones(3, 3, dtype=F64),
    )
    _, trainer = _fit(x, 3, 1, model=model, init="none", max_iter=5, tol=0.0,
                      min_component_mass=0.0)
    _assert_finite_model(model, x)
    # The empty component keeps the floor's weight; the others share the rest by their mass.
    expected = MIN_WEIGHT_MASS / (x.shape[0] + MIN_WEIGHT_MASS)
    assert model.weights[2].item() == pytest.approx(expected, rel=1e-6)
    assert model.weights[:2].sum().item() == pytest.approx(1 - expected, rel=1e-12)
    # Adam with weight decay from this model runs and stays finite.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        SGDTrainer(SGDConfig(lr=1e-3, epochs=2, weight_decay=1e-3, init="none",
                             val_fraction=0, progress=False)).fit(model, x)
    _assert_finite_model(model, x)


# --------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "field, value",
    [("max_iter", -1), ("kmeans_iter", 0), ("variance_floor", 0.0), ("tol", math.nan),
     ("min_component_mass", math.inf), ("stats_dtype", "float16"), ("init", "kmeans++"),
     ("seed", -1), ("device", "gpu0"), ("progress", "yes"), ("batch_size", True)],
)
def test_validate_names_the_field_and_the_bad_value(field, value):
    """EMConfig.validate() is the one home of the trainer's limits: every message names the
    field as ``EMConfig.<field>`` and shows the value, so the config loader can map it to
    its YAML key."""
    config = EMConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^EMConfig\.{field} .*got {re.escape(repr(value))}"):
        config.validate()
    with pytest.raises(ValueError, match=rf"^EMConfig\.{field} "):
        EMTrainer(config)


def test_a_search_grid_too_fine_to_build_is_refused():
    """search_per_decade=10**9 was accepted and filled the memory building the grid."""
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trainer = EMTrainer(EMConfig(max_iter=3, progress=False, search_per_decade=10**9))
    with pytest.raises(ValueError, match=r"search grid would have \d+ points .*lower "
                                         r"search_per_decade \(got 1000000000\)"):
        trainer.fit(MixtureOfFactorAnalyzers(2, 3, 1, dtype=torch.float64), x[:50],
                    validation=x[50:])


def test_a_device_type_the_library_does_not_run_on_is_refused_by_fit():
    """EMConfig(device="meta") moved the model to the meta device, and the fit failed with
    "Tensor.item() cannot be called on meta tensors", naming no setting."""
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"EMConfig\.device 'meta': the device type 'meta' "
                                         r"is not one this library runs on \(cpu, cuda\)"):
        EMTrainer(EMConfig(device="meta", progress=False)).fit(
            MixtureOfFactorAnalyzers(2, 3, 1, dtype=torch.float64), x)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("tol", math.nan),
                                          ("stats_dtype", "half")])
def test_fit_checks_a_config_changed_after_the_trainer_was_made(field, value):
    """The config was checked in __init__ only; a field set afterwards failed deep inside."""
    trainer = EMTrainer(EMConfig(max_iter=2, progress=False))
    setattr(trainer.config, field, value)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^EMConfig\.{field} "):
        trainer.fit(MixtureOfFactorAnalyzers(2, 3, 1, dtype=torch.float64), x)


def test_validate_accepts_the_limits():
    """The limits themselves are valid: max_iter=0 (initialise only), kmeans_iter=1,
    complete_iter=0, tol=0, min_component_mass=0."""
    EMConfig(max_iter=0, kmeans_iter=1, complete_iter=0, tol=0.0, min_component_mass=0.0,
             device="cpu").validate()


def test_state_dict_keys_are_those_of_saved_checkpoints(mixture_data):
    """Checkpoints written before the run state became an object must still resume: the
    trainer state keeps exactly its keys, mid-run (with the generator) and after the fit."""
    x, _ = mixture_data
    saved = []
    _, trainer = _fit(x, 3, 2, max_iter=3, tol=0.0, n_init=2, checkpoint_every=1,
                      checkpoint_fn=lambda t, m: saved.append(t.state_dict()))
    common = {"run", "iteration", "runs_done", "best_log_likelihood", "best_params",
              "previous_log_likelihood", "converged", "config", "history"}
    assert set(saved[0]) == common | {"generator"}
    assert set(saved[-1]) == common
    assert saved[3]["run"] == 1 and saved[3]["runs_done"] == 1  # run 2, iteration 1
    assert saved[3]["best_params"] is not None
    assert saved[-1]["run"] == 2 and saved[-1]["iteration"] == 0


# --------------------------------------------------------------------- MAP EM defaults


def test_defaults_use_the_automatic_noise_prior_and_early_stopping(mixture_data):
    """EMConfig() is MAP EM with s₀ chosen on validation data and early stopping; every
    record carries the MAP objective and the prior's s₀."""
    config = EMConfig()
    assert config.noise_prior_variance == "auto" and config.noise_prior_strength > 0
    assert config.patience > 0 and 0 < config.val_fraction < 1
    x, val = mixture_data
    model = MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64)
    trainer = EMTrainer(EMConfig(max_iter=8, search_warmup=2, progress=False))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, validation=val)
    fit_seconds = time.perf_counter() - started
    assert trainer.selected_noise_prior_variance is not None
    for record in trainer.history:
        assert {"train_objective", "noise_prior_variance", "early_stop"} <= set(record)
    assert trainer.history[-1]["noise_prior_variance"] == trainer.selected_noise_prior_variance
    assert trainer.search_seconds is not None and trainer.search_seconds > 0
    # Every search and the tempered step: at least the last search, at most the whole fit.
    assert trainer.tempered is not None
    assert trainer.search_seconds <= trainer.selection_seconds < fit_seconds
    # The warm-up (search_warmup=2) uses the weakest s₀, the chosen one follows.
    values = [h["noise_prior_variance"] for h in trainer.history]
    assert values[:3] == [config.quantization_variance] * 3
    assert set(values[3:]) == {trainer.selected_noise_prior_variance}


def test_states_without_the_new_keys_still_load(mixture_data):
    """Checkpoints from before MAP EM lack the search and early-stopping keys: they load."""
    x, val = mixture_data
    saved = []
    _fit(x, 3, 2, validation=val, max_iter=3, tol=0.0, checkpoint_every=1, patience=2,
         noise_prior_variance=0.1, noise_prior_strength=1.0,
         checkpoint_fn=lambda t, m: saved.append(t.state_dict()))
    state = roundtrip(saved[1])
    assert {"best_val_params", "best_val_log_likelihood", "bad_iterations"} <= set(state)
    for key in ("best_val_params", "best_val_log_likelihood", "bad_iterations",
                "noise_prior_variance"):
        state.pop(key, None)
    same = EMConfig(**state["config"])  # the config it was saved with
    EMTrainer(same).load_state_dict(state)
    bad = dict(roundtrip(saved[1]), bad_iterations="2")
    with pytest.raises(TypeError, match="'bad_iterations' must be int"):
        EMTrainer(same).load_state_dict(bad)


# ---------------------------------------------------------------------- uint8 data, TF32


def _quantized_problem(seed=0):
    """uint8 rows of two shifted clusters ([400, 12]) and the float32 model fitted to them."""
    g = gen(seed)
    levels = 60 + 30 * torch.randn(400, 12, generator=g)
    levels[:200] += 120
    from mfa.data import QuantizedRows
    rows = QuantizedRows(levels.clamp(0, 255).round().to(torch.uint8), dequantize=True, seed=3)
    return rows, MixtureOfFactorAnalyzers(2, 12, 2, generator=gen(seed + 1))


@pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")
@pytest.mark.parametrize("validation", [True, False])
def test_quantized_rows_fit_as_their_float_tensor(validation):
    """Trained on uint8 QuantizedRows (made float per batch, initialisation subsample, hold-out
    split) EM gives exactly what the same rows converted up front give."""
    rows, model = _quantized_problem()
    cfg = dict(max_iter=4, tol=0.0, batch_size=64, init_samples=150, kmeans_iter=3,
               complete_iter=1, progress=False, patience=2)
    train, val = (rows.subset(torch.arange(300)), rows.subset(torch.arange(300, 400)))
    if not validation:
        train, val = rows, None  # val_fraction is held out of the uint8 rows
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ta, tb = EMTrainer(EMConfig(**cfg)), EMTrainer(EMConfig(**cfg))
    ta.fit(a, train, val)
    tb.fit(b, train[0:len(train)], None if val is None else val[0:len(val)])
    def untimed(history):
        return [{key: v for key, v in record.items() if key != "seconds"} for record in history]

    assert untimed(ta.history) == untimed(tb.history)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


@pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")
@pytest.mark.parametrize("n_init", [1, 2])
def test_initialisation_rows_are_freed_before_em_runs(monkeypatch, n_init):
    """The float rows the initialisation gathers from uint8 data (``min(N, init_samples)``:
    2.5 GB for CelebA's 50,000) are let go after the last restart's initialisation, not held
    through every EM iteration (docs/data.md: no float copy of the whole set)."""
    import weakref

    from mfa import em

    rows, model = _quantized_problem()
    gathered, alive = [], []
    gather, run = em.gather_rows, em.EMTrainer._run

    def gathering(*args, **kwargs):
        out = gather(*args, **kwargs)
        gathered.append(weakref.ref(out))
        return out

    def running(self, *args, **kwargs):
        alive.append([ref() is not None for ref in gathered])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(em, "gather_rows", gathering)
    monkeypatch.setattr(em.EMTrainer, "_run", running)
    cfg = EMConfig(max_iter=2, batch_size=64, init="kmeans", init_samples=1000, kmeans_iter=2,
                   complete_iter=1, n_init=n_init, progress=False)
    EMTrainer(cfg).fit(model, rows.subset(torch.arange(300)), rows.subset(torch.arange(300, 400)))
    assert len(gathered) == 1  # gathered once, for every restart
    # kept for the restarts still to initialise, freed before the last one's EM
    assert alive[:n_init] == [[True]] * (n_init - 1) + [[False]]


@pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")
def test_allow_tf32_is_set_during_fit_only():
    from mfa.training import tf32_enabled
    rows, model = _quantized_problem()
    seen = []
    before = tf32_enabled()
    trainer = EMTrainer(EMConfig(max_iter=2, allow_tf32=True, progress=False, patience=0,
                                 noise_prior_variance=1e-3))
    trainer.fit(model, rows, callbacks=[lambda *_: seen.append(tf32_enabled())])
    assert seen == [True, True] and tf32_enabled() == before
    assert trainer.selection_seconds is None  # s₀ fixed: nothing was selected
    with pytest.raises(ValueError, match="allow_tf32"):
        EMConfig(allow_tf32="yes").validate()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stats_dtype", ["float64", "precise", "centred", "mixed", "centred32",
                                         "float32"])
def test_tf32_m_step_against_float64_reference(stats_dtype):
    """One EM update of a float32 model with TF32 on (EMConfig.allow_tf32), against float64
    on an image-like problem (D=768, K=8, means in [0.2, 0.8], loadings explaining ~90 % of
    the variance, noise 1e-3, n=4096). TF32 may be allowed in a mode only if its errors stay
    ≥ 6× below the sampling error of one M-step at this n (~6e-3 relative on the means, ~6 %
    on a noise variance): means ≤ 1e-4 (relative to max |μ|), loadings ≤ 1e-3 (relative
    Frobenius), noise variances ≤ 1e-2 (max relative). float32 without TF32 (measured on the
    CPU): 8e-8, 5.5e-7 and 6e-7 (float64/precise) to 2.8e-5 (float32 mode). TF32 rounds each
    product's inputs to 11 significant bits (2⁻¹¹ ≈ 4.9e-4). The ``mixed`` and ``float32``
    modes sum in float32 and keep TF32's error (opt-in, documented): their noise variances
    are held to 3e-2 with TF32 (a CPU emulation of TF32's rounding gave 4.6e-3 and 1.01e-2,
    on the edge of 1e-2; the H200 benchmark's other problem 0.7 % and 2.1 %)."""
    g = gen(0)
    k, d, lat, n = 8, 768, 6, 4096
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k, dtype=F64), 0.2 + 0.6 * torch.rand(k, d, generator=g,
                                                                    dtype=F64),
        0.1 / lat**0.5 * torch.randn(k, d, lat, generator=g, dtype=F64),
        torch.full((k, d), 1e-3, dtype=F64)).to("cuda")
    x64, _ = truth.sample(n, generator=torch.Generator("cuda").manual_seed(1))

    def update(model, x, mode, tf32):
        cfg = EMConfig(max_iter=1, tol=0.0, init="none", stats_dtype=mode, batch_size=1024,
                       progress=False, patience=0, noise_prior_strength=0.0,
                       allow_tf32=tf32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            EMTrainer(cfg).fit(model, x)
        return model

    ref = update(copy.deepcopy(truth), x64, "float64", False)
    bounds = {"means": 1e-4, "loadings": 1e-3, "noise": 1e-2}
    for tf32 in (False, True):
        m = update(copy.deepcopy(truth).float(), x64.float(), stats_dtype, tf32)
        errors = {
            "means": ((m.means.double() - ref.means).abs().max() / ref.means.abs().max()),
            "loadings": ((m.factor_loadings.double() - ref.factor_loadings).norm()
                         / ref.factor_loadings.norm()),
            "noise": ((m.noise_variance.double() - ref.noise_variance).abs()
                      / ref.noise_variance).max(),
        }
        for name, bound in bounds.items():
            if tf32 and name == "noise" and stats_dtype in ("mixed", "float32"):
                bound = 3e-2
            assert errors[name].item() <= bound, (stats_dtype, tf32, name, errors[name].item())


def test_resume_right_after_a_repeated_search_equals_the_uninterrupted_fit():
    """A checkpoint taken as patience ran out and a stronger s₀ search was due (its stint has
    no best yet) resumes to the uninterrupted fit (it ended 12 iterations later, elsewhere)."""
    d = load_dataset("embedded-mnist", dequantize=True)

    def pool(t):  # 14×14 digits: a quick fit
        return torch.nn.functional.avg_pool2d(t.view(-1, 1, 28, 28), 2).flatten(1).contiguous()

    x, v = pool(d.train[:800]), pool(d.val[:150])
    config = dict(max_iter=60, patience=3, reseed_rounds=0, tempered_step=False, tol=0,
                  checkpoint_every=1, progress=False)

    def new():
        return MixtureOfFactorAnalyzers(20, 196, 2, generator=torch.Generator().manual_seed(5))

    snapshots = []
    full, trainer = new(), EMTrainer(EMConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(full, x, v, checkpoint_fn=lambda t, m: snapshots.append(
            (copy.deepcopy(t.state_dict()), copy.deepcopy(m.state_dict()))))
        state, params = next(s for s in snapshots
                             if "val_at_search" in s[0] and "stint_best" not in s[0])
        resumed, again = new(), EMTrainer(EMConfig(**config))
        resumed.load_state_dict(params)
        again.load_state_dict(state)
        again.fit(resumed, x, v)
    assert len(again.history) == len(trainer.history)
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_dataset_initialises_from_the_same_seeded_subset_as_a_tensor():
    # rows sorted by cluster, init_samples a third of them: a Dataset was initialised from
    # its first rows (one cluster), a tensor from a seeded random subset
    g = gen(3)
    centres = torch.tensor([[-6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]], dtype=F64)
    x = (centres.repeat_interleave(200, 0) + torch.randn(600, 3, generator=g, dtype=F64))
    val = centres.repeat_interleave(20, 0) + torch.randn(60, 3, generator=g, dtype=F64)
    fits = []
    for data in (x, TensorDataset(x)):
        model = MixtureOfFactorAnalyzers(3, 3, 1, dtype=F64)
        config = EMConfig(max_iter=30, init_samples=200, noise_prior_variance=1e-3,
                          patience=0, tempered_step=False, progress=False, batch_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            EMTrainer(config).fit(model, data, validation=val)
        fits.append(model)
    for name, value in fits[0].state_dict().items():
        torch.testing.assert_close(fits[1].state_dict()[name], value, rtol=1e-9, atol=1e-9)
    assert (fits[1].weights - 1 / 3).abs().max() < 0.02  # every cluster found


@pytest.mark.parametrize("init_samples", [300, 5000])  # a subset, every row
def test_a_shuffled_dataloader_initialises_like_its_dataset(init_samples):
    """A DataLoader with shuffle=True initialised from its first (shuffled) rows, so the fit
    changed with torch's global seed; it now draws EMConfig.seed's subset of its Dataset."""
    x = torch.randn(1000, 4, generator=gen(4), dtype=F64)
    config = EMConfig(max_iter=1, init_samples=init_samples, reseed_rounds=0, patience=0,
                      tempered_step=False, noise_prior_strength=0.0, progress=False)
    fits = []
    for global_seed, data in ((1, TensorDataset(x)), (1, None), (2, None)):
        torch.manual_seed(global_seed)
        loader = data or DataLoader(TensorDataset(x), batch_size=128, shuffle=True)
        model = MixtureOfFactorAnalyzers(3, 4, 1, dtype=F64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            EMTrainer(config).fit(model, loader)
        fits.append(model)
    for other in fits[1:]:
        for name, value in fits[0].state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], value, rtol=1e-9, atol=1e-9)


def test_a_non_finite_dataset_item_is_named_through_the_held_out_split():
    """NaN in a Dataset: the error names the item of the Dataset (it named the row's
    position in a batch of the shuffled training subset that hold_out made)."""
    x = torch.randn(300, 4, generator=gen(5), dtype=F64)
    x[7, 2] = float("nan")
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"item 7 of the TensorDataset\), feature 2"):
        EMTrainer(EMConfig(max_iter=1, progress=False)).fit(model, TensorDataset(x))
    with pytest.raises(ValueError, match=r"item 7 of the TensorDataset\), feature 2"):
        EMTrainer(EMConfig(max_iter=1, progress=False, init="none")).fit(
            model, TensorDataset(x), validation=x[8:20])


def test_resume_from_the_callback_of_the_converged_iteration_writes_its_record_once():
    """The iteration that converges records itself and runs the callbacks without an M-step;
    a state saved there stood before it, so the resumed fit redid it and the history held
    its final record twice. The history now matches the uninterrupted fit's."""
    x = load_dataset("embedded-mnist", dequantize=True, seed=0).as_float("train")[:600].double()
    config = dict(max_iter=30, tol=0.5, patience=0, noise_prior_variance=1e-3,
                  reseed_rounds=0, tempered_step=False, progress=False, seed=2)

    def fresh():
        return MixtureOfFactorAnalyzers(3, x.shape[1], 2, dtype=torch.float64)

    whole = EMTrainer(EMConfig(**config))
    whole.fit(fresh(), x)
    assert whole.history[-1]["final"] and len(whole.history) >= 3
    saved = {}

    def stop_at_the_final_record(trainer, model, record):
        if record["final"]:
            saved["trainer"], saved["model"] = trainer.state_dict(), model.state_dict()
            raise KeyboardInterrupt

    model = fresh()
    with pytest.raises(KeyboardInterrupt):
        EMTrainer(EMConfig(**config)).fit(model, x, callbacks=[stop_at_the_final_record])
    resumed, again = EMTrainer(EMConfig(**config)), fresh()
    resumed.load_state_dict(saved["trainer"])
    again.load_state_dict(saved["model"])
    resumed.fit(again, x)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]


def test_a_resumed_fit_saves_its_state_before_its_first_m_step():
    """Resumed one iteration before it converges, a fit's first record is the converged one,
    which has no M-step: a state saved there was empty (not loadable) on a fresh trainer, and
    an earlier fit's finished state on a reused one (its resume returned the wrong model).
    state_dict() right after load_state_dict() gave no state either."""
    x = load_dataset("embedded-mnist", dequantize=True, seed=0).as_float("train")[:600].double()
    config = dict(max_iter=30, tol=0.5, patience=0, noise_prior_variance=1e-3,
                  reseed_rounds=0, tempered_step=False, progress=False, seed=2)

    def fresh():
        return MixtureOfFactorAnalyzers(3, x.shape[1], 2, dtype=torch.float64)

    snaps = []
    whole = EMTrainer(EMConfig(**config))
    whole.fit(fresh(), x, callbacks=[lambda t, m, r: snaps.append(
        (copy.deepcopy(t.state_dict()), copy.deepcopy(m.state_dict())))])
    assert whole.history[-1]["final"] and len(whole.history) >= 3
    state, params = snaps[-2]  # the record before the converged one
    for trainer in (EMTrainer(EMConfig(**config)), whole):  # a fresh one, a reused one
        trainer.load_state_dict(state)
        assert trainer.state_dict()["iteration"] == state["iteration"]
        model = fresh()
        model.load_state_dict(params)
        saved = []
        trainer.fit(model, x, callbacks=[lambda t, m, r, saved=saved: saved.append(
            (r["final"], copy.deepcopy(t.state_dict()), copy.deepcopy(m.state_dict())))])
        final, state_there, params_there = saved[0]
        assert final and state_there["iteration"] == state["iteration"]
        again, model = EMTrainer(EMConfig(**config)), fresh()
        again.load_state_dict(state_there)
        model.load_state_dict(params_there)
        again.fit(model, x)
        assert len(again.history) == len(snaps)
        for name, value in model.state_dict().items():
            assert torch.equal(value, snaps[-1][1][name]), name


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
def test_the_largest_seed_fits_and_reproduces():
    """EMConfig accepts seeds up to 2**63 - 1; the restarts' generator seed (seed·1000003 + run)
    overflowed torch's range there and failed with an unnamed overflow."""
    x = torch.randn(200, 3, generator=gen(1), dtype=torch.float64)
    fits = []
    for _ in range(2):
        model = MixtureOfFactorAnalyzers(2, 3, 1)
        EMTrainer(EMConfig(seed=2**63 - 1, n_init=2, max_iter=3, progress=False)).fit(model, x)
        fits.append(model.state_dict())
    for name, value in fits[0].items():
        assert torch.equal(value, fits[1][name]), name


def test_resumed_max_iter_may_not_move_the_automatic_search():
    """Saved with max_iter=1 the s₀ search ran after 0 iterations; resumed with max_iter=8
    (where it runs after search_warmup=1) the fit was neither run: its parameters were up to
    1.6 off the uninterrupted max_iter=8 fit, without a word."""
    from mfa.em_state import check_resumed_max_iter

    x = torch.randn(300, 3, generator=gen(4), dtype=F64)
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=1, progress=False, checkpoint_every=1)).fit(
            MixtureOfFactorAnalyzers(2, 3, 1, dtype=F64), x,
            checkpoint_fn=lambda t, m: saved.append(t.state_dict()))
    state = next(s for s in saved if s["run"] == 0 and s["iteration"] == 1)
    with pytest.raises(ValueError, match=r"saved with max_iter=1; the automatic noise-prior "
                                         r"search runs after min\(search_warmup, max_iter - 1\) "
                                         r"iterations, 0 there but 1 with max_iter=8 .*resume "
                                         r"with max_iter=1 \(the config key train\.em\.max_iter\)"):
        EMTrainer(EMConfig(max_iter=8, progress=False)).load_state_dict(state)
    # The other way (a reviewer's run: 1 iteration done of max_iter=30, resumed with
    # max_iter=1) names the limits that would resume.
    done = {"config": {"max_iter": 30, "noise_prior_variance": "auto", "search_warmup": 1},
            "run": 0, "iteration": 1}
    with pytest.raises(ValueError, match=r"1 there but 0 with max_iter=1 \(search_warmup=1\)"
                                         r".*resume with max_iter >= 2"):
        check_resumed_max_iter(done, 1)
    # limits that leave the search where it was may change; so may any without the search
    auto = {"config": {"max_iter": 4, "noise_prior_variance": "auto", "search_warmup": 1},
            "run": 0, "iteration": 2}
    check_resumed_max_iter(auto, 8)
    fixed = {"config": {"max_iter": 1, "noise_prior_variance": 1e-3}, "run": 0, "iteration": 1}
    check_resumed_max_iter(fixed, 8)


def test_resumed_max_iter_may_change_only_within_the_first_restart():
    """Resumed in a second restart (or a re-seeding round) with another max_iter, the fit mixed
    two limits (the first restart ran under the saved one) without a word."""
    from mfa.em_state import check_resumed_max_iter

    state = {"config": {"max_iter": 12}, "run": 1, "iteration": 3}
    with pytest.raises(ValueError, match=r"restart/round 2, after earlier ones ran with "
                                         r"max_iter=12; resume with that max_iter \(not 5\)"):
        check_resumed_max_iter(state, 5)
    check_resumed_max_iter(state, 12)
    first = {"config": {"max_iter": 12}, "run": 0, "iteration": 7}
    check_resumed_max_iter(first, 20)
    with pytest.raises(ValueError, match=r"already done 7 iterations .* max_iter=5 is below"):
        check_resumed_max_iter(first, 5)
    x = torch.randn(120, 3, generator=gen(2), dtype=F64)
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=3, n_init=2, progress=False, checkpoint_every=1)).fit(
            MixtureOfFactorAnalyzers(2, 3, 1, dtype=F64), x,
            checkpoint_fn=lambda t, m: saved.append(t.state_dict()))
    later = next(s for s in saved if s["run"] == 1)
    with pytest.raises(ValueError, match="earlier ones ran with max_iter=3"):
        EMTrainer(EMConfig(max_iter=6, n_init=2, progress=False,
                           checkpoint_every=1)).load_state_dict(later)


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_full_rank_factors_fit_as_a_full_covariance_gmm(noise):
    """L = D is a full-covariance mixture. Its initial fit put every noise variance at the
    floor, where E[z] = A⁻¹(x − μ) reproduces x and the M-step returns the same A and μ: EM
    stopped after 2 iterations, "converged", at the initialisation's log-likelihood
    (-4.7133 here against scikit-learn's -4.6410). It now reaches scikit-learn's optimum."""
    from sklearn.mixture import GaussianMixture

    g = gen(4)
    means, load = 3 * torch.randn(3, 6, generator=g, dtype=F64), torch.randn(
        3, 6, 2, generator=g, dtype=F64)
    comp = torch.randint(0, 3, (600,), generator=g)
    z = torch.randn(600, 2, 1, generator=g, dtype=F64)
    x = means[comp] + (load[comp] @ z).squeeze(-1) + 0.05**0.5 * torch.randn(
        600, 6, generator=g, dtype=F64)
    reference = GaussianMixture(3, covariance_type="full", reg_covar=1e-6, n_init=5,
                                random_state=0).fit(x.numpy()).score(x.numpy())
    model = MixtureOfFactorAnalyzers(3, 6, 6, noise, dtype=F64)
    trainer = EMTrainer(EMConfig(noise_prior_strength=0.0, patience=0, max_iter=100,
                                 progress=False))
    trainer.fit(model, x)
    assert trainer.converged
    start = trainer.history[0]["train_log_likelihood"]
    assert EMTrainer.evaluate(model, x) == pytest.approx(reference, abs=1e-3)
    assert reference - start > 0.05  # (the initial fit is clearly short of it)


def test_a_config_changed_after_load_state_dict_is_checked_by_fit():
    """fit validates a config set after __init__, but the resume checks ran only in
    load_state_dict: a max_iter below the iterations done, or a changed variance floor, set
    between them went through unchecked."""
    x = torch.randn(120, 3, generator=gen(2), dtype=F64)
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=5, progress=False, checkpoint_every=1, tol=0)).fit(
            MixtureOfFactorAnalyzers(2, 3, 1, dtype=F64), x,
            checkpoint_fn=lambda t, m: saved.append(copy.deepcopy(t.state_dict())))
    third = next(s for s in saved if s["iteration"] == 3)
    for key, value, match in (("max_iter", 2, "already done 3 iterations"),
                              ("variance_floor", 1e-2, "saved with variance_floor=")):
        trainer = EMTrainer(EMConfig(max_iter=5, progress=False, checkpoint_every=1, tol=0))
        trainer.load_state_dict(third)
        setattr(trainer.config, key, value)
        with pytest.raises(ValueError, match=match):
            trainer.fit(MixtureOfFactorAnalyzers(2, 3, 1, dtype=F64), x)


@pytest.mark.parametrize("stats_dtype", ["auto", "precise", "float32"])
def test_float32_e_step_records_the_log_likelihood_at_image_signal_to_noise(stats_dtype):
    """Pixel-like rows (means 0.4-0.6, loadings of 0.3, noise variances at 1e-6), a float32
    model: the E-step's recorded log-likelihood matches a dense float64 MultivariateNormal of
    the same parameters. Its log-densities kept the Woodbury form's rounding (no residual
    form, unlike log_prob): 0.2-0.3 nats a row off, and the MAP objective fell by as much."""
    g = gen(0)
    k, d, lat, n = 2, 20, 2, 500
    means = 0.4 + 0.2 * torch.rand(k, d, generator=g, dtype=torch.float64)
    loadings = 0.3 * torch.randn(k, d, lat, generator=g, dtype=torch.float64)
    noise = torch.full((k, d), 1e-6, dtype=torch.float64)
    comp = torch.randint(0, k, (n,), generator=g)
    x = (means[comp] + (loadings[comp] @ torch.randn(n, lat, 1, generator=g,
                                                     dtype=torch.float64)).squeeze(-1)
         + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)).float()

    def exact(model):  # mean log p per row of a float64 copy, by dense Gaussians
        w, mu, a, psi = (t.detach().double() for t in (model.weights, model.means,
                                                       model.factor_loadings,
                                                       model.noise_variance))
        joint = torch.stack([w[j].log() + MultivariateNormal(
            mu[j], a[j] @ a[j].T + torch.diag(psi[j])).log_prob(x.double()) for j in range(k)])
        return torch.logsumexp(joint, 0).mean().item()

    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means.float(), loadings.float(), 3 * noise.float(),
        min_noise=1e-9)
    scores = [exact(model)]
    trainer = EMTrainer(EMConfig(max_iter=8, tol=0.0, patience=0, noise_prior_strength=0.0,
                                 init="none", variance_floor=1e-9, stats_dtype=stats_dtype,
                                 progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, callbacks=[lambda t, m, r: scores.append(exact(m))])
    recorded = [r["train_log_likelihood"] for r in trainer.history]
    errors = [abs(r - s) for r, s in zip(recorded, scores[:-1], strict=True)]
    assert max(errors) < 0.01, errors


def test_restarts_without_iterations_keep_the_best_initialisation():
    """n_init > 1 with max_iter = 0 keeps the initialisation with the best train
    log-likelihood (it kept restart 0's: never scored, every restart compared at −inf)."""
    from mfa.em_state import restart_seed
    from mfa.init import initialise

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(60, 6, generator=g) + 4 * torch.randn(1, 6, generator=g)
                   for _ in range(5)]).double()
    starts = []
    for run in range(3):  # each restart's initialisation, as the trainer draws it
        model = MixtureOfFactorAnalyzers(4, 6, 1, dtype=torch.float64)
        initialise(model, x, "random", seed=restart_seed(3, run), variance_floor=1e-6)
        starts.append(model.log_prob(x).mean().item())
    assert max(starts) > starts[0] + 0.1  # the case this test is about
    model = MixtureOfFactorAnalyzers(4, 6, 1, dtype=torch.float64)
    EMTrainer(EMConfig(progress=False, max_iter=0, n_init=3, init="random", patience=0,
                       noise_prior_strength=0, seed=3)).fit(model, x)
    assert model.log_prob(x).mean().item() == pytest.approx(max(starts), rel=1e-12)


def _clusters(n=200, n_val=60, d=12, k=4, seed=0):
    """Rows around ``k`` centres in [0, 1] (float64), split train/validation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (n + n_val,), generator=g)
    x = centres[labels] + 0.3 * torch.randn(n + n_val, d, generator=g, dtype=torch.float64)
    x = (x - x.min()) / (x.max() - x.min())
    return x[:n], x[n:]


def test_max_iter_warns_when_early_stopping_keeps_an_earlier_iteration():
    """Reaching max_iter with patience left was silent whenever an earlier iteration had
    scored best on validation (its parameters were returned before the warning)."""
    x, val = _clusters()
    model = MixtureOfFactorAnalyzers(8, 12, 2, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(5))
    trainer = EMTrainer(EMConfig(max_iter=8, tol=0.0, patience=50, reseed_rounds=0,
                                 tempered_step=False, progress=False,
                                 noise_prior_variance=1e-3))
    with pytest.warns(ConvergenceWarning, match=r"max_iter=8 .*best-validation iteration"):
        trainer.fit(model, x, val)
    best = max(trainer.history, key=lambda r: r["val_log_likelihood"])["iteration"]
    assert best < 8 and not trainer.converged  # (the case: an earlier iteration kept)
    assert not any(r["early_stop"] for r in trainer.history)


def test_the_record_of_a_search_names_the_noise_prior_its_m_step_used():
    """At the iteration that ran the "auto" search, the record gave the s₀ before it, while
    its validation score came from the M-step under the chosen one."""
    x, val = _clusters()
    model = MixtureOfFactorAnalyzers(6, 12, 2, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(5))
    trainer = EMTrainer(EMConfig(max_iter=8, reseed_rounds=0, tempered_step=False,
                                 progress=False, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, val)
    history = trainer.history
    search = history[EMConfig().search_warmup]  # the iteration after the warm-up
    assert search["step_noise_prior_variance"] != search["noise_prior_variance"]
    assert search["step_noise_prior_variance"] == history[EMConfig().search_warmup + 1][
        "noise_prior_variance"]  # the chosen s₀, the next record's prior
    for record in history:
        if record["final"] or record["val_log_likelihood"] is None:
            assert record["step_noise_prior_variance"] is None
    kept = max((r for r in history if r["val_log_likelihood"] is not None),
               key=lambda r: r["val_log_likelihood"])
    assert kept["step_noise_prior_variance"] == trainer.selected_noise_prior_variance


def test_a_config_with_numpy_floats_saves_a_weights_only_state(mixture_data):
    """np.float64 fields passed validation, and the state failed torch.load(weights_only)."""
    x, _ = mixture_data
    config = EMConfig(**{**PLAIN_EM, "tol": np.float64(1e-3)}, max_iter=2, progress=False)
    model = MixtureOfFactorAnalyzers(3, x.shape[1], 1, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(0))
    trainer = EMTrainer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x)
    state = roundtrip(trainer.state_dict())
    assert type(state["config"]["tol"]) is float and state["config"]["tol"] == 1e-3


def test_min_delta_ends_the_fit_once_patience_iterations_gain_less_than_it():
    """min_delta of 1 nat per row and feature, which no iteration here gains: patience
    restarts only at the first scored iteration, so the fit ends ``patience`` iterations
    later, on the same path as the fit without it (which ran on), keeping the best-scoring
    of those iterations' parameters; min_delta < 0 is refused."""
    d = load_dataset("embedded-mnist", dequantize=True)

    def pool(t):  # 14×14 digits: a quick fit whose validation score climbs for a while
        return torch.nn.functional.avg_pool2d(t.view(-1, 1, 28, 28), 2).flatten(1).contiguous()

    train, val = pool(d.train[:800]), pool(d.val[:150])
    config = dict(noise_prior_variance=1e-3, patience=3, reseed_rounds=0, tempered_step=False,
                  tol=0.0, max_iter=30, search_warmup=0, progress=False, seed=3)
    fits = {}
    for min_delta in (0.0, 1.0):
        snapshots = []
        model = MixtureOfFactorAnalyzers(20, 196, 2)
        trainer = EMTrainer(EMConfig(min_delta=min_delta, **config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, train, val, callbacks=[
                lambda t, m, r, kept=snapshots: kept.append(copy.deepcopy(m.state_dict()))])
        fits[min_delta] = ([{k: v for k, v in h.items() if k != "seconds"}
                            for h in trainer.history], snapshots, model)
    plain, _, _ = fits[0.0]
    history, snapshots, model = fits[1.0]
    assert len(history) == config["patience"] + 1 < len(plain)
    assert history == [dict(h, early_stop=False) for h in plain[:3]] + [
        dict(plain[3], early_stop=True)]
    best = max(range(len(history)), key=lambda i: history[i]["val_log_likelihood"])
    for name, value in snapshots[best].items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="min_delta"):
        EMConfig(min_delta=-1e-3).validate()


def test_a_state_saved_before_min_delta_warns_that_its_early_stopping_changes():
    """A state whose saved config has no min_delta fitted with any gain counting; resumed
    under the default it may stop elsewhere, which is said, with the way to continue as it
    was (min_delta=0, no warning); a finished fit's state has nothing left to stop."""
    from helpers import random_data

    truth = random_model(2, 6, 1, seed=51)
    train, val = random_data(120, truth, seed=52), random_data(40, truth, seed=53)
    config = dict(noise_prior_variance=1e-2, patience=2, reseed_rounds=0, tempered_step=False,
                  max_iter=6, progress=False)
    saved = []
    trainer = EMTrainer(EMConfig(**config, checkpoint_every=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(MixtureOfFactorAnalyzers(2, 6, 1, dtype=torch.float64), train, val,
                    checkpoint_fn=lambda t, m: saved.append(copy.deepcopy(t.state_dict())))
    middle, done = saved[0], saved[-1]
    assert middle["run"] == 0 and done["run"] == 1
    for state in (middle, done):
        del state["config"]["min_delta"]
    with pytest.warns(UserWarning, match=r"before EMConfig.min_delta existed.*pass min_delta=0"):
        EMTrainer(EMConfig(**config)).load_state_dict(roundtrip(middle))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMTrainer(EMConfig(**config, min_delta=0.0)).load_state_dict(roundtrip(middle))
        EMTrainer(EMConfig(**config)).load_state_dict(roundtrip(done))


def test_init_seconds_counts_every_restarts_initialisation(monkeypatch, mixture_data):
    """``init_seconds`` is the wall time of this fit's initialisations, summed over restarts:
    ``None`` before a fit, at least the time spent inside ``initialise`` (slowed by 0.1 s a
    call here) and less than the whole fit."""
    import mfa.em

    real, calls = mfa.em.initialise, []

    def slow(*args, **kwargs):
        started = time.perf_counter()
        time.sleep(0.1)
        out = real(*args, **kwargs)
        calls.append(time.perf_counter() - started)
        return out

    monkeypatch.setattr(mfa.em, "initialise", slow)
    x, val = mixture_data
    trainer = EMTrainer(EMConfig(max_iter=2, n_init=2, progress=False))
    assert trainer.init_seconds is None
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64), x, validation=val)
    fit_seconds = time.perf_counter() - started
    assert len(calls) == 2
    # (the rest of init_seconds: sampling 600 rows for K-means and a broadcast)
    assert 0.2 <= sum(calls) <= trainer.init_seconds < min(fit_seconds, sum(calls) + 0.1)
    with warnings.catch_warnings():  # a second fit counts its own initialisations only
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64), x, validation=val)
    assert len(calls) == 4 and sum(calls[2:]) <= trainer.init_seconds < sum(calls[2:]) + 0.1


def test_min_delta_scales_by_the_validation_rows_observed_features(monkeypatch, mixture_data):
    """min_delta is nats per row and feature; with missing="allow" a validation row is scored
    on its observed features only, so the gain early stopping asks for scales by their mean
    count (4 of 5 here: half the rows hide 2 features), not by D (which asked a row hiding
    half its pixels for twice the gain per observed feature)."""
    from mfa.em_state import RunState

    real, seen = RunState.track_validation, []

    def spy(self, clone, model, val_ll, counting, patience, min_gain=0.0):
        seen.append(min_gain)
        return real(self, clone, model, val_ll, counting, patience, min_gain)

    monkeypatch.setattr(RunState, "track_validation", spy)
    x, val = mixture_data
    val = val.clone()
    val[::2, :2] = float("nan")
    config = EMConfig(max_iter=3, missing="allow", patience=2, min_delta=1e-3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EMTrainer(config).fit(MixtureOfFactorAnalyzers(3, 5, 2, dtype=F64), x, validation=val)
    assert seen and seen == [pytest.approx(1e-3 * 4.0)] * len(seen)


@pytest.mark.parametrize("min_mass, reseeded", [(5.0, True), (2.9, False)])
def test_a_component_below_min_component_mass_is_reseeded_and_one_above_is_not(
        min_mass, reseeded, caplog):
    """A component alone on a far clump of 3 rows holds a mass of 3: one M-step with
    ``min_component_mass=5`` re-seeds it (its mean moves next to the other clumps); with
    2.9, just below its mass, it stays on the clump."""
    g = gen(0)
    centres = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [50, 50, 50]], dtype=F64)
    x = torch.cat([c + torch.randn(n, 3, generator=g, dtype=F64)
                   for c, n in zip(centres, [100, 100, 100, 3], strict=True)])
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((4,), 0.25, dtype=F64), centres.clone(), torch.full((4, 3, 1), 0.1, dtype=F64),
        torch.ones(4, 3, dtype=F64))
    with caplog.at_level(logging.WARNING, logger="mfa.em"):
        _fit(x, 4, 1, model=model, init="none", max_iter=1, min_component_mass=min_mass,
             reseed_rounds=0, tempered_step=False)
    messages = [r.getMessage() for r in caplog.records if "re-seeded" in r.getMessage()]
    moved = float((model.means[3].detach() - x[-3:].mean(0)).abs().max())
    if reseeded:
        assert moved > 30 and len(messages) == 1 and "[3]" in messages[0], messages
    else:
        assert moved < 0.1 and messages == [], messages  # (μ is solved jointly with A)


# ------------------------------------------------- early stopping's kept parameters and restarts


def _early_stopped(x, val, k, seed=5, **config):
    """Fit a float64 ``k``-component, 2-factor model with patience 2 (no re-seeding rounds, no
    tempered step: their results would replace the restart's); ``(model, trainer, models)``
    with ``models`` a copy of the model after each record's iteration."""
    models = []
    model = MixtureOfFactorAnalyzers(k, x.shape[1], 2, dtype=F64,
                                     generator=torch.Generator().manual_seed(seed))
    trainer = EMTrainer(EMConfig(**{"max_iter": 40, "patience": 2, "tol": 0.0,
                                    "reseed_rounds": 0, "tempered_step": False,
                                    "progress": False, **config}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x, val, callbacks=[
            lambda t, m, r: models.append((r, copy.deepcopy(m)))])
    return model, trainer, models


@pytest.mark.parametrize("noise_prior_variance", [1e-3, "auto"])
def test_early_stopping_returns_the_best_validation_iterations_parameters(noise_prior_variance):
    """The validation score peaks before the last iteration: the returned model is the
    peak's (a dense float64 mixture scores it at the history's best, not its last), not the
    last M-step's, which deleting the load of the best parameters returned."""
    x, val = _clusters(n=80, n_val=60)
    model, trainer, models = _early_stopped(x, val, 8, max_searches=1,
                                            noise_prior_variance=noise_prior_variance)
    scored = [(r["val_log_likelihood"], m) for r, m in models
              if r["val_log_likelihood"] is not None]
    best = max(range(len(scored)), key=lambda i: scored[i][0])
    assert trainer.history[-1]["early_stop"] and best < len(scored) - 1  # the case
    assert scored[-1][0] < scored[best][0] - 1e-3
    kept = _dense_log_lik(model, val)
    assert kept == pytest.approx(scored[best][0], rel=1e-10, abs=1e-10)
    assert kept == pytest.approx(_dense_log_lik(scored[best][1], val), rel=1e-12, abs=1e-12)
    _assert_same_params(model, scored[best][1], rtol=0, atol=0)


def test_each_restart_keeps_its_own_best_validation_parameters():
    """n_init = 3 with patience: each restart returns its own best-validation iteration's
    parameters, and the fit keeps the restart whose returned parameters have the best train
    log-likelihood (RunState.best_log_likelihood). Here restart 2 is kept although restart
    1 reached a better validation score: a restart that inherited the one before's best
    validation score and parameters returned restart 1's parameters in its place."""
    x, _ = _sample(700, *_planted(6, 6, 2, seed=0, spread=2.0), seed=1)
    train, val = x[:500], x[500:]
    model = MixtureOfFactorAnalyzers(4, 6, 1, dtype=F64)
    models = []
    trainer = EMTrainer(EMConfig(n_init=3, max_iter=15, patience=2, seed=0, init_samples=200,
                                 kmeans_iter=2, reseed_rounds=0, tempered_step=False,
                                 noise_prior_variance=1e-2, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, train, val, callbacks=[
            lambda t, m, r: models.append((r, copy.deepcopy(m)))])
    own = {}  # each restart's best-validation record and model (the first of equal scores)
    for record, snapshot in models:
        run, score = record["run"], record["val_log_likelihood"]
        if score is not None and (run not in own or score > own[run][0]):
            own[run] = (score, snapshot)
    assert sorted(own) == [0, 1, 2]
    train_ll = {run: _dense_log_lik(m, train) for run, (_, m) in own.items()}
    kept = max(train_ll, key=train_ll.get)
    # the case: the kept restart's best validation score is below an earlier restart's
    assert own[kept][0] < max(own[run][0] for run in range(kept)) - 1e-3, own
    assert sorted(train_ll.values())[-1] > sorted(train_ll.values())[-2] + 1e-3
    assert _dense_log_lik(model, train) == pytest.approx(train_ll[kept], rel=1e-12)
    _assert_same_params(model, own[kept][1], rtol=0, atol=0)


@pytest.mark.parametrize("search_warmup", [1, 2])
def test_patience_counts_from_the_iteration_after_the_warm_up(search_warmup):
    """Fixed s₀ and patience 2: the first ``search_warmup`` iterations do not count, every
    later one without a score ``min_delta·D`` above the mark (the score at which patience
    last restarted) does; the fit stops at the iteration where two have counted, which a
    hand count over the history gives. Here the validation score falls from the first
    iteration on, so counting from one iteration later stopped one iteration later."""
    x, val = _clusters(n=200, n_val=60)
    _, trainer, _ = _early_stopped(x, val, 4, noise_prior_variance=1e-3,
                                   search_warmup=search_warmup)
    scores = [r["val_log_likelihood"] for r in trainer.history]
    min_gain = EMConfig().min_delta * x.shape[1]
    mark, bad, stop = None, 0, None
    for i, score in enumerate(scores, start=1):  # i: the iteration, 1-based
        if mark is None or score > mark + min_gain:
            mark, bad = score, 0
        elif i > search_warmup:
            bad += 1
        if bad == 2:
            stop = i
            break
    # the case: the first counted iteration (right after the warm-up) is a bad one
    assert scores[search_warmup] <= scores[0] + min_gain, scores
    assert stop is not None and len(scores) == stop, (scores, stop)
    assert [r["early_stop"] for r in trainer.history] == [False] * (stop - 1) + [True]
