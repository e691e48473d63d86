"""Tests of mfa.adam: the noise-relative step, the weight decay added to the gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_data, random_model

from mfa import MixtureOfFactorAnalyzers
from mfa.adam import add_weight_decay, make_adam, relative_step_factor
from mfa.em import EMConfig, EMTrainer
from mfa.sgd import SGDConfig, SGDTrainer

F64 = torch.float64


def test_relative_step_factor_is_softplus_over_sigmoid_without_overflow():
    middle = torch.tensor([-30.0, -5.0, -1.0, 0.0, 1.0, 5.0, 30.0], dtype=F64)
    direct = torch.nn.functional.softplus(middle) / torch.sigmoid(middle)
    r = torch.cat([torch.tensor([-800.0, -60.0], dtype=F64), middle,
                   torch.tensor([800.0], dtype=F64)])
    # far out: softplus(r)/sigmoid(r) = 1 + O(e^r) below, r + O(e^-r) above
    reference = torch.cat([torch.ones(2, dtype=F64), direct, torch.tensor([800.0], dtype=F64)])
    torch.testing.assert_close(relative_step_factor(r), reference, rtol=1e-12, atol=0)
    got32 = relative_step_factor(r.float())
    assert bool(torch.isfinite(got32).all())
    torch.testing.assert_close(got32, reference.float(), rtol=1e-6, atol=0)


def test_weight_decay_on_the_gradients_equals_adams_own():
    """One to three steps with the decay added to the gradients equal torch's
    Adam(weight_decay=) on finite parameters."""
    model = random_model(3, 5, 2, seed=1)
    twin = random_model(3, 5, 2, seed=1)
    x = random_data(64, model, seed=2)
    mine = make_adam(list(model.parameters()), 0.05)
    theirs = torch.optim.Adam(list(twin.parameters()), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        for m, opt in ((model, mine), (twin, theirs)):
            opt.zero_grad()
            (-m.log_prob(x).mean()).backward()
        add_weight_decay(model.parameters(), 0.1)
        mine.step()
        theirs.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14, msg=name)


def _noise_after_adam(scale: float) -> torch.Tensor:
    """The noise variances, over their maximum-likelihood values, after Adam from those
    values ×4 on data ×``scale`` (the means and loadings scaled with it)."""
    truth = random_model(2, 4, 1, seed=0)
    x, v = random_data(400, truth, seed=1), random_data(100, truth, seed=2)
    ml = MixtureOfFactorAnalyzers(2, 4, 1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EMTrainer(EMConfig(max_iter=200, noise_prior_strength=0.0, patience=0, reseed_rounds=0,
                           val_fraction=0.0, progress=False, seed=0)).fit(ml, x)
    w, mu, a, d = (t.detach() for t in (ml.weights, ml.means, ml.factor_loadings,
                                         ml.noise_variance))
    model = MixtureOfFactorAnalyzers.from_parameters(w, mu * scale, a * scale,
                                                     d * scale**2 * 4, min_noise=0.0)
    SGDTrainer(SGDConfig(progress=False, epochs=10, patience=0, init="none", em_start=False,
                         noise_prior_strength=0.0, batch_size=32)).fit(model, x * scale,
                                                                       validation=v * scale)
    return model.noise_variance.detach() / (d * scale**2)


def test_noise_steps_are_relative_at_any_scale_of_the_data():
    """Pixels in 0-255: each Adam step moved a noise variance of hundreds by about lr, so
    after 10 epochs from 4× the maximum-likelihood noise it was still 4.0× (1.3× with the
    data in [0, 1]); the step now is about lr relative to the variance at any scale."""
    unit = _noise_after_adam(1.0).mean().item()
    assert unit < 2.0  # (2.7 when the noise parameter's step was not relative)
    for scale in (255.0, 0.01):
        assert _noise_after_adam(scale).mean().item() == pytest.approx(unit, rel=0.15), scale


def test_count_rows_of_tensors_and_datasets_by_hand():
    """The penalty's N for the forms fit takes as they come: a tensor's and QuantizedRows'
    rows, a map-style Dataset's length, a sized IterableDataset's, and None for an unsized one
    or a list of batches (the start's pass counts those)."""
    from torch.utils.data import IterableDataset, TensorDataset

    from mfa.adam import count_rows
    from mfa.data.quantized import QuantizedRows

    x = torch.zeros(37, 3, dtype=F64)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(x)

    class SizedStream(Stream):
        def __len__(self):
            return 37

    assert count_rows(x) == 37
    assert count_rows(QuantizedRows(torch.zeros(21, 3, dtype=torch.uint8))) == 21
    for unknown in (False, True):
        assert count_rows(TensorDataset(x), unknown) == 37
        assert count_rows(SizedStream(), unknown) == 37
        assert count_rows(Stream(), unknown) is None
        assert count_rows([x[:10], x[10:]], unknown) is None


def test_a_dataset_needs_no_pass_to_count_its_rows_for_the_prior():
    """A fixed noise prior without the start's pass (init='none', em_start=False) on a map-style
    Dataset: its length is N, and the fit runs (it would raise if it could not count)."""
    from torch.utils.data import TensorDataset

    model = random_model(2, 3, 1, seed=1)
    x = random_data(60, model, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SGDTrainer(SGDConfig(progress=False, epochs=1, init="none", em_start=False,
                             noise_prior_variance=0.5, val_fraction=0.0)).fit(
            model, TensorDataset(x))


def test_a_loader_without_batching_is_never_counted_by_its_items():
    """DataLoader(batch_size=None) over a Dataset of 4 batches of 5 rows: its items are
    batches, so neither count gives 4 (a prior 5× too strong); None, also where no pass
    counts them (dataset_if_unknown)."""
    from torch.utils.data import DataLoader, Dataset

    from mfa.adam import count_rows

    class Batches(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.zeros(5, 3, dtype=F64)

    loader = DataLoader(Batches(), batch_size=None)
    assert count_rows(loader) is None
    assert count_rows(loader, dataset_if_unknown=True) is None
