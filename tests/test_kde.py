"""Gaussian kernel density estimates (``mfa.kde``) against a hand-written float64 KDE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import F64, dense_kde_log_prob, gen

from mfa import scott_bandwidth, select_kde_bandwidth
from mfa.kde import kde


def test_kde_equals_hand_written_kde():
    data = torch.randn(40, 3, generator=gen(40), dtype=F64)
    x = torch.randn(25, 3, generator=gen(41), dtype=F64) * 1.5
    model = kde(data, bandwidth=0.6)
    assert (model.n_components, model.n_features, model.n_factors) == (40, 3, 0)
    assert model.noise == "isotropic"
    torch.testing.assert_close(model.means, data, rtol=0, atol=0)
    torch.testing.assert_close(model.weights, torch.full((40,), 1 / 40, dtype=F64))
    torch.testing.assert_close(model.noise_variance, torch.full((40, 3), 0.36, dtype=F64))
    torch.testing.assert_close(
        model.log_prob(x), dense_kde_log_prob(x, data, 0.6), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("d", [1, 3])
def test_kde_default_bandwidth_is_scotts_rule(d):
    g = gen(42)
    data = torch.randn(50, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)
    arr = data.numpy()
    # Docstring: σ = s · N^(−1/(D+4)), s the mean per-feature standard deviation.
    s = float(np.mean(np.std(arr, axis=0, ddof=1)))
    expected = s * 50 ** (-1.0 / (d + 4))
    assert scott_bandwidth(data) == pytest.approx(expected, rel=1e-12)
    model = kde(data)
    torch.testing.assert_close(
        model.noise_variance, torch.full((50, d), expected**2, dtype=F64), rtol=1e-12, atol=0
    )
    x = torch.randn(10, d, generator=g, dtype=F64)
    torch.testing.assert_close(
        model.log_prob(x), dense_kde_log_prob(x, data, expected), rtol=1e-10, atol=1e-10
    )


def test_select_kde_bandwidth_picks_the_best_held_out_candidate():
    g = gen(43)
    train = torch.randn(60, 2, generator=g, dtype=F64)
    val = torch.randn(40, 2, generator=g, dtype=F64)
    candidates = [0.05, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0, 2.0]
    best, scores = select_kde_bandwidth(train, val, candidates)
    brute = [dense_kde_log_prob(val, train, c).mean().item() for c in candidates]
    torch.testing.assert_close(scores, torch.tensor(brute, dtype=F64), rtol=1e-10, atol=1e-10)
    assert best == candidates[int(np.argmax(brute))]
    assert candidates[0] < best < candidates[-1]  # a real interior maximum, not an edge

    # Default candidates: 25 log-spaced values from Scott/100 to 2·Scott.
    best_default, scores_default = select_kde_bandwidth(train, val)
    assert scores_default.shape == (25,)
    scott = scott_bandwidth(train)
    grid = np.logspace(np.log10(scott / 100), np.log10(2 * scott), 25)
    brute = [dense_kde_log_prob(val, train, float(c)).mean().item() for c in grid]
    assert best_default == pytest.approx(float(grid[int(np.argmax(brute))]), rel=1e-5)


def test_kde_validation():
    data = torch.randn(5, 2, generator=gen(54), dtype=F64)
    with pytest.raises(ValueError, match=r"bandwidth must be a finite float > 0, got 0\.0"):
        kde(data, bandwidth=0.0)
    with pytest.raises(ValueError, match=r"bandwidth must be a finite float > 0, got nan"):
        kde(data, bandwidth=float("nan"))
    with pytest.raises(ValueError, match=r"data must have shape \[N, D\] with N >= 1, got \(5,\)"):
        kde(data[:, 0])
    with pytest.raises(TypeError, match=r"data must be floating point, got torch\.int64"):
        kde(data.long())
    with pytest.raises(ValueError, match=r"candidates must not be empty"):
        select_kde_bandwidth(data, data, [])


def test_bandwidth_selection_checks_its_rows():
    """An empty validation set returned the first candidate with NaN scores; 1-D or integer
    rows failed inside Scott's rule with raw errors."""
    x = torch.randn(40, 3, generator=gen(1), dtype=F64)
    v = torch.randn(10, 3, generator=gen(2), dtype=F64)
    with pytest.raises(ValueError, match=r"validation must have shape \[N, D\] with N >= 1"):
        select_kde_bandwidth(x, v[:0], [0.5, 1.0])
    with pytest.raises(ValueError, match=r"train must have shape \[N, D\] with N >= 1"):
        select_kde_bandwidth(x[:, 0], v[:, 0])
    with pytest.raises(TypeError, match="train must be floating point"):
        select_kde_bandwidth(x.long(), v)
    with pytest.raises(ValueError, match="validation has 2 features, the kernel centres 3"):
        select_kde_bandwidth(x, v[:, :2], [0.5])
    with pytest.raises(ValueError, match=r"data must have shape \[N, D\]"):
        scott_bandwidth(x[:, 0])


def test_bandwidth_is_a_real_number_whose_square_the_dtype_holds():
    """``True`` passed as 1.0 (bool is an int); a bandwidth whose square overflows or
    underflows the data's dtype failed later with messages that never named the bandwidth
    (on the default Scott path too, for data of tiny or huge scale)."""
    data = torch.randn(50, 3, generator=gen(0))  # float32
    with pytest.raises(ValueError, match=r"bandwidth must be a finite float > 0, got True"):
        kde(data, bandwidth=True)
    for bandwidth in (1e20, 1e-23):
        with pytest.raises(ValueError, match=r"bandwidth .*square.*outside the range of "
                                             r"torch\.float32"):
            kde(data, bandwidth)
    for scale in (1e20, 1e-22):  # Scott's rule picks the bandwidth
        with pytest.raises(ValueError, match=r"bandwidth .*rescale the data or use float64"):
            kde(data * scale)
    # the same bandwidth is fine in float64, and the kernels' variance is its square
    model = kde(data.double(), 1e-23)
    assert model.noise_variance.detach()[0, 0].item() == pytest.approx(1e-46)


def test_bandwidth_selection_names_bad_candidates_and_dtypes():
    x = torch.randn(40, 3, generator=gen(1))
    v = torch.randn(10, 3, generator=gen(2))
    with pytest.raises(ValueError, match=r"candidates must be a 1-D tensor .* shape \(1, 2\)"):
        select_kde_bandwidth(x, v, torch.tensor([[0.3, 0.5]]))
    with pytest.raises(ValueError, match=r"candidates must be a sequence of floats"):
        select_kde_bandwidth(x, v, ["wide"])
    for text in ("0.5", "25"):  # ("25" ran as the bandwidths 2 and 5)
        with pytest.raises(TypeError, match=rf"candidates must be a sequence of floats, got "
                                            rf"the string '{text}'"):
            select_kde_bandwidth(x, v, text)
    with pytest.raises(TypeError, match=r"validation has dtype torch\.float64 but train"):
        select_kde_bandwidth(x, v.double(), [0.5])
    best, scores = select_kde_bandwidth(x, v, torch.tensor([0.5, 1.0]))  # a 1-D tensor works
    assert best in (0.5, 1.0) and scores.shape == (2,)
