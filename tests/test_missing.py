"""EM from incomplete data (mfa.missing): against complete-data EM, dense float64 conditional
Gaussian references, monotonicity, recovery of a known model, and the trainers' NaN option."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from helpers import F64, gen, random_data, random_model
from torch.distributions import MultivariateNormal

from mfa import MixtureOfFactorAnalyzers, missing
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.m_step import m_step
from mfa.sgd import SGDConfig, SGDTrainer
from mfa.statistics import accumulate_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("diagonal", 2), ("isotropic", 2), ("diagonal", 0), ("isotropic", 0)]


def hide(x: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """``x`` with a seeded ``rate`` of its entries set to NaN (every row keeps one entry)."""
    drop = torch.rand(x.shape, generator=gen(seed), dtype=F64) < rate
    drop[:, 0] = False
    return torch.where(drop, torch.full_like(x, float("nan")), x)


def em_config(**kwargs) -> EMConfig:
    """Plain maximum-likelihood EM (no prior, no early stopping) on incomplete rows."""
    base = {"progress": False, "missing": "allow", "min_component_mass": 0.0,
            "noise_prior_strength": 0.0, "patience": 0}
    base.update(kwargs)
    return EMConfig(**base)


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("noise,n_lat", CASES)
def test_no_missing_equals_complete_data_em(noise, n_lat):
    """The incomplete-data statistics of complete rows give complete-data EM's M-step."""
    model_a = random_model(3, 6, n_lat, noise, seed=2)
    model_b = copy.deepcopy(model_a)
    x = random_data(200, model_a, seed=3)
    for _ in range(3):
        terms = model_a.component_terms()
        stats_a = accumulate_statistics(model_a, x, terms)
        stats_b = missing.incomplete_statistics(model_b, x, model_b.component_terms().reference,
                                                chunk_elements=2000)  # several chunks
        assert stats_a.log_likelihood.item() == pytest.approx(stats_b.log_likelihood.item(),
                                                              rel=1e-12)
        pa = m_step(stats_a, model_a, variance_floor=1e-6)
        pb = m_step(stats_b, model_b, variance_floor=1e-6)
        for name in pa:
            torch.testing.assert_close(pb[name], pa[name], rtol=0, atol=1e-10)
        model_a.set_parameters(**pa)
        model_b.set_parameters(**pb)


def dense_statistics(model, x, reference):
    """Expected sufficient statistics by explicit conditional Gaussian formulas on the joint
    ``(x, z)`` of each component: dense float64, one row and component at a time."""
    k, d, n_lat = model.n_components, model.n_features, model.n_factors
    w = model.weights.detach()
    mu = model.means.detach()
    a = model.factor_loadings.detach()
    noise = model.noise_variance.detach()
    out = {"mass": torch.zeros(k, dtype=F64), "sum_x": torch.zeros(k, d, dtype=F64),
           "sum_x2": torch.zeros(k, d, dtype=F64), "sum_xz": torch.zeros(k, d, n_lat, dtype=F64),
           "sum_z": torch.zeros(k, n_lat, dtype=F64),
           "sum_zz": torch.zeros(k, n_lat, n_lat, dtype=F64)}
    total_ll = 0.0
    for row in x:
        o = ~torch.isnan(row)
        log_joint, moments = [], []
        for c in range(k):
            # Joint of y = (x, z): mean (μ, 0), covariance [[AAᵀ + D, A], [Aᵀ, I]].
            cov = torch.zeros(d + n_lat, d + n_lat, dtype=F64)
            cov[:d, :d] = a[c] @ a[c].T + torch.diag(noise[c])
            cov[:d, d:] = a[c]
            cov[d:, :d] = a[c].T
            cov[d:, d:] = torch.eye(n_lat, dtype=F64)
            mean = torch.cat([mu[c], torch.zeros(n_lat, dtype=F64)])
            given = torch.cat([o, torch.zeros(n_lat, dtype=torch.bool)])
            rest = ~given
            s_oo = cov[given][:, given]
            s_ro = cov[rest][:, given]
            gain = torch.linalg.solve(s_oo, s_ro.T).T  # Σ_ro Σ_oo⁻¹
            cond_mean = mean[rest] + gain @ (row[o] - mean[given])
            cond_cov = cov[rest][:, rest] - gain @ s_ro.T
            marginal = (MultivariateNormal(mean[given], s_oo).log_prob(row[o]) if bool(o.any())
                        else torch.zeros((), dtype=F64))  # nothing observed: p(x_o) = 1
            log_joint.append(torch.log(w[c]) + marginal)
            # Full E[y] and E[y yᵀ] with the observed entries fixed.
            ey = mean.clone()
            ey[given] = row[o]
            ey[rest] = cond_mean
            eyy = torch.outer(ey, ey)
            idx = rest.nonzero().flatten()
            eyy[idx[:, None], idx[None, :]] += cond_cov
            moments.append((ey, eyy))
        log_joint = torch.stack(log_joint)
        ll = torch.logsumexp(log_joint, 0)
        total_ll += ll.item()
        resp = torch.exp(log_joint - ll)
        for c in range(k):
            ey, eyy = moments[c]
            ex, ez = ey[:d] - reference, ey[d:]
            exx = eyy[:d, :d] - torch.outer(ey[:d], reference) - torch.outer(reference, ey[:d]) \
                + torch.outer(reference, reference)
            exz = eyy[:d, d:] - torch.outer(reference, ez)
            out["mass"][c] += resp[c]
            out["sum_x"][c] += resp[c] * ex
            out["sum_x2"][c] += resp[c] * exx.diagonal()
            out["sum_xz"][c] += resp[c] * exz
            out["sum_z"][c] += resp[c] * ez
            out["sum_zz"][c] += resp[c] * eyy[d:, d:]
    return out, total_ll


@pytest.mark.parametrize("noise,n_lat", CASES[:3])
def test_statistics_match_dense_conditional_gaussian(noise, n_lat):
    model = random_model(2, 5, n_lat, noise, seed=4)
    x = hide(random_data(12, model, seed=5), 0.4, seed=6)
    x[3] = float("nan")  # a row with nothing observed: the prior
    x[4, 1:] = float("nan")
    reference = model.component_terms().reference
    stats = missing.incomplete_statistics(model, x, reference)
    ref, ref_ll = dense_statistics(model, x, reference)
    if n_lat:
        chol = torch.linalg.cholesky(
            torch.eye(n_lat, dtype=F64)
            + model.factor_loadings.detach().mT
            @ (model.factor_loadings.detach() / model.noise_variance.detach().unsqueeze(-1))
        )
        # m_step adds mass·M⁻¹ back; the dense sum holds the whole Σ r E[zzᵀ].
        stats.sum_zz = stats.sum_zz + stats.mass.view(-1, 1, 1) * torch.cholesky_inverse(chol)
    for name, value in ref.items():
        torch.testing.assert_close(getattr(stats, name), value, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert stats.log_likelihood.item() == pytest.approx(ref_ll, rel=1e-10)


@pytest.mark.parametrize("noise,n_lat", CASES[:3])
def test_observed_log_likelihood_matches_dense_marginal(noise, n_lat):
    model = random_model(3, 6, n_lat, noise, seed=7)
    x = hide(random_data(30, model, seed=8), 0.5, seed=9)
    x[:5] = random_data(5, model, seed=10)  # some complete rows
    a = model.factor_loadings.detach()
    cov = a @ a.mT + torch.diag_embed(model.noise_variance.detach())  # dense [K, D, D]
    expected = []
    for row in x:
        o = ~torch.isnan(row)
        comps = [torch.log(model.weights[c]) + MultivariateNormal(
            model.means[c, o], cov[c][o][:, o]).log_prob(row[o]) for c in range(3)]
        expected.append(torch.logsumexp(torch.stack(comps).detach(), 0))
    expected = torch.stack(expected)
    got = missing.row_log_prob(model, x).detach()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert missing.evaluate(model, x) == pytest.approx(expected.mean().item(), rel=1e-12)
    # one row [D] gives a scalar and [..., D] keeps its leading shape, NaN or not
    for i in (0, 7):
        one = missing.row_log_prob(model, x[i]).detach()
        assert one.shape == () and one.item() == pytest.approx(expected[i].item(), rel=1e-10)
    torch.testing.assert_close(missing.row_log_prob(model, x[:30].reshape(5, 6, 6)).detach(),
                               expected[:30].reshape(5, 6), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"x must be a tensor \[\.\.\., D\] with D = 6"):
        missing.row_log_prob(model, torch.tensor(1.0, dtype=torch.float64))
    # not a tensor: a TypeError, as log_prob's (it was a ValueError)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor .* got list"):
        missing.row_log_prob(model, [0.0] * 6)


# ---------------------------------------------------------------------- EM behaviour


@pytest.mark.parametrize("noise,n_lat", CASES[:3])
def test_observed_log_likelihood_never_decreases(noise, n_lat):
    truth = random_model(3, 8, n_lat, noise, seed=11)
    x = hide(truth.sample(600, generator=gen(12))[0].detach(), 0.3, seed=13)
    model = MixtureOfFactorAnalyzers(3, 8, n_lat, noise, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = EMTrainer(em_config(max_iter=15, tol=0.0, seed=1))
        trainer.fit(model, x)
    lls = [r["train_log_likelihood"] for r in trainer.history]
    assert len(lls) == 15
    steps = torch.tensor(lls).diff()
    assert bool((steps >= -1e-9).all()), lls
    assert lls[-1] > lls[0] + 0.1  # and it does learn
    # The recorded value is the observed-data log-likelihood of the parameters it scored.
    assert trainer.evaluate(model, trainer_source(model, x)) >= lls[-1] - 1e-9


def test_map_objective_on_incomplete_data_never_decreases():
    """With the default priors (MAP EM, the noise prior chosen on held-out rows) the recorded
    objective, observed-data log-likelihood + log-prior, never decreases under a fixed prior."""
    truth = random_model(3, 8, 2, "diagonal", seed=11)
    x = hide(truth.sample(600, generator=gen(12))[0].detach(), 0.3, seed=13)
    model = MixtureOfFactorAnalyzers(3, 8, 2, "diagonal", dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = EMTrainer(EMConfig(max_iter=15, tol=0.0, seed=1, progress=False,
                                     missing="allow", patience=0))
        trainer.fit(model, x)
    chosen = trainer.history[-1]["noise_prior_variance"]
    objective = [r["train_objective"] for r in trainer.history
                 if r["noise_prior_variance"] == chosen]
    assert len(objective) >= 5
    assert bool((torch.tensor(objective).diff() >= -1e-9).all()), objective


def trainer_source(model, x):
    from mfa._data_stream import DataSource

    return DataSource(x, model, 4096, "data", allow_missing=True)


def fit_em(x, k, n_lat, seed=0, max_iter=60):
    model = MixtureOfFactorAnalyzers(k, x.shape[1], n_lat, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EMTrainer(em_config(max_iter=max_iter, tol=1e-7, seed=seed)).fit(model, x)
    return model


def test_recovers_known_model_as_n_grows_and_beats_mean_imputation():
    truth = random_model(2, 8, 2, "diagonal", seed=14)
    test = truth.sample(4000, generator=gen(15))[0].detach()
    best = truth.log_prob(test).mean().item()
    gaps = {}
    for n in (500, 4000):
        x = truth.sample(n, generator=gen(16))[0].detach()
        x_missing = hide(x, 0.3, seed=17)
        fitted = fit_em(x_missing, 2, 2)
        gaps[n] = best - fitted.log_prob(test).mean().item()
    assert gaps[4000] < gaps[500]
    assert 0 <= gaps[4000] < 0.05, gaps
    imputed = fit_em(missing.impute_column_means(x_missing), 2, 2)
    gap_imputed = best - imputed.log_prob(test).mean().item()
    assert gap_imputed > 5 * gaps[4000], (gap_imputed, gaps)


def test_default_refuses_nan_with_a_hint():
    model = random_model(2, 4, 1, seed=0)
    x = hide(random_data(50, model), 0.2, seed=1)
    with pytest.raises(ValueError, match=r"NaN or inf.*missing='allow'"):
        EMTrainer(EMConfig(progress=False, max_iter=1)).fit(model, x)
    with pytest.raises(ValueError, match=r"validation contains non-finite.*missing='allow'"):
        EMTrainer(EMConfig(progress=False, max_iter=1)).fit(model, x[:, :].nan_to_num(),
                                                            validation=x)
    with pytest.raises(ValueError, match=r"NaN or inf.*missing='allow'"):
        SGDTrainer(SGDConfig(progress=False, epochs=1)).fit(model, x)
    with pytest.raises(ValueError, match=r"EMConfig.missing must be one of"):
        EMConfig(missing="yes").validate()
    with pytest.raises(ValueError, match=r"SGDConfig.missing must be one of"):
        SGDConfig(missing=True).validate()
    inf = x.nan_to_num()
    inf[0, 0] = float("inf")
    # where NaN is allowed, the message names the infinite value (it said "NaN or inf")
    with pytest.raises(ValueError, match=r"data contains an infinite value \(NaN marks a "
                                         r"missing entry.*\): batch 0, row 0, feature 0$"):
        EMTrainer(em_config(max_iter=1)).fit(model, inf)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\): batch 0, row 0"):
        EMTrainer(EMConfig(progress=False, max_iter=1)).fit(model, inf)


def test_em_streams_batches_and_validation_with_missing():
    truth = random_model(2, 6, 1, seed=20)
    x = hide(truth.sample(300, generator=gen(21))[0].detach(), 0.3, seed=22)
    val = hide(truth.sample(100, generator=gen(23))[0].detach(), 0.3, seed=24)
    runs = []
    for batch_size in (300, 37):
        model = MixtureOfFactorAnalyzers(2, 6, 1, dtype=F64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = EMTrainer(em_config(max_iter=4, tol=0.0, batch_size=batch_size))
            trainer.fit(model, x, validation=val)
        runs.append((model, trainer.history))
    (m1, h1), (m2, h2) = runs
    torch.testing.assert_close(m1.means, m2.means, rtol=0, atol=1e-10)
    assert all(r["val_log_likelihood"] is not None for r in h1)
    assert h1[-1]["val_log_likelihood"] == pytest.approx(h2[-1]["val_log_likelihood"], 1e-10)
    assert h1[-1]["val_log_likelihood"] == pytest.approx(missing.evaluate(m1, val), 1e-12)


@pytest.mark.parametrize("trainer", ["em", "adam"])
def test_validation_without_an_observed_entry_is_refused(trainer):
    """Validation rows that are all NaN scored 0.0 nats a row for every model: early stopping
    and the noise prior's search chose on a constant, silently."""
    x = random_data(300, random_model(2, 5, 1, seed=0), seed=1)
    validation = torch.full((50, 5), float("nan"), dtype=F64)
    fit = (EMTrainer(EMConfig(missing="allow", progress=False, max_iter=3)) if trainer == "em"
           else SGDTrainer(SGDConfig(missing="allow", progress=False, epochs=2)))
    with pytest.raises(ValueError, match="validation has no observed entry: all of its 50 "
                                         "rows are NaN"):
        fit.fit(MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64), x, validation)
    validation[0, 0] = 0.5  # one observed entry is a score
    fit.fit(MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64), x, validation)


@pytest.mark.parametrize("trainer", ["em", "adam"])
def test_training_data_without_an_observed_entry_is_refused(trainer):
    """All-NaN training rows 'converged' at log-likelihood 0.0, with no warning, returning
    whatever the initialisation made of nothing."""
    x = torch.full((40, 5), float("nan"), dtype=F64)
    fit = (EMTrainer(em_config(max_iter=3)) if trainer == "em"
           else SGDTrainer(SGDConfig(missing="allow", progress=False, epochs=2)))
    with pytest.raises(ValueError, match="data has no observed entry: all of its 40 rows"):
        fit.fit(MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64), x, x[:10] * 0 + 0.5)


@pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")
def test_a_feature_missing_in_every_training_row_is_named():
    """EM cannot move a feature no row observes: it stayed at its initial noise variance (the
    floor), and a later row observing it scored ~-1e5 nats, without a word."""
    x = random_data(200, random_model(2, 5, 1, seed=0), seed=1)
    x[:, 2] = float("nan")
    with pytest.warns(UserWarning, match=r"1 feature\(s\) of data are missing \(NaN\) in "
                                         r"every row, e\.g\. \[2\]: EM cannot learn them \(only "
                                         r"the initialisation and the priors"):
        EMTrainer(em_config(max_iter=2)).fit(MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64), x)
    x[0, 2] = 0.5  # one observation is enough to learn from
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing \\(NaN\\) in every row")
        EMTrainer(em_config(max_iter=2)).fit(MixtureOfFactorAnalyzers(2, 5, 1, dtype=F64), x)


def test_row_log_prob_names_the_infinite_entry_in_x():
    """The error indexed the subset of incomplete (or complete) rows, not x."""
    model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    x = torch.zeros(5, 4, dtype=F64)
    x[0, 0] = x[1, 0] = x[4, 1] = float("nan")
    x[4, 3] = float("inf")
    with pytest.raises(ValueError, match=r"the first is inf at index \(4, 3\)"):
        missing.row_log_prob(model, x)
    x[4, 3], x[3, 2] = 0.0, -float("inf")  # in a complete row
    with pytest.raises(ValueError, match=r"1 infinite value\(s\); the first is -inf at "
                                         r"index \(3, 2\)"):
        missing.row_log_prob(model, x)


def test_row_log_prob_names_the_shape_of_x():
    """A row width unlike the model's was reported with the shape of the subset of incomplete
    rows (``(1, 4)`` for x of shape ``(4, 4)``)."""
    model = MixtureOfFactorAnalyzers(2, 5, 2, dtype=F64)
    x = torch.zeros(4, 4, dtype=F64)
    x[0, 1] = float("nan")
    for bad in (x, x.nan_to_num(), x.reshape(2, 2, 4)):
        with pytest.raises(ValueError, match=rf"D = 5, got {re.escape(str(tuple(bad.shape)))}"):
            missing.row_log_prob(model, bad)


def test_float32_model_with_missing_data():
    truth = random_model(2, 6, 2, seed=25)
    x = hide(truth.sample(400, generator=gen(26))[0].detach(), 0.3, seed=27).float()
    model = MixtureOfFactorAnalyzers(2, 6, 2)
    for stats_dtype in ("float64", "float32"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = EMTrainer(em_config(max_iter=5, tol=0.0, stats_dtype=stats_dtype))
            trainer.fit(model, x)
        lls = torch.tensor([r["train_log_likelihood"] for r in trainer.history])
        assert bool(torch.isfinite(lls).all())
        assert bool((lls.diff() > -1e-3).all()), lls


@pytest.mark.parametrize("stats_dtype", ["auto", "precise", "float64"])
def test_float32_model_near_quantisation_noise_keeps_em_monotone(stats_dtype):
    """Pixel-like rows with noise variances near the quantisation level, 30 % hidden, a
    float32 model: scored exactly (a float64 copy of each iterate's parameters), EM never
    lowers the observed-data log-likelihood and records it to 1e-3 nats a row. Before, the
    incomplete rows' E-step ignored the precision mode: 12 of 30 iterations lowered it and
    the recorded value was 30 nats a row off."""
    g = gen(0)
    k, d, n_lat, n = 2, 20, 2, 500
    mu = 0.5 + 0.2 * torch.randn(k, d, generator=g, dtype=F64)
    a = 0.3 * torch.randn(k, d, n_lat, generator=g, dtype=F64)
    noise = torch.full((k, d), 1e-6, dtype=F64)
    comp = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, n_lat, generator=g, dtype=F64)
    rows = (mu[comp] + (a[comp] @ z.unsqueeze(-1)).squeeze(-1)
            + torch.randn(n, d, generator=g, dtype=F64) * noise[comp].sqrt())
    x = rows.float()
    x[torch.rand(n, d, generator=g) < 0.3] = float("nan")

    def exact(model):  # the observed-data log-likelihood of a float64 copy, per row
        copy64 = MixtureOfFactorAnalyzers.from_parameters(
            *(t.detach().double() for t in (model.weights, model.means,
                                            model.factor_loadings, model.noise_variance)))
        return missing.row_log_prob(copy64, x.double()).mean().item()

    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), mu.float(), a.float(), 3 * noise.float(), min_noise=1e-9)
    scores = [exact(model)]
    trainer = EMTrainer(em_config(max_iter=20, tol=0.0, patience=0, noise_prior_strength=0.0,
                                  init="none", variance_floor=1e-9, stats_dtype=stats_dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # (tol=0: runs max_iter)
        trainer.fit(model, x, callbacks=[lambda t, m, r: scores.append(exact(m))])
    assert float(torch.tensor(scores).diff().min()) > -1e-5, scores
    recorded = [r["train_log_likelihood"] for r in trainer.history]
    assert max(abs(r - s) for r, s in zip(recorded, scores[:-1], strict=True)) < 1e-3


def test_adam_trains_on_rows_with_nan():
    truth = random_model(2, 6, 1, seed=30)
    x = hide(truth.sample(400, generator=gen(31))[0].detach(), 0.3, seed=32)
    model = MixtureOfFactorAnalyzers(2, 6, 1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SGDTrainer(SGDConfig(progress=False, epochs=3, lr=1e-2, missing="allow",
                                       init="random"))
        trainer.fit(model, x)
    history = trainer.history
    assert all(torch.isfinite(torch.tensor(r["val_log_likelihood"])) for r in history)
    assert history[-1]["train_log_likelihood"] > history[0]["train_log_likelihood"]
    # The gradient is that of the observed-data likelihood (finite, and zero for a row whose
    # only observed entry is feature 0 with respect to the other features' means).
    model.zero_grad()
    row = torch.full((1, 6), float("nan"), dtype=F64)
    row[0, 0] = 0.5
    missing.row_log_prob(model, row).sum().backward()
    assert bool(torch.isfinite(model.loc.grad).all())
    assert bool((model.loc.grad[:, 1:] == 0).all())
    assert bool((model.loc.grad[:, 0] != 0).any())


def test_impute_column_means():
    x = torch.tensor([[1.0, float("nan"), float("nan")], [3.0, 4.0, float("nan")]])
    out = missing.impute_column_means(x)
    torch.testing.assert_close(out, torch.tensor([[1.0, 4.0, 8 / 3], [3.0, 4.0, 8 / 3]]))


# ---------------------------------------------------------------------- config and workflow


def test_missing_mask_kinds_are_seeded():
    from mfa.masks import missing_mask

    shape = (1, 28, 28)
    a = missing_mask("random", shape, 5, gen(3), rate=0.25)
    b = missing_mask("random", shape, 5, gen(3), rate=0.25)
    assert torch.equal(a, b)
    assert (~a).sum(1).tolist() == [196] * 5  # exactly a quarter of each image
    assert not torch.equal(a, missing_mask("random", shape, 5, gen(4), rate=0.25))
    block = missing_mask("block", shape, 50, gen(5), block_size=14)
    assert torch.equal(block, missing_mask("block", shape, 50, gen(5), block_size=14))
    hidden = (~block).view(50, 28, 28)
    assert hidden.sum((1, 2)).tolist() == [196] * 50
    rows, cols = hidden.any(2), hidden.any(1)  # the hidden pixels form one 14 × 14 square
    assert rows.sum(1).tolist() == [14] * 50 and cols.sum(1).tolist() == [14] * 50
    assert len({tuple(r.nonzero()[0].tolist()) for r in rows}) > 1  # not always the same place
    assert bool(missing_mask("none", shape, 2, gen(0)).all())
    with pytest.raises(ValueError, match="kind must be one of"):
        missing_mask("center", shape, 2, gen(0))
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        missing_mask("block", shape, 2, gen(0), block_size=0)
    with pytest.raises(ValueError, match="hides the whole 28×28 image"):
        missing_mask("block", shape, 2, gen(0), block_size=28)
    for bad in (-1, 2.5, True):  # (torch's "negative dimension" / randint signature errors)
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            missing_mask("block", shape, bad, gen(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got NoneType"):
        missing_mask("block", shape, 2, None)  # (drew from the unseeded global generator)
    with pytest.raises(ValueError, match="rate must be in"):  # (its error named `fraction`)
        missing_mask("random", shape, 2, gen(0), rate=1.5)
    # every pixel missing: refused, as a block covering the image is (and as the config does)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\) .* got 1.0: every pixel"):
        missing_mask("random", shape, 2, gen(0), rate=1.0)
    # a rate below 1 that rounds to every pixel of a small image is refused too
    with pytest.raises(ValueError, match=r"fewer than all 4 pixels of an image, got 0.9"):
        missing_mask("random", (1, 2, 2), 3, gen(0), rate=0.9)
    assert missing_mask("random", (1, 2, 2), 3, gen(0), rate=0.8).sum(1).tolist() == [1, 1, 1]
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="rate must be a real number"):
            missing_mask("random", shape, 2, gen(0), rate=bad)


def test_config_missing_section_checks_its_keys():
    from mfa.config import config_from_dict

    config = config_from_dict({"data": {"missing": {"kind": "block", "block_size": 7}}})
    assert config.data.missing.kind == "block" and config.data.missing.block_size == 7
    assert "missing" not in config.data.load_kwargs()
    with pytest.raises(ValueError, match=r"data\.missing\.kind"):
        config_from_dict({"data": {"missing": {"kind": "holes"}}})
    with pytest.raises(ValueError, match=r"data\.missing\.rate"):
        config_from_dict({"data": {"missing": {"rate": 1.5}}})
    with pytest.raises(ValueError, match=r"data\.missing\.block_size"):
        config_from_dict({"data": {"missing": {"block_size": 0}}})
    with pytest.raises(ValueError, match=r"data\.missing\.colour"):
        config_from_dict({"data": {"missing": {"colour": 1}}})
    with pytest.raises(ValueError, match=r"train\.em\.missing"):
        config_from_dict({"train": {"em": {"missing": "sometimes"}}})


@pytest.mark.parametrize("method", ["em", "sgd"])
def test_workflow_trains_on_images_with_pixels_removed(tmp_path, method):
    from pathlib import Path

    from mfa import workflow
    from mfa.config import load_config

    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml",
        ["model.n_components=2", "model.n_factors=2", "train.em.max_iter=3",
         "train.em.kmeans_iter=3", "train.em.progress=false", "train.sgd.epochs=1",
         "train.sgd.kmeans_iter=3", "train.sgd.progress=false", "data.limit=200",
         "data.dequantize=false", "output.n_samples=4", "output.n_inpaint=3",
         "output.inpaint_samples=1", "output.inpaint_masks=[center]",
         "output.n_factor_components=0", "output.plot=false", "device=cpu",
         f"train.method={method}", "data.missing.kind=random", "data.missing.rate=0.5",
         f"output.dir={tmp_path}", "output.name=run"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = workflow.train(config)
    assert (result.run_dir / "inpaint-train-missing.png").is_file()
    assert bool(torch.isfinite(result.model.means).all())
    data = workflow.load_data(config)
    observed = workflow.missing_masks(config, data, "train")
    assert observed.shape == data.train_pixels.shape
    assert (~observed).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(observed, workflow.missing_masks(config, data, "train"))
    assert not torch.equal(observed[: data.val_pixels.shape[0]],
                           workflow.missing_masks(config, data, "val"))
    if method == "em":  # the recorded likelihood is the observed-data one of the masked rows
        # ... and its MAP objective never drops while the prior stays (the search moves s₀)
        history = json.loads((result.run_dir / "history.json").read_text())
        pairs = [(a["train_objective"], b["train_objective"])
                 for a, b in zip(history, history[1:], strict=False)
                 if a["noise_prior_variance"] == b["noise_prior_variance"]]
        assert pairs and all(b >= a - 1e-6 * abs(a) for a, b in pairs), history


def test_batch_statistics_refuses_fixed_or_tempered_responsibilities_with_missing_rows():
    """resp [n, K] went to the complete rows unsubset (they took the first rows' resp) while
    the incomplete rows used the posterior, and a temperature tempered only the complete
    rows: a silent wrong answer; now refused, naming the option. Complete batches take both."""
    model = random_model(2, 5, 1, seed=3)
    x = random_data(6, model, seed=4)
    terms = model.component_terms()
    resp = torch.zeros(6, 2, dtype=F64)
    resp[:, 1] = 1.0
    stats = missing.batch_statistics(model, x, terms, resp=resp)  # complete: as before
    assert torch.allclose(stats.mass, torch.tensor([0.0, 6.0], dtype=F64))
    tempered = missing.batch_statistics(model, x, terms, temperature=5.0)
    assert torch.equal(tempered.mass, accumulate_statistics(model, x, terms,
                                                            temperature=5.0).mass)
    x[[0, 3], 2] = float("nan")
    with pytest.raises(ValueError, match=r"resp cannot be applied to the 2 row\(s\) with "
                                         r"missing entries"):
        missing.batch_statistics(model, x, terms, resp=resp)
    with pytest.raises(ValueError, match=r"temperature=5.0 cannot be applied"):
        missing.batch_statistics(model, x, terms, temperature=5.0)
    missing.batch_statistics(model, x, terms, temperature=1.0)  # (the default: fine)
