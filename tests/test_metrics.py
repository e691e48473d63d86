"""Tests of mfa.metrics: bits per dimension, likelihood streaming, model selection (parameter
counts, BIC/AIC, select_model). NDB: tests/test_ndb.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch.utils.data import DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers
from mfa.data import QuantizedRows
from mfa.metrics import (
    aic,
    bic,
    bits_per_dim,
    mean_log_likelihood,
    n_parameters,
    select_model,
    total_log_likelihood,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ====================================================================== likelihoods


def test_bits_per_dim_uniform_and_hand_example():
    # Uniform density on [0, 1]^D: log p = 0, i.e. 8 bits per dimension for 8-bit data.
    assert bits_per_dim(0.0, 784) == pytest.approx(8.0)
    assert bits_per_dim(0.0, 3, scale=2) == pytest.approx(1.0)
    # D = 2, log p = 3 nats: −(3 − 2 ln 256) / (2 ln 2) = 8 − 3 / (2 ln 2).
    assert bits_per_dim(3.0, 2) == pytest.approx(8 - 3 / (2 * math.log(2)))
    assert bits_per_dim(3.0, 2) == pytest.approx(5.835957, abs=1e-6)
    # On the pixel scale itself (scale = 1) it is just −log₂ p / D.
    assert bits_per_dim(-4 * math.log(2), 2, scale=1) == pytest.approx(2.0)
    ll = torch.tensor([[0.0, 3.0], [-1.0, 10.0]], dtype=torch.float64)
    out = bits_per_dim(ll, 2)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)
    assert out[0, 1].item() == pytest.approx(bits_per_dim(3.0, 2))


def test_bits_per_dim_equals_discrete_log_probability_for_a_piecewise_density():
    # A density on [0, 1) that is constant on each of the 256 pixel cells: the dequantised
    # log-likelihood then equals the discrete log-probability exactly.
    g = gen(3)
    probs = torch.rand(256, generator=g, dtype=torch.float64)
    probs /= probs.sum()
    pixels = torch.randint(0, 256, (1000,), generator=g)
    density = probs * 256  # p_x on each cell of width 1/256
    log_px = density[pixels].log()  # D = 1
    expected = -(probs[pixels].log() / math.log(2)).mean().item()
    assert bits_per_dim(log_px.mean().item(), 1) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def small_model():
    return MixtureOfFactorAnalyzers(3, 4, 2, generator=gen(0))


def test_mean_log_likelihood_streams_tensors_and_loaders(small_model):
    x, comp = small_model.sample(1_000, generator=gen(1))
    with torch.no_grad():
        ref = small_model.log_prob(x).double().mean().item()
    assert mean_log_likelihood(small_model, x) == pytest.approx(ref, rel=1e-6)
    assert mean_log_likelihood(small_model, x, batch_size=7) == pytest.approx(ref, rel=1e-6)
    loader = DataLoader(TensorDataset(x, comp), batch_size=33)  # yields (x, label)
    assert mean_log_likelihood(small_model, loader) == pytest.approx(ref, rel=1e-6)
    loader = DataLoader(TensorDataset(x), batch_size=100)  # yields [x]
    assert mean_log_likelihood(small_model, loader) == pytest.approx(ref, rel=1e-6)
    total, n = total_log_likelihood(small_model, x.double(), batch_size=64)  # cast to float32
    assert n == 1_000 and total == pytest.approx(1_000 * ref, rel=1e-6)


def test_likelihood_metrics_take_quantized_rows():
    pixels = torch.randint(0, 256, (300, 12), dtype=torch.uint8, generator=gen(3))
    rows = QuantizedRows(pixels, dequantize=True, seed=5)
    model = MixtureOfFactorAnalyzers(3, 12, 2).double()
    floats = rows.to(dtype=torch.float64)[0:300]  # the same rows, made float at once
    with torch.no_grad():
        ref = model.log_prob(floats).double().mean().item()
    assert mean_log_likelihood(model, rows, batch_size=7) == pytest.approx(ref, rel=1e-12)
    assert bic(model, rows) == pytest.approx(bic(model, floats), rel=1e-12)
    assert aic(model, rows) == pytest.approx(aic(model, floats), rel=1e-12)


def test_likelihood_metrics_flatten_images_as_the_trainers_do():
    """The trainers take images (a tensor [N, 1, H, W], a loader of such batches) and flatten
    them; the metrics refused the tensor ("data must have shape [N, D]") and passed the
    batches to log_prob unflattened ("x must have shape [..., 12]")."""
    model = MixtureOfFactorAnalyzers(3, 12, 2, generator=gen(4)).double()
    x, comp = model.sample(200, generator=gen(5))
    with torch.no_grad():
        ref = model.log_prob(x).sum().item()  # the flat rows, scored by the model directly
    images = x.view(200, 1, 3, 4)
    loader = DataLoader(TensorDataset(images, comp), batch_size=33)
    p = n_parameters(3, 12, 2)
    for data in (images, loader):
        total, n = total_log_likelihood(model, data, batch_size=17)
        assert n == 200 and total == pytest.approx(ref, rel=1e-12)
        assert mean_log_likelihood(model, data) == pytest.approx(ref / 200, rel=1e-12)
        assert bic(model, data) == pytest.approx(-2 * ref + p * math.log(200), rel=1e-12)
        assert aic(model, data) == pytest.approx(-2 * ref + 2 * p, rel=1e-12)
    row = select_model(images, [(3, 2)], lambda k, lat: model, validation=loader).best
    assert row["log_lik"] == pytest.approx(ref, rel=1e-12)
    assert row["val_log_lik"] == pytest.approx(ref / 200, rel=1e-12)
    with pytest.raises(ValueError, match=r"data must have 12 features per row .*\(5, 1, 4, 4\)"):
        mean_log_likelihood(model, torch.zeros(5, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"data batch 0 must have 12 features per row"):
        mean_log_likelihood(model, [torch.zeros(5, 1, 4, 4, dtype=torch.float64)])


def test_mean_log_likelihood_errors(small_model):
    with pytest.raises(ValueError, match="data is empty"):
        mean_log_likelihood(small_model, torch.zeros(0, 4))
    with pytest.raises(TypeError, match="data must be a tensor or an iterable"):
        mean_log_likelihood(small_model, 3)
    with pytest.raises(TypeError, match="data must yield tensors"):
        mean_log_likelihood(small_model, [np.zeros((2, 4))])
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., 4\]"):
        mean_log_likelihood(small_model, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="n_dims must be >= 1"):
        bits_per_dim(0.0, 0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        bits_per_dim(0.0, 2, scale=0)


# ====================================================================== model selection


def test_n_parameters_hand_counts():
    # K=2, D=10, L=3, diagonal: mean 10 + loadings 30 − 3 (rotation) + noise 10 = 47 a
    # component, below a full covariance's 55; 2·47 + 1 = 95.
    assert n_parameters(2, 10, 3) == 95
    # Isotropic K=3, D=4, L=2: 4 + (8 − 1) + 1 = 12 a component (covariance 8 ≤ 10); 38.
    assert n_parameters(3, 4, 2, "isotropic") == 38
    # Where (D−L)² < D+L the loadings-and-noise count exceeds a full covariance's D(D+1)/2
    # (the Ledermann bound): the covariance counts D(D+1)/2. K=1, D=2, L=1: 2 + 3 = 5 (not 6).
    assert n_parameters(1, 2, 1) == 5
    # K=3, D=4, L=2, diagonal: (8 − 1) + 4 = 11 > 10: 3·(4 + 10) + 2 = 44 (not 47).
    assert n_parameters(3, 4, 2, "diagonal") == 44
    # K=2, D=5, L=3: 12 + 5 = 17 > 15: 2·20 + 1 = 41; L = D = 3: a full Gaussian's 3 + 6.
    assert n_parameters(2, 5, 3) == 41
    assert n_parameters(1, 3, 3) == 9
    assert n_parameters(1, 6, 6) == n_parameters(1, 6, 5) == 6 + 21
    # L=0: a diagonal GMM has K·2D + K − 1, a spherical one K·(D + 1) + K − 1.
    assert n_parameters(4, 10, 0) == 4 * 20 + 3
    assert n_parameters(4, 10, 0, "isotropic") == 4 * 11 + 3
    model = MixtureOfFactorAnalyzers(3, 4, 2, "isotropic", generator=gen(0))
    assert n_parameters(model) == 38


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("k, d", [(1, 1), (1, 3), (2, 2), (3, 5), (5, 4)])
def test_n_parameters_matches_sklearn_for_l0(k, d):
    x = np.random.default_rng(k * 10 + d).normal(size=(60, d))
    for cov_type, noise in (("diag", "diagonal"), ("spherical", "isotropic")):
        gm = GaussianMixture(k, covariance_type=cov_type, max_iter=2, random_state=0).fit(x)
        assert n_parameters(k, d, 0, noise) == gm._n_parameters(), (cov_type, k, d)


def test_n_parameters_errors():
    with pytest.raises(ValueError, match=r"n_factors must be <= n_features \(2\)"):
        n_parameters(1, 2, 3)
    with pytest.raises(ValueError, match="noise must be 'diagonal' or 'isotropic'"):
        n_parameters(1, 2, 1, "full")
    with pytest.raises(TypeError, match="needs n_features and n_factors"):
        n_parameters(2)
    with pytest.raises(TypeError, match="takes a model"):
        n_parameters("model")


def _mfa_from_sklearn(gm: GaussianMixture) -> MixtureOfFactorAnalyzers:
    """A diagonal GaussianMixture as an MFA with L = 0 (float64)."""
    weights = torch.tensor(gm.weights_, dtype=torch.float64)
    means = torch.tensor(gm.means_, dtype=torch.float64)
    variances = torch.tensor(gm.covariances_, dtype=torch.float64)
    loadings = means.new_zeros(*means.shape, 0)
    return MixtureOfFactorAnalyzers.from_parameters(weights / weights.sum(), means, loadings,
                                                    variances)


@pytest.fixture(scope="module")
def separated_data():
    """Four well-separated diagonal clusters in 5-D: train, validation (float64 numpy)."""
    rng = np.random.default_rng(0)
    means = np.array([[0, 0, 0, 0, 0], [10, 0, 0, 0, 0], [0, 10, 0, 0, 0], [0, 0, 10, 0, 0]],
                     dtype=float)
    scales = rng.uniform(0.5, 1.5, size=(4, 5))

    def draw(n):
        labels = rng.integers(0, 4, n)
        return means[labels] + scales[labels] * rng.normal(size=(n, 5))

    return draw(1_500), draw(500)


def test_bic_aic_match_sklearn(separated_data):
    train, _ = separated_data
    gm = GaussianMixture(3, covariance_type="diag", random_state=0).fit(train)
    model = _mfa_from_sklearn(gm)
    x = torch.tensor(train)
    assert bic(model, x) == pytest.approx(gm.bic(train), rel=1e-9)
    assert aic(model, x) == pytest.approx(gm.aic(train), rel=1e-9)
    loader = DataLoader(TensorDataset(x), batch_size=128)
    assert bic(model, loader) == pytest.approx(gm.bic(train), rel=1e-9)


def test_select_model_bic_picks_the_true_number_of_components(separated_data):
    train, validation = separated_data
    fitted = []
    cache = {}

    def fit_fn(k, lat):
        fitted.append((k, lat))
        if (k, lat) not in cache:
            gm = GaussianMixture(k, covariance_type="diag", random_state=0, n_init=2).fit(train)
            cache[k, lat] = _mfa_from_sklearn(gm)
        return cache[k, lat]

    candidates = [(k, 0) for k in range(1, 8)]
    x_train, x_val = torch.tensor(train), torch.tensor(validation)
    result = select_model(x_train, candidates, fit_fn, criterion="bic", validation=x_val)
    assert fitted == candidates  # each candidate fitted once, in order
    assert result.best["K"] == 4 and result.best["L"] == 0
    assert result.best is result.rows[0]
    assert result.best_model.n_components == 4
    assert len(result.rows) == 7
    bics = [r["bic"] for r in result.rows]
    assert bics == sorted(bics)
    row = result.best
    assert set(row) == {"K", "L", "requested", "noise", "n_params", "log_lik", "mean_log_lik",
                        "bic", "aic", "val_log_lik"}
    assert row["requested"] == (4, 0)
    assert row["n_params"] == n_parameters(4, 5, 0) == 4 * 10 + 3
    n = len(train)
    assert row["bic"] == pytest.approx(-2 * row["log_lik"] + row["n_params"] * math.log(n))
    assert row["aic"] == pytest.approx(-2 * row["log_lik"] + 2 * row["n_params"])
    assert row["mean_log_lik"] == pytest.approx(row["log_lik"] / n)
    assert row["val_log_lik"] == pytest.approx(mean_log_likelihood(result.best_model, x_val))
    assert "bic" in result.table().splitlines()[0]

    by_val = select_model(x_train, candidates[:5], fit_fn, criterion="val_log_lik",
                          validation=x_val)
    vals = [r["val_log_lik"] for r in by_val.rows]
    assert vals == sorted(vals, reverse=True)
    assert by_val.best["K"] >= 4
    by_aic = select_model(x_train, candidates[:5], fit_fn, criterion="aic")
    assert [r["aic"] for r in by_aic.rows] == sorted(r["aic"] for r in by_aic.rows)
    assert by_aic.best["val_log_lik"] is None


def test_select_model_errors(separated_data):
    x = torch.tensor(separated_data[0])

    def fit_fn(k, lat):
        return MixtureOfFactorAnalyzers(k, 5, lat, dtype=torch.float64)

    with pytest.raises(ValueError, match="criterion must be one of"):
        select_model(x, [(1, 0)], fit_fn, criterion="likelihood")
    with pytest.raises(ValueError, match="needs validation data"):
        select_model(x, [(1, 0)], fit_fn, criterion="val_log_lik")
    with pytest.raises(ValueError, match="candidates must not be empty"):
        select_model(x, [], fit_fn)
    with pytest.raises(ValueError, match=r"must be a \(K, L\) pair"):
        select_model(x, [3], fit_fn)
    with pytest.raises(TypeError, match="fit_fn must be callable"):
        select_model(x, [(1, 0)], None)
    # A one-shot iterator is read once a candidate: refused before any fit (it failed with
    # "data is empty" after fitting every candidate).
    fitted = []

    def counting_fit(k, lat):
        fitted.append((k, lat))
        return fit_fn(k, lat)

    for kwargs in ({"train": iter([x])}, {"train": x, "validation": (b for b in [x])}):
        with pytest.raises(TypeError, match="one-shot iterator"):
            select_model(kwargs.pop("train"), [(1, 0), (2, 1)], counting_fit, **kwargs)
    assert fitted == []
    # A tensor with more than two dimensions is flattened to rows (its rows were counted as
    # N·M): rows of another D than the model's are refused.
    model = fit_fn(1, 0)
    with pytest.raises(ValueError, match=r"data must have 5 features per row .*\(10, 3, 5\)"):
        total_log_likelihood(model, torch.zeros(10, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"data must have 5 features per row"):
        bic(model, torch.zeros(10, 3, 5, dtype=torch.float64))
    # Unfitted models with factors are fine as long as fit_fn returns something usable.
    result = select_model(x, [(1, 1), (2, 2)], fit_fn)
    assert {(r["K"], r["L"]) for r in result.rows} == {(1, 1), (2, 2)}


def test_bits_per_dim_takes_numbers_tensors_and_arrays_only():
    """True was read as 1.0 and "1.5" parsed, silently; a numpy array failed inside float()
    ("only 0-dimensional arrays can be converted"). Arrays now go as tensors."""
    for bad in (True, "1.5", None):
        with pytest.raises(TypeError, match=r"log_likelihood must be a number or a tensor"):
            bits_per_dim(bad, 2)
    expected = bits_per_dim(torch.tensor([1.0, 2.0], dtype=torch.float64), 2)
    torch.testing.assert_close(bits_per_dim(np.array([1.0, 2.0]), 2), expected)
    assert bits_per_dim(np.float64(1.0), 2) == pytest.approx(float(expected[0]))


def test_bits_per_dim_of_a_0d_array_is_a_number():
    """A 0-d numpy array (log p of one row) was refused by the check above when it came."""
    assert bits_per_dim(np.array(-100.0), 10) == pytest.approx(bits_per_dim(-100.0, 10))
