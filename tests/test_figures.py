"""Tests of mfa.figures: the output checks made before training."""

from __future__ import annotations

import pytest

from mfa.config import OutputConfig
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
