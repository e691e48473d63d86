"""Tests of mfa.figures: the output checks made before training, the figures' arguments."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import drawn_lines, saved_figures
from PIL import Image

from mfa import MixtureOfFactorAnalyzers, figures, viz, workflow
from mfa.config import OutputConfig, load_config
from mfa.data import load_dataset
from mfa.figures import check_output
from mfa.masks import make_mask

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml"


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


# ------------------------------------------------------------- pixels of dequantised data
# A dequantised row is x = (p + u)/256, u in [0, 1): the pixel it stands for is floor(256 x),
# while round(255 x) is p or p ± 1 depending on u. The figures drew round(255 x), so about
# half the pixels of a dequantised dataset were shown one grey level off its stored pixels.


def pixel_model(d: int, seed: int = 0) -> MixtureOfFactorAnalyzers:
    """Two components over ``d`` features whose values lie mostly inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.4, 0.6]), 0.1 + 0.8 * torch.rand(2, d, generator=g),
        0.05 * torch.randn(2, d, 2, generator=g), torch.full((2, d), 1e-3))


def grid_cells(path, n: int, nrow: int, shape) -> np.ndarray:
    """The ``n`` cells of a saved grid (scale 1, padding 2) as uint8 ``[n, C, H, W]``,
    decoded by PIL."""
    c, h, w = shape
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    cols = min(nrow, n)
    cells = [array[2 + (j // cols) * (h + 2):][:h, 2 + (j % cols) * (w + 2):][:, :w]
             for j in range(n)]
    return np.stack(cells).transpose(0, 3, 1, 2)


def stored(data, split: str, rows) -> np.ndarray:
    """The dataset's own uint8 pixels of ``rows`` as ``[n, C, H, W]``."""
    return data.pixels(split)[torch.as_tensor(rows)].numpy().reshape(-1, *data.image_shape)


def floor_256(x: torch.Tensor) -> np.ndarray:
    """The pixels dequantised values stand for, by hand: floor(256 x) clipped to 0..255."""
    return np.clip(np.floor(x.detach().double().numpy() * 256), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("embedded-mnist", dequantize=True, seed=0, limit=40)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """A folder of 40 small RGB images, read dequantised."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    (root / "a").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(
            root / "a" / f"{i:03d}.png")
    return load_dataset("folder", root, dequantize=True, seed=0, test_fraction=0.25)


def test_inpainting_figure_shows_the_stored_pixels_of_dequantised_data(digits, tmp_path):
    """The original column, the observed pixels of the masked column and of the conditional
    mean (equal to the observed row there) are the stored uint8 pixels, byte for byte; the
    hidden pixels of the mean are floor(256·mean)."""
    n, shape = 4, digits.image_shape
    model = pixel_model(digits.n_features)
    path = figures.inpaint(model, digits, tmp_path / "i.png", mask="center", n=n,
                           n_samples=1, seed=0, scale=1)
    cells = grid_cells(path, 4 * n, 4, shape).reshape(n, 4, 3, *shape[1:])  # RGB (magenta)
    want = stored(digits, "test", range(n))  # [n, 1, H, W]
    x = digits.dataset("test").rows(torch.arange(n))
    assert (floor_256(x) == want.reshape(n, -1)).all()  # (the rows stand for these pixels)
    assert (np.round(x.numpy() * 255) != want.reshape(n, -1)).mean() > 0.2  # (the old rule)
    for channel in range(3):
        assert np.array_equal(cells[:, 0, channel], want[:, 0])
    observed = make_mask("center", shape, n)
    seen = observed.view(n, *shape[1:]).numpy()
    assert np.array_equal(cells[:, 1, 0][seen], want[:, 0][seen])
    hidden_rgb = cells[:, 1].transpose(0, 2, 3, 1)[~seen]
    assert (hidden_rgb == np.array([255, 0, 255], dtype=np.uint8)).all()
    mean = model.conditional_mean(x, observed)
    assert np.array_equal(cells[:, 2, 0], floor_256(mean).reshape(n, *shape[1:]))
    assert np.array_equal(cells[:, 2, 0][seen], want[:, 0][seen])


@pytest.mark.parametrize("which", ["digits", "rgb_folder"])
def test_outlier_grid_shows_the_stored_pixels_of_dequantised_data(which, request, tmp_path):
    data = request.getfixturevalue(which)
    model = pixel_model(data.n_features)
    n, nrow = 6, 4
    png, table = figures.outliers(model, data, tmp_path, n=n, nrow=nrow, scale=1,
                                  score="neg_log_prob")
    with open(table, newline="") as f:
        order = [int(row["index"]) for row in csv.DictReader(f)][:n]
    want = stored(data, "test", order)
    assert np.array_equal(grid_cells(png, n, nrow, data.image_shape), want)


@pytest.mark.parametrize("dequantized", [True, False])
def test_sample_figure_draws_each_value_as_the_pixel_of_its_scale(dequantized, tmp_path):
    """A dequantised model's samples are drawn as floor(256 x); pixel/255 ones as
    round(255 x), as before."""
    shape, n, nrow = (1, 4, 5), 6, 4
    model = pixel_model(20)
    path = figures.sample(model, shape, tmp_path / "s.png", n=n, nrow=nrow, seed=3, scale=1,
                          dequantized=dequantized)
    x, _ = model.sample(n, generator=torch.Generator().manual_seed(3))
    want = (floor_256(x) if dequantized else
            np.clip(np.floor(x.detach().double().numpy() * 255 + 0.5), 0, 255).astype(np.uint8))
    assert np.array_equal(grid_cells(path, n, nrow, shape), want.reshape(n, *shape))


def test_a_dequantised_runs_figures_show_its_pixels(digits, tmp_path):
    """draw_figures of a run on dequantised data: samples and the factor grid's means as
    floor(256 x), the outlier grid as the stored pixels."""
    config = load_config(CONFIG, ["data.dequantize=true", "output.n_samples=6",
                                  "output.grid_nrow=3", "output.image_scale=1",
                                  "output.n_inpaint=0", "output.n_factor_components=1",
                                  "seed=5"])
    model = pixel_model(digits.n_features)
    paths = {p.name: p for p in workflow.draw_figures(model, digits, config, tmp_path)}
    x, _ = model.sample(6, generator=torch.Generator().manual_seed(5))
    shape = digits.image_shape
    assert np.array_equal(grid_cells(paths["samples.png"], 6, 3, shape),
                          floor_256(x).reshape(6, *shape))
    factors = grid_cells(paths["factors.png"], 8, 8, shape)  # μ | √d | (μ−2A, A, μ+2A) × 2
    a = model.factor_loadings[0].detach()
    mu = model.means[0].detach()
    for cell, value in ((0, mu), (2, mu - 2 * a[:, 0]), (7, mu + 2 * a[:, 1])):
        assert np.array_equal(factors[cell, 0], floor_256(value).reshape(shape[1:]))
    with open(paths["outliers.csv"], newline="") as f:
        order = [int(row["index"]) for row in csv.DictReader(f)][:6]
    assert np.array_equal(grid_cells(paths["outliers.png"], 6, 3, shape),
                          stored(digits, "test", order))
