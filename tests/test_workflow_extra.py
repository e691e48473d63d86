"""mfa.workflow's small decisions, on stand-in data (no training): the masks of data.missing,
the K check before a run folder is made, the form of the training data, the factor figure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mfa import workflow
from mfa.config import load_config
from mfa.masks import missing_mask


def _data(n_train=6, n_val=4, shape=(1, 4, 4)):
    d = shape[0] * shape[1] * shape[2]
    pixels = {"train": torch.zeros(n_train, d, dtype=torch.uint8),
              "val": torch.zeros(n_val, d, dtype=torch.uint8),
              "test": torch.zeros(0, d, dtype=torch.uint8)}
    return SimpleNamespace(
        name="stand-in", image_shape=shape, n_features=d, pixels=pixels.__getitem__,
        dequantize=False,
        train_pixels=pixels["train"], val_pixels=pixels["val"],
        train=torch.zeros(n_train, d), val=torch.zeros(n_val, d),
        dataset=lambda split: ("dataset", split),
        quantized=lambda split, device: ("quantized", split, device.type),
        loader=lambda split, batch_size: ("loader", split, batch_size))


def test_the_validation_rows_get_their_own_masks_seeded_one_above():
    """data.missing.seed seeds the training rows' masks, seed + 1 the validation rows' (the
    two splits hid the same pixels of their first rows)."""
    config = load_config(None, ["data.missing.kind=random", "data.missing.rate=0.5",
                                "data.missing.seed=7"])
    data = _data(n_train=5, n_val=5)
    train = workflow.missing_masks(config, data, "train")
    val = workflow.missing_masks(config, data, "val")
    for got, seed in ((train, 7), (val, 8)):
        want = missing_mask("random", (1, 4, 4), 5, torch.Generator().manual_seed(seed),
                            rate=0.5)
        assert torch.equal(got, want)
    assert not torch.equal(train, val)
    assert workflow.missing_masks(load_config(None, []), data, "train") is None


def _check(overrides, n_train):
    config = load_config(None, overrides)
    workflow._check_rows(config, config.trainer_config(), n_train)


def test_k_may_equal_the_rows_the_initialisation_reads():
    _check(["model.n_components=5", "train.em.init_samples=5"], n_train=100)
    _check(["model.n_components=100"], n_train=100)
    with pytest.raises(ValueError, match=r"at most the training images its initialisation "
                                         r"reads, train\.em\.init_samples=5 of 100"):
        _check(["model.n_components=6", "train.em.init_samples=5"], n_train=100)


def test_a_hierarchical_root_needs_k_rows_whatever_its_init():
    """The root's EM is fitted to every training row: K above them is refused also with
    init: none (no initialisation rows to count)."""
    base = ["train.method=hierarchical", "train.em.init=none"]
    _check([*base, "model.n_components=8"], n_train=8)
    with pytest.raises(ValueError, match=r"the root's EM is fitted to, the training split's "
                                         r"8: lower model\.n_components or train on more"):
        _check([*base, "model.n_components=9"], n_train=8)


@pytest.mark.parametrize(("limit", "advice"), [(8, "raise data.limit"),
                                               (50, "train on more images")])
def test_the_advice_for_too_few_rows_raises_data_limit_only_where_it_binds(limit, advice):
    with pytest.raises(ValueError, match=rf"\(data\.limit={limit}\): lower "
                                         rf"model\.n_components or {advice}$"):
        _check(["model.n_components=9", f"data.limit={limit}"], n_train=8)


@pytest.mark.parametrize(("method", "device", "want"), [
    ("em", "cpu", (("loader", "train", 32), ("loader", "val", 32))),
    ("em", "cuda", (("quantized", "train", "cuda"), ("quantized", "val", "cuda"))),
    ("sgd", "cpu", (("quantized", "train", "cpu"), ("quantized", "val", "cpu"))),
    ("hierarchical", "cpu", (("dataset", "train"), ("dataset", "val")))])
def test_above_stream_above_values_the_trainers_get_no_float_copy(monkeypatch, method,
                                                                  device, want):
    config = load_config(None, [f"train.method={method}", "train.em.batch_size=32"])
    data = _data()  # 6 rows of 16 values: 96
    monkeypatch.setattr(workflow, "STREAM_ABOVE", 95)
    assert workflow._training_data(data, config, torch.device(device)) == want
    monkeypatch.setattr(workflow, "STREAM_ABOVE", 96)  # (at the limit: float tensors)
    train, val = workflow._training_data(data, config, torch.device("cpu"))
    assert torch.equal(train, data.train) and torch.equal(val, data.val)
    monkeypatch.setattr(workflow, "STREAM_ABOVE", 95)
    got = workflow._training_data(_data(n_val=0), config, torch.device(device))
    assert got[0] == want[0] and got[1] is None  # no validation rows: no validation data


def test_the_factor_figure_shows_at_most_the_models_components(tmp_path):
    from mfa.model import MixtureOfFactorAnalyzers

    config = load_config(None, ["output.n_samples=0", "output.n_inpaint=0",
                                "output.n_factor_components=5"])
    model = MixtureOfFactorAnalyzers(2, 16, 1, generator=torch.Generator().manual_seed(0))
    paths = workflow.draw_figures(model, _data(), config, tmp_path)
    assert [p.name for p in paths] == ["factors.png"] and paths[0].stat().st_size > 0


def test_missing_pixels_leave_absent_validation_data_absent():
    config = load_config(None, ["data.missing.kind=random"])
    data = _data()
    assert workflow._remove_pixels(config, data, None, "val") is None
    hidden = workflow._remove_pixels(config, data, data.train.clone(), "train")
    observed = workflow.missing_masks(config, data, "train")
    assert torch.equal(torch.isnan(hidden), ~observed)


def test_an_empty_test_split_draws_samples_but_no_inpainting_or_outliers(tmp_path, caplog):
    from mfa.model import MixtureOfFactorAnalyzers

    config = load_config(None, ["output.n_samples=4", "output.n_inpaint=2",
                                "output.n_factor_components=0"])
    model = MixtureOfFactorAnalyzers(2, 16, 1, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="mfa"):
        paths = workflow.draw_figures(model, _data(), config, tmp_path)
    assert [p.name for p in paths] == ["samples.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]
    assert "the test split is empty" in caplog.text
