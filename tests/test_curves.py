"""Tests of mfa._curves (plot_training_curve): what the figure draws, read back from the
saved matplotlib figure, against hand-made histories."""

from __future__ import annotations

from helpers import drawn_lines, saved_figures

from mfa._curves import plot_training_curve


def test_values_that_are_not_numbers_are_skipped_like_missing_ones(tmp_path, monkeypatch):
    """A record's None, a string or a bool is no point of the line (a string was read with
    float(): "-3.5" was drawn, "n/a" stopped the figure)."""
    saved = saved_figures(monkeypatch)
    history = [{"iteration": 1, "train_log_likelihood": -4.0},
               {"iteration": 2, "train_log_likelihood": None},
               {"iteration": 3, "train_log_likelihood": "-3.5"},
               {"iteration": 4, "train_log_likelihood": True},
               {"iteration": 5, "train_log_likelihood": "n/a"},
               {"iteration": 6, "train_log_likelihood": -3.0}]
    plot_training_curve(history, tmp_path / "c.png", keys=["train_log_likelihood"])
    assert drawn_lines(saved[-1]) == {"train_log_likelihood": ([1, 6], [-4.0, -3.0])}


def test_a_far_first_point_above_the_line_is_left_out_too(tmp_path, monkeypatch):
    """A bits/dim curve falls: its first point lies above the rest. It is left out of the
    y-limits and named below the axes, as a first point far below is."""
    saved = saved_figures(monkeypatch)
    bits = [9.0, 4.1, 4.0, 3.95, 3.9]  # the others span 0.2: 9.0 is 4.9 above them
    history = [{"epoch": i + 1, "val_bits_per_dim": b} for i, b in enumerate(bits)]
    plot_training_curve(history, tmp_path / "c.png", keys=["val_bits_per_dim"])
    (axes,) = saved[-1].axes
    low, high = axes.get_ylim()
    margin = 0.05 * (4.1 - 3.9)
    assert (low, high) == (3.9 - margin, 4.1 + margin)
    assert [t.get_text() for t in saved[-1].texts] == ["first point off scale: "
                                                       "val_bits_per_dim 9"]


def test_a_far_first_point_within_another_lines_range_stays_in_view_unnamed(
        tmp_path, monkeypatch):
    """The train line's first point (0) is far from its own others (10..10.2) but inside
    the validation line's range (-5..20): it is in view, so no note names it off scale."""
    saved = saved_figures(monkeypatch)
    train, val = [0.0, 10.0, 10.1, 10.2], [-5.0, 0.0, 20.0, 5.0]
    history = [{"iteration": i + 1, "train_log_likelihood": t, "val_log_likelihood": v}
               for i, (t, v) in enumerate(zip(train, val, strict=True))]
    plot_training_curve(history, tmp_path / "c.png")
    (axes,) = saved[-1].axes
    low, high = axes.get_ylim()
    assert low < -5.0 and high > 20.0
    assert not saved[-1].texts and not axes.texts


def test_a_flat_line_after_a_far_first_point_gets_half_a_unit_of_margin(tmp_path, monkeypatch):
    """The other points all equal (a range of 0): the y-limits are their value ± 0.5 (5 %
    of it where that is more), not a range too thin to read."""
    saved = saved_figures(monkeypatch)
    for flat, margin in ((5.0, 0.5), (100.0, 5.0)):
        history = [{"iteration": i + 1, "val_log_likelihood": y}
                   for i, y in enumerate([flat - 50, flat, flat, flat])]
        plot_training_curve(history, tmp_path / "c.png", keys=["val_log_likelihood"])
        assert saved[-1].axes[0].get_ylim() == (flat - margin, flat + margin)
        assert [t.get_text() for t in saved[-1].texts] == [
            f"first point off scale: val_log_likelihood {flat - 50:.4g}"]
