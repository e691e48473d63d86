"""Tests of mfa.viz: grids, CHW layout, inpainting and factor figures, plots."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import drawn_lines, saved_figures
from PIL import Image

from mfa import MixtureOfFactorAnalyzers, viz
from mfa.masks import make_mask
from mfa.viz import (
    factor_grid,
    image_grid,
    images_to_rows,
    inpainting_grid,
    plot_training_curve,
    rows_to_images,
    sample_grid,
    save_image,
    save_image_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid_size(n, nrow, h, w, padding=2):
    cols = min(nrow, n)
    rows = -(-n // cols)
    return cols * (w + padding) + padding, rows * (h + padding) + padding


# ---------------------------------------------------------------------------- grids


@pytest.mark.parametrize("n, nrow", [(1, 8), (8, 4), (10, 4), (3, 8)])
def test_grid_size_and_mode_grayscale(n, nrow):
    image = image_grid(torch.rand(n, 1, 5, 7, generator=gen(0)), nrow=nrow)
    assert image.mode == "L"
    assert image.size == grid_size(n, nrow, 5, 7)
    assert viz.grid_size(n, nrow, 5, 7) == grid_size(n, nrow, 5, 7)  # the library's formula


def test_grid_rgb_padding_and_pixel_values():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0  # red
    images[1, 2] = 0.5  # half blue
    image = image_grid(images, nrow=2, padding=1, pad_value=0.0)
    assert image.mode == "RGB" and image.size == (2 * 5 + 1, 5 + 1)
    assert image.getpixel((0, 0)) == (0, 0, 0)  # padding
    assert image.getpixel((1, 1)) == (255, 0, 0)  # first image
    assert image.getpixel((6, 1)) == (0, 0, 128)  # second image, 0.5 → 128
    assert image.getpixel((5, 1)) == (0, 0, 0)  # padding between the two


def test_grid_clamps_and_handles_nan_and_uint8():
    images = torch.tensor([[-1.0, 2.0], [float("nan"), 0.25]]).view(1, 1, 2, 2)
    image = image_grid(images, padding=0)
    assert list(image.tobytes()) == [0, 255, 0, 64]
    as_bytes = image_grid(torch.tensor([[[[0, 255], [7, 64]]]], dtype=torch.uint8), padding=0)
    assert list(as_bytes.tobytes()) == [0, 255, 7, 64]


def test_grid_empty_cells_take_the_pad_value():
    image = image_grid(torch.zeros(3, 1, 2, 2), nrow=2, padding=0, pad_value=1.0)
    assert image.size == (4, 4)
    assert image.getpixel((3, 3)) == 255 and image.getpixel((0, 0)) == 0


@pytest.mark.parametrize(
    "images, kwargs, error, match",
    [
        (torch.zeros(2, 2, 4, 4), {}, ValueError, r"C = 1 or 3, got \(2, 2, 4, 4\)"),
        (torch.zeros(0, 1, 4, 4), {}, ValueError, r"at least one image"),
        (torch.zeros(2, 1, 4, 4), {"nrow": 0}, ValueError, r"nrow must be an int >= 1"),
        (torch.zeros(2, 1, 4, 4), {"padding": -1}, ValueError, r"padding must be"),
        (torch.zeros(2, 1, 4, 4), {"pad_value": "a"}, TypeError,
         r"pad_value must be a number in \[0, 1\], got 'a'"),
        (torch.zeros(2, 1, 4, 4), {"pad_value": None}, TypeError, r"pad_value must be a number"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), {}, TypeError, r"floating point"),
        ([[0.0]], {}, TypeError, r"torch\.Tensor"),
    ],
)
def test_grid_errors(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        image_grid(images, **kwargs)


def test_grid_takes_numpy_integers_for_nrow_and_padding():
    """image_grid(nrow=np.int64(2)) was refused ("nrow must be an int >= 1, got
    np.int64(2)"), though grid_size takes it."""
    import numpy as np

    images = torch.rand(3, 1, 4, 4, generator=gen(0))
    want = image_grid(images, nrow=2, padding=1).tobytes()
    assert image_grid(images, nrow=np.int64(2), padding=np.int32(1)).tobytes() == want
    with pytest.raises(ValueError, match=r"nrow must be an int >= 1, got True"):
        image_grid(images, nrow=True)


def test_save_image_grid_upscales_and_decodes(tmp_path):
    images = torch.rand(6, 1, 28, 28, generator=gen(1))
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3, scale=3)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        width, height = grid_size(6, 3, 28, 28)
        assert image.size == (3 * width, 3 * height)
        assert image.mode == "L"
        # Nearest-neighbour: every source pixel becomes a 3×3 block of one value.
        block = [image.getpixel((3 * 5 + i, 3 * 5 + j)) for i in range(3) for j in range(3)]
        assert len(set(block)) == 1
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        save_image_grid(images, tmp_path / "bad.png", scale=0)
    import numpy as np  # (numpy integers, as nrow and padding take them)

    with Image.open(save_image_grid(images, tmp_path / "one.png", scale=1)) as one:
        with Image.open(save_image_grid(images, tmp_path / "np.png", scale=np.int64(2))) as two:
            assert two.size == (2 * one.width, 2 * one.height)


def test_a_figure_past_the_pixel_limit_is_refused_before_it_is_drawn(tmp_path):
    """A huge scale ran PIL out of memory (a traceback, after the work); now one pixel past
    MAX_FIGURE_PIXELS is refused naming the sizes, and the limit itself is drawn."""
    side = math.isqrt(viz.MAX_FIGURE_PIXELS)  # 2^14: side² is the limit exactly
    assert side * side == viz.MAX_FIGURE_PIXELS
    viz.check_figure_size(1, 1, side)  # at the limit: allowed
    with pytest.raises(ValueError, match=r"1×1-pixel figure upscaled 16385× would have "
                                         r"268,468,225 pixels.*smaller scale"):
        save_image(Image.new("L", (1, 1)), tmp_path / "huge.png", scale=side + 1)
    assert not (tmp_path / "huge.png").exists()


# ---------------------------------------------------------------------------- CHW layout


def test_rows_to_images_uses_chw_order():
    c, h, w = 3, 4, 5
    x = torch.arange(2 * c * h * w, dtype=torch.float32).view(2, -1)
    images = rows_to_images(x, (c, h, w))
    assert images.shape == (2, c, h, w)
    for n, ci, hi, wi in [(0, 0, 0, 0), (0, 2, 3, 4), (1, 1, 2, 3), (1, 0, 3, 1)]:
        assert images[n, ci, hi, wi] == x[n, ci * h * w + hi * w + wi]
    assert torch.equal(images_to_rows(images), x)


def test_rows_to_images_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\] for image_shape \(3, 2, 2\)"):
        rows_to_images(torch.zeros(2, 10), (3, 2, 2))
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\)"):
        rows_to_images(torch.zeros(2, 4), (2, 2))


# ---------------------------------------------------------------------------- figures


def test_inpainting_grid_layout_and_hidden_colour():
    c, h, w, n, s = 1, 6, 6, 3, 2
    shape = (c, h, w)
    original = torch.rand(n, c * h * w, generator=gen(0))
    mask = make_mask("right", shape, n)
    mean = torch.where(mask, original, torch.zeros_like(original))
    samples = torch.rand(s, n, c * h * w, generator=gen(1))
    image = inpainting_grid(original, original * mask, mean, samples, shape, mask, padding=1)
    assert image.mode == "RGB"
    assert image.size == grid_size(n * (3 + s), 3 + s, h, w, padding=1)
    cell = w + 1
    # Column 1 (masked input), row 0: the right half is magenta, the left half is the image.
    assert image.getpixel((1 + cell + 5, 1)) == (255, 0, 255)
    grey = round(original[0, 0].item() * 255)
    assert image.getpixel((1 + cell, 1)) == (grey, grey, grey)
    # Column 0 is the original, unmasked.
    right = round(original[0, 5].item() * 255)
    assert image.getpixel((1 + 5, 1)) == (right, right, right)


def test_inpainting_grid_grey_marker_keeps_grayscale_and_rgb_images():
    shape = (1, 4, 4)
    x = torch.rand(2, 16, generator=gen(0))
    mask = make_mask("top", shape, 2)
    image = inpainting_grid(x, None, x, None, shape, mask, hidden_color=0.5)
    assert image.mode == "L" and image.size == grid_size(6, 3, 4, 4)
    assert image.getpixel((2 + 6, 2)) == 128  # top of the masked input is mid grey

    rgb_shape = (3, 4, 4)
    x = torch.rand(2, 48, generator=gen(1))
    image = inpainting_grid(x, x, x, x.unsqueeze(0), rgb_shape, make_mask("center", rgb_shape, 2))
    assert image.mode == "RGB" and image.size == grid_size(8, 4, 4, 4)


def test_inpainting_grid_errors():
    shape = (1, 4, 4)
    x = torch.rand(2, 16)
    mask = make_mask("top", shape, 2)
    with pytest.raises(ValueError, match=r"mean must have shape \[2, 16\], got \(3, 16\)"):
        inpainting_grid(x, x, torch.rand(3, 16), None, shape, mask)
    with pytest.raises(ValueError, match=r"samples must have shape \[S, 2, 16\]"):
        inpainting_grid(x, x, x, torch.rand(2, 16), shape, mask)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        inpainting_grid(x, x, x, None, shape, mask.float())


def test_inpainting_grid_names_a_bad_mask_dtype_and_hidden_color():
    """A float mask was reported by its shape ("got (2, 16)"), and a colour name failed in
    float() ("could not convert string to float: 'r'") without naming hidden_color."""
    shape = (1, 4, 4)
    x = torch.rand(2, 16, generator=gen(0))
    mask = make_mask("top", shape, 2)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*got dtype torch\.float32"):
        inpainting_grid(x, x, x, None, shape, mask.float())
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*got list"):
        inpainting_grid(x, x, x, None, shape, mask.tolist())
    for color in ("red", ("1", "0", "0"), None):
        got = re.escape(repr(color))
        with pytest.raises(TypeError, match=rf"hidden_color must be a grey level or an RGB "
                                            rf"triple of numbers in \[0, 1\], got {got}"):
            inpainting_grid(x, x, x, None, shape, mask, hidden_color=color)
    with pytest.raises(ValueError, match=r"hidden_color must be a grey level or an RGB triple"):
        inpainting_grid(x, x, x, None, shape, mask, hidden_color=(1.0, 0.0))
    assert inpainting_grid(x, x, x, None, shape, mask, hidden_color=(1, 0, 1)).mode == "RGB"


def small_model(c=1, h=4, w=5, k=3, lat=2):
    return MixtureOfFactorAnalyzers(k, c * h * w, lat, generator=gen(0))


def test_factor_grid_layout():
    model = small_model()
    with torch.no_grad():
        model.loc.fill_(0.5)
        model.loadings.zero_()
        model.loadings[1, :, 0] = torch.linspace(-0.1, 0.1, 20)
    image = factor_grid(model, 1, (1, 4, 5), scale=2.0, padding=1)
    assert image.mode == "L"
    assert image.size == grid_size(2 + 3 * 2, 2 + 3 * 2, 4, 5, padding=1)
    cell = 5 + 1

    def pixel(column, x, y):
        return image.getpixel((1 + column * cell + x, 1 + y))

    assert pixel(0, 0, 0) == 128  # the mean, 0.5
    # μ − 2·A_1 at the first pixel: 0.5 + 0.2; at the last: 0.5 − 0.2.
    assert abs(pixel(2, 0, 0) - 0.7 * 255) <= 1 and abs(pixel(2, 4, 3) - 0.3 * 255) <= 1
    assert pixel(3, 0, 0) == 0 and pixel(3, 4, 3) == 255  # A_1 min-max normalised
    assert abs(pixel(4, 0, 0) - 0.3 * 255) <= 1  # μ + 2·A_1
    assert pixel(6, 0, 0) == 128  # a zero factor shows as mid grey

    several = factor_grid(model, [0, 2], (1, 4, 5), max_factors=1)
    assert several.size == grid_size(10, 5, 4, 5)
    rgb = factor_grid(small_model(c=3), 0, (3, 4, 5))
    assert rgb.mode == "RGB"


def test_factor_grid_takes_numpy_and_tensor_integers():
    """factor_grid(model, np.int64(0), ...) raised "'numpy.int64' object is not iterable"."""
    import numpy as np

    model = small_model()
    want = factor_grid(model, 1, (1, 4, 5)).tobytes()
    for k in (np.int64(1), torch.tensor(1), [np.int32(1)]):
        assert factor_grid(model, k, (1, 4, 5)).tobytes() == want
    with pytest.raises(ValueError, match=r"component must be in \[0, 3\), got 1\.0"):
        factor_grid(model, [1.0], (1, 4, 5))


def test_factor_grid_errors():
    model = small_model()
    with pytest.raises(ValueError, match=r"component must be in \[0, 3\), got 3"):
        factor_grid(model, 3, (1, 4, 5))
    with pytest.raises(ValueError, match=r"has 12 pixels but the model has n_features=20"):
        factor_grid(model, 0, (1, 3, 4))


def test_factor_grid_checks_max_factors():
    """max_factors=1.5 failed in range() ("'float' object cannot be interpreted as an
    integer") without naming max_factors."""
    import numpy as np

    model = small_model()
    with pytest.raises(TypeError, match=r"max_factors must be an int, got float"):
        factor_grid(model, 0, (1, 4, 5), max_factors=1.5)
    with pytest.raises(TypeError, match=r"max_factors must be an int, got bool"):
        factor_grid(model, 0, (1, 4, 5), max_factors=True)
    with pytest.raises(ValueError, match=r"max_factors must be >= 0, got -1"):
        factor_grid(model, 0, (1, 4, 5), max_factors=-1)
    one = factor_grid(model, 0, (1, 4, 5), max_factors=1)
    assert factor_grid(model, 0, (1, 4, 5), max_factors=np.int64(1)).tobytes() == one.tobytes()
    assert one.size == grid_size(5, 5, 4, 5)
    assert factor_grid(model, 0, (1, 4, 5), max_factors=0).size == grid_size(2, 2, 4, 5)


def test_sample_grid():
    model = small_model()
    image = sample_grid(model, 6, (1, 4, 5), nrow=3, generator=gen(2))
    assert image.size == grid_size(6, 3, 4, 5)
    again = sample_grid(model, 6, (1, 4, 5), nrow=3, generator=gen(2))
    assert list(image.tobytes()) == list(again.tobytes())


# ---------------------------------------------------------------------------- curves


def test_plot_training_curve_writes_a_png(tmp_path):
    history = [
        {"iteration": i, "train_log_likelihood": -100.0 + i, "val_log_likelihood": -101.0 + i,
         "seconds": 0.1}
        for i in range(1, 6)
    ]
    history[2]["val_log_likelihood"] = None
    path = plot_training_curve(history, tmp_path / "plots" / "curve.png", title="EM")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    path = plot_training_curve([], tmp_path / "empty.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    epochs = [{"epoch": 1, "train_log_likelihood": -5.0}]
    assert plot_training_curve(epochs, tmp_path / "sgd.png", keys=["train_log_likelihood"])


def test_plot_draws_one_line_per_em_restart(tmp_path):
    history = [{"run": run, "iteration": i, "train_log_likelihood": float(run + i)}
               for run in range(2) for i in range(1, 4)]
    path = plot_training_curve(history, tmp_path / "runs.png", keys=["train_log_likelihood"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_refuses_keys_given_as_one_string(tmp_path):
    """keys="train_log_likelihood" was taken character by character: a "no data" figure."""
    history = [{"iteration": i, "train_log_likelihood": float(i)} for i in range(1, 4)]
    with pytest.raises(TypeError, match=r"keys must be a sequence of record keys, got the "
                                        r"string 'train_log_likelihood'"):
        plot_training_curve(history, tmp_path / "c.png", keys="train_log_likelihood")
    assert not (tmp_path / "c.png").exists()


def test_plot_draws_a_key_at_its_x_offset(tmp_path, monkeypatch):
    """An EM record's train LL (the parameters before its M-step) and val LL (after it) were
    drawn at the same x: record i+1's train LL and record i's val LL score the same
    parameters. x_offsets moves a key's points; x_label says what x is."""
    saved = saved_figures(monkeypatch)
    history = [{"iteration": i, "train_log_likelihood": 10.0 + i, "val_log_likelihood": 5.0 + i}
               for i in range(1, 5)]
    plot_training_curve(history, tmp_path / "c.png", x_offsets={"train_log_likelihood": -1},
                        x_label="EM iterations (M-steps applied)")
    lines = drawn_lines(saved[-1])
    assert lines["train_log_likelihood"] == ([0, 1, 2, 3], [11.0, 12.0, 13.0, 14.0])
    assert lines["val_log_likelihood"] == ([1, 2, 3, 4], [6.0, 7.0, 8.0, 9.0])
    assert saved[-1].axes[0].get_xlabel() == "EM iterations (M-steps applied)"
    plot_training_curve(history, tmp_path / "c.png")  # by default: at x, labelled by its key
    lines = drawn_lines(saved[-1])
    assert lines["train_log_likelihood"][0] == lines["val_log_likelihood"][0] == [1, 2, 3, 4]
    assert saved[-1].axes[0].get_xlabel() == "iteration"
    runs = [dict(r, run=run) for run in range(2) for r in history]  # one line per run
    plot_training_curve(runs, tmp_path / "c.png", x_offsets={"train_log_likelihood": -0.5})
    lines = drawn_lines(saved[-1])
    assert lines["train_log_likelihood (run 1)"][0] == [0.5, 1.5, 2.5, 3.5]
    assert lines["val_log_likelihood (run 1)"][0] == [1, 2, 3, 4]


@pytest.mark.parametrize("x_offsets, error, match", [
    ({"loss": -1}, ValueError, r"x_offsets names 'loss', which is not one of keys"),
    ({"train_log_likelihood": "-1"}, TypeError,
     r"x_offsets\['train_log_likelihood'\] must be a finite number, got '-1'"),
    ({"train_log_likelihood": float("nan")}, TypeError, r"must be a finite number, got nan"),
    ([("train_log_likelihood", -1)], TypeError, r"x_offsets must be a mapping .*got list"),
])
def test_plot_checks_x_offsets(tmp_path, x_offsets, error, match):
    history = [{"iteration": 1, "train_log_likelihood": 1.0}]
    with pytest.raises(error, match=match):
        plot_training_curve(history, tmp_path / "c.png", x_offsets=x_offsets)
    assert not (tmp_path / "c.png").exists()


def test_plot_leaves_a_far_first_point_out_of_the_y_limits(tmp_path, monkeypatch):
    """EM's first val LL (under the weakest prior, -1205 where the rest lay in 1437..1513)
    flattened the whole curve. The y-limits now leave it out and the figure says so."""
    saved = saved_figures(monkeypatch)
    val = [-1204.9, 1437.6, 1465.6, 1490.6, 1513.1]
    train = [1730.5, 1937.8, 1648.4, 1683.5, 1703.2]
    history = [{"iteration": i + 1, "train_log_likelihood": t, "val_log_likelihood": v}
               for i, (t, v) in enumerate(zip(train, val, strict=True))]
    plot_training_curve(history, tmp_path / "c.png")
    (axes,) = saved[-1].axes
    low, high = axes.get_ylim()
    assert low > -1204.9 and low < 1437.6 and high > 1937.8  # every other point in view
    assert high - low < 1.2 * (1937.8 - 1437.6)
    assert drawn_lines(saved[-1])["val_log_likelihood"][1] == val  # still drawn, off scale
    notes = [text.get_text() for text in saved[-1].texts]  # (below the axes: the legend
    assert notes == ["first point off scale: val_log_likelihood -1205"]  # covered it inside)
    assert not axes.texts

    # Not left out: a first point within its line's range of it (1730.5 of train's
    # 1648..1938), a line of two points, a first point only just outside.
    for ys in ([-1204.9, 1437.6], [1400.0, 1437.6, 1465.6, 1490.6]):
        records = [{"iteration": i + 1, "val_log_likelihood": y} for i, y in enumerate(ys)]
        plot_training_curve(records, tmp_path / "c.png", keys=["val_log_likelihood"])
        (axes,) = saved[-1].axes
        assert axes.get_ylim()[0] < ys[0] and not saved[-1].texts


def test_plot_pairs_colours_by_run_and_styles_by_key_and_labels_units(tmp_path, monkeypatch):
    """A run's train and validation lines took unrelated colours; a bits/dim line was
    labelled in nats; integer epochs got ticks at 1.5; markers and run labels are drawn."""
    saved = saved_figures(monkeypatch)
    history = [{"run": run, "epoch": e, "train_log_likelihood": 1.0 * e + run,
                "val_log_likelihood": 0.5 * e + run} for run in range(2) for e in (1, 2)]
    plot_training_curve(history, tmp_path / "c.png", run_labels={1: "re-seed 1"},
                        markers=[(1.5, "prior changed"), (1.7, "prior changed")],
                        title="a long title " * 12)
    (axes,) = saved[-1].axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    train0, val0 = lines["train_log_likelihood (run 0)"], lines["val_log_likelihood (run 0)"]
    train1 = lines["train_log_likelihood (re-seed 1)"]
    assert train0.get_color() == val0.get_color() != train1.get_color()
    assert train0.get_linestyle() != val0.get_linestyle()
    marked = [line for line in axes.get_lines() if list(line.get_xdata()) in ([1.5, 1.5],
                                                                              [1.7, 1.7])]
    assert len(marked) == 2 and [m.get_label() for m in marked].count("prior changed") == 1
    assert all(float(t).is_integer() for t in axes.get_xticks())
    assert "\n" in axes.get_title()  # wrapped
    bits = [{"epoch": 1, "val_bits_per_dim": 5.0}, {"epoch": 2, "val_bits_per_dim": 4.9}]
    plot_training_curve(bits, tmp_path / "c.png", keys=["val_bits_per_dim"])
    assert saved[-1].axes[0].get_ylabel() == "bits per dimension"
    objective = [dict(r, train_objective=r["train_log_likelihood"] - 1) for r in history]
    plot_training_curve(objective, tmp_path / "o.png",  # (EM's MAP objective: nats too)
                        keys=["train_log_likelihood", "train_objective"])
    assert saved[-1].axes[0].get_ylabel() == "log-likelihood per sample (nats)"
    with pytest.raises(ValueError, match=r"mix units .*plot them in separate figures"):
        plot_training_curve(history, tmp_path / "d.png",
                            keys=["train_log_likelihood", "val_bits_per_dim"])
    assert not (tmp_path / "d.png").exists()


def test_plot_does_not_touch_pyplot(tmp_path):
    import sys

    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_training_curve([{"iteration": 1, "train_log_likelihood": 1.0}], tmp_path / "c.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_an_interrupted_save_leaves_the_earlier_file(tmp_path, monkeypatch):
    """Figures were written in place: Ctrl-C (or a full disk) during an --overwrite left a
    truncated PNG. Now the earlier file stays whole and no temporary is left behind."""
    path = tmp_path / "grid.png"
    save_image(Image.new("L", (4, 4), 200), path)
    before = path.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_image(Image.new("L", (4, 4), 0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    save_image(Image.new("L", (4, 4), 0), path, scale=2)
    assert Image.open(path).size == (8, 8)
    with pytest.raises(ValueError, match="unknown image file extension: 'grid.xyz'"):
        save_image(Image.new("L", (4, 4), 0), tmp_path / "grid.xyz")


def test_training_curve_is_written_whole(tmp_path):
    path = plot_training_curve([{"iteration": 1, "train_log_likelihood": 1.0}],
                               tmp_path / "curve.png")
    assert Image.open(path).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_numpy_numbers_are_numbers_to_the_figures(tmp_path, monkeypatch):
    """A numpy grey level fell through to the RGB branch ('numpy.float32' object is not
    iterable), and numpy values in a history were skipped as missing ("no data")."""
    import numpy as np

    shape = (1, 4, 4)
    x = torch.rand(2, 16, generator=gen(0))
    mask = make_mask("top", shape, 2)
    image = inpainting_grid(x, None, x, None, shape, mask, hidden_color=np.float32(0.5))
    assert image.mode == "L" and image.getpixel((2 + 6, 2)) == 128
    import matplotlib.axes

    drawn, original = [], matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *args, **kwargs):  # (the points the curve draws)
        drawn.append(list(ys))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    plot_training_curve([{"iteration": 1, "train_log_likelihood": np.float32(1.5)},
                         {"iteration": 2, "train_log_likelihood": np.float64(2.5)}],
                        tmp_path / "c.png")
    assert drawn == [[1.5, 2.5]]
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        viz.grid_size(3, 0, 4, 4)


# ------------------------------------------------------------- pixels of dequantised data


def every_level_dequantised(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel level p (uint8 [256]) with p/256, (p + 0.5)/256 and the largest ``dtype``
    value below (p + 1)/256 ([3, 256]): rows that stand for p, floor(256 x) = p."""
    p = torch.arange(256, dtype=torch.uint8)
    level = p.to(dtype)
    top = torch.nextafter((level + 1) / 256, torch.zeros((), dtype=dtype))
    return p, torch.stack([level / 256, (level + 0.5) / 256, top])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantised_rows_are_drawn_as_their_pixels(dtype):
    """image_grid drew round(255 x): p or p ± 1 for x = (p + u)/256. With dequantized=True it
    draws floor(256 x) = p, computed in x's dtype (a float64 row whose u is within 2^-33 of
    1 becomes (p + 1)/256 when cast to float32 first)."""
    p, x = every_level_dequantised(dtype)
    assert ((x * 256).floor() == p.double()).all()  # (the rows stand for p)
    image = image_grid(x.view(3, 1, 16, 16), nrow=3, padding=0, dequantized=True)
    cells = torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(16, 3, 16)
    for i in range(3):
        assert torch.equal(cells[:, i].reshape(-1), p)
    if dtype == torch.float64:  # (the case that casting first got wrong)
        assert ((x[2].float() * 256).floor() == p.float() + 1).all()
    old = image_grid(x.view(3, 1, 16, 16), nrow=3, padding=0)  # the default: round(255 x)
    old = torch.tensor(list(old.tobytes())).view(16, 3, 16)
    assert (old[:, 0].reshape(-1) != p.long()).sum() > 100  # p/256: p - 1 for p > 128


def test_pixel_over_255_rows_keep_their_rounding_by_default():
    p = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = (p.to(torch.float64) / 255).to(dtype)
        assert list(image_grid(x.view(1, 1, 16, 16), padding=0).tobytes()) == p.tolist(), dtype
    # (a value halfway between two levels rounds up; beyond [0, 1] clipped, NaN black)
    x = torch.tensor([[0.5 / 255, 1.5 / 255, -1.0, 2.0, float("nan"), float("inf")]])
    assert list(image_grid(x.view(1, 1, 1, 6), padding=0).tobytes()) == [1, 2, 0, 255, 0, 255]
    d = list(image_grid(x.view(1, 1, 1, 6), padding=0, dequantized=True).tobytes())
    assert d == [0, 1, 0, 255, 0, 255]  # floor(256·0.00196) = 0, floor(256·0.00588) = 1


def test_to_pixels_and_its_errors():
    x = torch.tensor([0.0, 0.3, 0.999, 1.0, 1.2, -0.2])
    assert viz.to_pixels(x).tolist() == [0, 77, 255, 255, 255, 0]  # round(255 x)
    assert viz.to_pixels(x, dequantized=True).tolist() == [0, 76, 255, 255, 255, 0]
    assert viz.to_pixels(x).dtype == torch.uint8
    with pytest.raises(TypeError, match=r"dequantized must be True or False, got 'yes'"):
        viz.to_pixels(x, dequantized="yes")
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype "
                                        r"torch.uint8"):
        viz.to_pixels(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"dequantized must be True or False, got 1"):
        image_grid(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), dequantized=1)


def test_inpainting_grid_draws_stored_pixels_and_dequantised_values():
    """uint8 originals are drawn as they are; the float columns as floor(256 x)."""
    shape, n = (1, 4, 4), 2
    pixels = torch.randint(0, 256, (n, 16), generator=gen(0), dtype=torch.uint8)
    u = torch.rand(n, 16, generator=gen(1))
    x = (pixels.float() + u) / 256
    mask = make_mask("bottom", shape, n)
    image = inpainting_grid(pixels, pixels, x, x.unsqueeze(0), shape, mask, hidden_color=0.0,
                            padding=0, dequantized=True)
    cells = torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(n, 4, 4, 4)
    for column in (0, 2, 3):  # original, mean, sample: all show the pixels
        assert torch.equal(cells[:, :, column].reshape(n, 16), pixels)
    masked = cells[:, :, 1].reshape(n, 16)
    assert torch.equal(masked[mask], pixels[mask]) and (masked[~mask] == 0).all()


def test_factor_grid_draws_a_dequantised_models_means_as_pixels():
    model = small_model()
    with torch.no_grad():
        model.loc.copy_(torch.rand(3, 20, generator=gen(4)))
        model.loadings.mul_(0.02)
    image = factor_grid(model, 0, (1, 4, 5), padding=0, dequantized=True)
    cells = torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(4, 8, 5)
    mu, a = model.means[0].detach().double(), model.factor_loadings[0].detach().double()
    floor = lambda v: (v * 256).floor().clamp(0, 255).to(torch.uint8)  # noqa: E731
    assert torch.equal(cells[:, 0].reshape(-1), floor(mu))
    assert torch.equal(cells[:, 2].reshape(-1), floor(mu - 2 * a[:, 0]))
    assert torch.equal(cells[:, 7].reshape(-1), floor(mu + 2 * a[:, 1]))
    default = factor_grid(model, 0, (1, 4, 5), padding=0)  # normalised cells: as before
    old = torch.tensor(list(default.tobytes()), dtype=torch.uint8).view(4, 8, 5)
    for column in (1, 3, 6):
        assert torch.equal(cells[:, column], old[:, column])
    assert not torch.equal(cells[:, 0], old[:, 0])
