"""Tests of mfa.figures: the output checks made before training, the figures' arguments."""

from __future__ import annotations

import pytest
import torch
from helpers import drawn_lines, saved_figures
from PIL import Image

from mfa import MixtureOfFactorAnalyzers, figures, viz
from mfa.config import OutputConfig
from mfa.data import load_dataset
from mfa.figures import check_output


def test_the_factor_figure_is_checked_before_training():
    """The factor figure (min(n_factor_components, K) rows of 2 + 3L images) was left out:
    K=200, L=50 at scale 4 passed the check and failed after training (438M pixels)."""
    output = OutputConfig(n_samples=1, n_inpaint=0, n_factor_components=200, image_scale=4)
    with pytest.raises(ValueError, match=r"upscaled 4× would have .* more than "
                                         r"mfa\.viz\.MAX_FIGURE_PIXELS"):
        check_output(output, (1, 28, 28), n_components=200, n_factors=50)
    with pytest.raises(ValueError, match=r"MAX_FIGURE_PIXELS"):  # K not known yet: all rows
        check_output(output, (1, 28, 28), n_components=None, n_factors=50)
    check_output(output, (1, 28, 28), n_components=2, n_factors=50)  # two rows: fine
    check_output(OutputConfig(n_samples=1, n_inpaint=0, n_factor_components=0, image_scale=4),
                 (1, 28, 28), n_components=200, n_factors=50)  # no factor figure


def test_no_sample_grid_checks_no_outlier_grid():
    """n_samples 0 draws neither grid, but an outlier grid of 32 was checked (and refused)."""
    big = dict(n_inpaint=0, n_factor_components=0, grid_nrow=8, image_scale=2)
    with pytest.raises(ValueError, match=r"MAX_FIGURE_PIXELS"):
        check_output(OutputConfig(n_samples=32, **big), (3, 2048, 2048))
    check_output(OutputConfig(n_samples=0, **big), (3, 2048, 2048))


def tiny_model(n_features=4, n_factors=1):
    return MixtureOfFactorAnalyzers(2, n_features, n_factors,
                                    generator=torch.Generator().manual_seed(0))


def test_sample_names_nrow_and_seed(tmp_path):
    """nrow=0 with per_component said "n must be >= 1", and seed=1.5 failed in torch
    ("manual_seed expected a long")."""
    model = tiny_model()
    with pytest.raises(ValueError, match=r"nrow must be >= 1, got 0"):
        figures.sample(model, (1, 2, 2), tmp_path / "s.png", nrow=0, per_component=True)
    for seed, error in ((1.5, TypeError), ("1", TypeError), (-1, ValueError)):
        with pytest.raises(error, match=r"seed must be"):
            figures.sample(model, (1, 2, 2), tmp_path / "s.png", n=2, seed=seed)
    with pytest.raises(TypeError, match=r"with_noise must be True or False, got 'no'"):
        figures.sample(model, (1, 2, 2), tmp_path / "s.png", n=2, with_noise="no")
    assert not (tmp_path / "s.png").exists()


def test_inpaint_names_the_seed(tmp_path):
    data = load_dataset("embedded-mnist", limit=20)
    model = tiny_model(784, 2)
    with pytest.raises(TypeError, match=r"seed must be an int, got float"):
        figures.inpaint(model, data, tmp_path / "i.png", n=2, n_samples=0, seed=1.5)
    assert not (tmp_path / "i.png").exists()


def test_visualize_takes_one_component_index(tmp_path):
    """components=1 failed with "'int' object is not iterable"; factor_grid takes an int."""
    model = tiny_model(n_factors=1)
    path = figures.visualize(model, (1, 2, 2), tmp_path / "f.png", components=1, scale=1)
    with Image.open(path) as image:
        assert image.size == viz.grid_size(5, 5, 2, 2)
        assert image.tobytes() == viz.factor_grid(model, [1], (1, 2, 2)).tobytes()


def test_training_curve_draws_em_points_at_the_parameters_they_score(tmp_path, monkeypatch):
    """curve.png drew an EM record's train LL (the parameters before its M-step) and val LL
    (after it) at one x. Now x counts the M-steps applied to the parameters a point scores:
    train at iteration - 1; the final record (no M-step) repeats the val LL of the record
    before, of the same parameters, and is left out. Adam's epochs stay as they are."""
    saved = saved_figures(monkeypatch)
    em = [{"run": 0, "iteration": i, "train_log_likelihood": 10.0 + i,
           "val_log_likelihood": 5.0 + min(i, 3), "final": i == 4} for i in range(1, 5)]
    figures.training_curve(em, tmp_path / "curve.png", method="em", title="t")
    lines = drawn_lines(saved[-1])
    assert lines["train_log_likelihood"] == ([0, 1, 2, 3], [11.0, 12.0, 13.0, 14.0])
    assert lines["val_log_likelihood"] == ([1, 2, 3], [6.0, 7.0, 8.0])
    (axes,) = saved[-1].axes
    assert axes.get_xlabel() == "EM iterations (M-steps applied)" and axes.get_title() == "t"
    assert em[-1]["val_log_likelihood"] == 8.0  # (the history itself is left as it was)

    # A search's new s0 (the M-step's differs from the iteration's prior) is marked between
    # the parameters before and after it; with n_init, later runs are re-seeding rounds.
    searched = [dict(r, noise_prior_variance=1e-5, step_noise_prior_variance=1e-5 if i != 2
                     else 1e-3) for i, r in enumerate(em, 1)]
    searched += [dict(r, run=1) for r in searched]
    figures.training_curve(searched, tmp_path / "curve.png", method="em", n_init=1)
    (axes,) = saved[-1].axes
    labels = [line.get_label() for line in axes.get_lines()]
    assert "train_log_likelihood (re-seed 1)" in labels and "val_log_likelihood (run 0)" in labels
    marks = [line for line in axes.get_lines() if line.get_linestyle() == ":"
             and list(line.get_xdata()) == [1.5, 1.5]]
    assert len(marks) == 2 and marks[0].get_label() == "noise prior s0 changed"

    sgd = [{"epoch": e, "train_log_likelihood": 1.0 * e, "val_log_likelihood": 0.5 * e}
           for e in range(1, 4)]
    figures.training_curve(sgd, tmp_path / "curve.png", method="sgd")
    lines = drawn_lines(saved[-1])
    assert lines["train_log_likelihood"][0] == lines["val_log_likelihood"][0] == [1, 2, 3]
    assert saved[-1].axes[0].get_xlabel() == "epoch"
