"""mfa.pruning: removal gains against models rebuilt without the components (float64), the
greedy harmful set on a planted case, and the seeded re-seeding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, gen, random_data, random_model
from torch.utils.data import DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers
from mfa.pruning import (
    harmful_components,
    removal_gains,
    reseed_components,
    validation_log_joint,
)


def _without(model: MixtureOfFactorAnalyzers, keep: torch.Tensor) -> MixtureOfFactorAnalyzers:
    """The same mixture rebuilt from the kept components, weights renormalised."""
    w = model.weights.detach()[keep]
    return MixtureOfFactorAnalyzers.from_parameters(
        w / w.sum(), model.means.detach()[keep], model.factor_loadings.detach()[keep],
        model.noise_variance.detach()[keep])


def _mean_ll(model, x) -> float:
    with torch.no_grad():
        return float(model.log_prob(x).mean())


@pytest.mark.parametrize("removed", [[], [3], [0, 2]])
def test_removal_gains_equal_the_models_rebuilt_without_each_component(removed):
    model = random_model(5, 6, 2, seed=0)
    x = random_data(200, model, seed=1)
    keep = torch.ones(5, dtype=torch.bool)
    keep[removed] = False
    gains = removal_gains(validation_log_joint(model, x), model.weights.detach(), keep)
    base = _mean_ll(_without(model, keep), x)
    for k in range(5):
        if not keep[k]:
            assert gains[k] == float("-inf")
            continue
        fewer = keep.clone()
        fewer[k] = False
        expected = _mean_ll(_without(model, fewer), x) - base
        assert float(gains[k]) == pytest.approx(expected, rel=1e-9, abs=1e-9), k


def test_removal_gain_of_a_rows_dominant_component_is_exact():
    """A component with responsibility 1 − 1e-30 for a row (1 − r rounds to 0 in float64):
    the gain still equals the rebuilt model's, not −inf."""
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([[0.0], [12.0]], dtype=F64),
        torch.zeros(2, 1, 0, dtype=F64), torch.ones(2, 1, dtype=F64))
    x = torch.tensor([[0.0], [12.0], [6.0]], dtype=F64)
    gains = removal_gains(validation_log_joint(model, x), model.weights.detach(),
                          torch.ones(2, dtype=torch.bool))
    expected = _mean_ll(_without(model, torch.tensor([False, True])), x) - _mean_ll(model, x)
    assert float(gains[0]) == pytest.approx(expected, rel=1e-9)
    assert torch.isfinite(gains).all()


def test_removal_gain_of_a_component_holding_almost_all_the_weight_is_exact():
    """The other weight 1e-18 (1 − w rounds to 1 in float64): removing the dominant
    component costs what the rebuilt model says, it is not a +inf gain."""
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([1 - 1e-18, 1e-18], dtype=F64), torch.tensor([[0.0, 0.0], [3.0, 3.0]],
                                                                  dtype=F64),
        torch.zeros(2, 2, 1, dtype=F64), torch.ones(2, 2, dtype=F64))
    x = torch.randn(200, 2, generator=gen(0), dtype=F64)
    gains = removal_gains(validation_log_joint(model, x), model.weights.detach(),
                          torch.ones(2, dtype=torch.bool))
    expected = _mean_ll(_without(model, torch.tensor([False, True])), x) - _mean_ll(model, x)
    assert float(gains[0]) == pytest.approx(expected, rel=1e-9)
    assert 0 not in harmful_components(model, x)  # the component that generates the data


def test_removal_gains_refuse_a_keep_that_is_not_a_bool_mask():
    model = random_model(3, 4, 1, seed=0)
    log_joint = validation_log_joint(model, random_data(20, model, seed=1))
    weights = model.weights.detach()
    with pytest.raises(ValueError, match="keep must be a bool mask of shape \\(3,\\)"):
        removal_gains(log_joint, weights, torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        removal_gains(log_joint, weights, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights must have shape"):
        removal_gains(log_joint, weights[:2], torch.ones(3, dtype=torch.bool))


def _planted():
    """Two separated clusters and a third component collapsed on one training row with a
    tiny variance and a fifth of the weight: it explains no validation row."""
    g = gen(3)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([[0.0] * 4, [10.0] * 4], dtype=F64),
        0.5 * torch.randn(2, 4, 1, generator=g, dtype=F64), torch.ones(2, 4, dtype=F64))
    train, _ = truth.sample(100, generator=g)
    val, _ = truth.sample(300, generator=g)
    fitted = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.4, 0.4, 0.2], dtype=F64),
        torch.cat([truth.means.detach(), train[:1]]),
        torch.cat([truth.factor_loadings.detach(), torch.zeros(1, 4, 1, dtype=F64)]),
        torch.cat([truth.noise_variance.detach(), torch.full((1, 4), 1e-6, dtype=F64)]))
    return truth, fitted, val


def test_harmful_components_finds_the_planted_component_and_no_other():
    truth, fitted, val = _planted()
    assert harmful_components(fitted, val) == [2]
    assert harmful_components(truth, val) == []
    # the same from a DataLoader of (row, label) batches
    loader = DataLoader(TensorDataset(val, torch.zeros(300)), batch_size=64)
    assert harmful_components(fitted, loader) == [2]


def test_removing_the_harmful_set_raises_validation_and_no_further_removal_does():
    model = random_model(8, 5, 1, seed=5)
    x = random_data(300, random_model(3, 5, 1, seed=5), seed=6)  # fewer clusters than K
    removed = harmful_components(model, x)
    assert removed, "the case this test is about: some components hurt"
    keep = torch.ones(8, dtype=torch.bool)
    keep[removed] = False
    after = _mean_ll(_without(model, keep), x)
    assert after > _mean_ll(model, x)
    for k in keep.nonzero().flatten().tolist():
        if int(keep.sum()) == 1:
            break
        fewer = keep.clone()
        fewer[k] = False
        assert _mean_ll(_without(model, fewer), x) <= after + 1e-12


def test_reseed_components_is_seeded_keeps_k_and_splits_the_heaviest():
    _, fitted, _ = _planted()
    a, b = (MixtureOfFactorAnalyzers.from_parameters(
        fitted.weights.detach(), fitted.means.detach(), fitted.factor_loadings.detach(),
        fitted.noise_variance.detach()) for _ in range(2))
    reseed_components(a, [2], torch.Generator().manual_seed(0))
    reseed_components(b, [2], torch.Generator().manual_seed(0))
    assert a.n_components == 3
    for name in ("weights", "means", "factor_loadings", "noise_variance"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    heaviest = 0  # weights 0.4, 0.4, 0.2: the first maximum
    torch.testing.assert_close(a.noise_variance[2], fitted.noise_variance[heaviest])
    torch.testing.assert_close((a.means[2] + a.means[heaviest]) / 2, fitted.means[heaviest])
    torch.testing.assert_close(a.weights.detach(), torch.tensor([0.2, 0.4, 0.2], dtype=F64)
                               / 0.8)
    with pytest.raises(ValueError, match=r"components must be ints in \[0, 3\), got \[3\]"):
        reseed_components(a, [3], torch.Generator())
    for bad in ([1.7], [True]):  # (read as 1 before)
        with pytest.raises(ValueError, match="components must be ints"):
            reseed_components(a, bad, torch.Generator())
    with pytest.raises(ValueError, match="must be distinct"):  # (lost half a weight)
        reseed_components(a, [1, 1], torch.Generator())
    with pytest.raises(ValueError, match="cannot re-seed all 3 components"):
        reseed_components(a, [0, 1, 2], torch.Generator())


def test_removal_gains_of_the_last_kept_component():
    model = random_model(3, 4, 1, seed=0)
    log_joint = validation_log_joint(model, random_data(50, model, seed=1))
    weights = model.weights.detach()
    gains = removal_gains(log_joint, weights, torch.tensor([True, False, False]))
    assert gains.tolist() == [-math.inf] * 3  # (nan for the kept one before)
    with pytest.raises(ValueError, match="keep marks no component"):
        removal_gains(log_joint, weights, torch.zeros(3, dtype=torch.bool))


def test_validation_log_joint_refuses_bad_rows():
    model = random_model(2, 3, 1, seed=0)
    with pytest.raises(ValueError, match="features per row"):
        validation_log_joint(model, torch.zeros(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="non-finite"):
        validation_log_joint(model, torch.full((4, 3), float("nan"), dtype=F64))


def _greedy(log_joint, weights):
    """The greedy removal, recomputing every gain from all rows after each removal (the
    definition; what harmful_components did before it kept the gains up to date)."""
    keep = torch.ones(log_joint.shape[1], dtype=torch.bool)
    removed = []
    while int(keep.sum()) > 1:
        gains = removal_gains(log_joint, weights, keep)
        best = int(gains.argmax())
        if not bool(gains[best] > 0):
            break
        keep[best] = False
        removed.append(best)
    return removed


@pytest.mark.parametrize("seed", range(12))
def test_harmful_components_equal_the_greedy_removal_recomputed_from_every_row(seed,
                                                                             monkeypatch):
    """Only the rows a removed component had a share of are recomputed now (83 ms a removal
    at K = 3,000 on 500 rows before): the same components in the same order as the greedy
    removal that recomputes every gain, on mixtures where most components hurt (many
    components sharp on one or two rows), where few do, and of a moderate spread (seeds 4
    to 11: every row's shares spread over 12 nats, so removals move shares far above
    ``exp(UNMOVED_LOG_SHARE)`` but far below the row's top: a threshold of 1e-2 in place of
    1e-20 left such rows stale and removed other components)."""
    import mfa.pruning as pruning

    g = gen(100 + seed)
    n, k = 200, 80
    # 10 components hold the rows; the others give them little density (harmful), a few of
    # them near one row's top (a share that moves with each removal)
    owner = torch.randint(0, 10, (n,), generator=g)
    log_joint = -200.0 * torch.rand(n, k, generator=g, dtype=F64) - 50.0
    log_joint[torch.arange(n), owner] = -5.0 * torch.rand(n, generator=g, dtype=F64)
    near = torch.randint(10, k, (n // 3,), generator=g)
    log_joint[torch.arange(n // 3), near] = -8.0 * torch.rand(n // 3, generator=g, dtype=F64)
    if seed % 2:  # a smoother mixture: few harmful components
        log_joint = -3.0 * torch.rand(n, k, generator=g, dtype=F64)
    if seed >= 4:  # a moderate spread
        log_joint = -12.0 * torch.rand(n, k, generator=g, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.1
    weights /= weights.sum()
    want = _greedy(log_joint, weights)
    assert len(want) > (k // 2 if seed % 2 == 0 else 0)  # (the cases this is about)
    model = random_model(k, 2, 0, seed=seed)
    with torch.no_grad():
        model.logits.copy_(weights.log().to(model.logits))
    monkeypatch.setattr(pruning, "validation_log_joint", lambda *args: log_joint.clone())
    assert harmful_components(model, torch.zeros(1, 2)) == want


def test_a_removal_that_moves_only_the_top_components_term_is_recomputed(monkeypatch):
    """Row 0 has A on top and B 50 nats below, C nowhere; C holds the other rows. Removing B
    barely moves row 0's density but takes most of what its top's term rests on (the others'
    density): that row was left stale, and A was removed next, leaving row 0 no support
    (mean log-likelihood -inf, where the greedy removal of B alone gives -1.690)."""
    import mfa.pruning as pruning

    weights = torch.tensor([0.45, 0.45, 0.10], dtype=F64)
    for c0 in (float("-inf"), -1000.0):
        log_joint = torch.full((100, 3), -100.0, dtype=F64)
        log_joint[:, 2] = 0.0
        log_joint[0] = torch.tensor([0.0, -50.0, c0], dtype=F64)
        log_joint += weights.log()
        assert _greedy(log_joint, weights) == [1]
        model = random_model(3, 2, 0, seed=0)
        with torch.no_grad():
            model.logits.copy_(weights.log().to(model.logits))
        monkeypatch.setattr(pruning, "validation_log_joint", lambda *args, lj=log_joint: lj.clone())
        assert harmful_components(model, torch.zeros(1, 2)) == [1]
