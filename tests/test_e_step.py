"""mfa.e_step: the streamed pass equals one batch's statistics, and is EMTrainer.e_step."""

from __future__ import annotations

import torch
from helpers import random_data, random_model

from mfa._data_stream import DataSource
from mfa.e_step import streamed_e_step
from mfa.em import EMTrainer
from mfa.statistics import accumulate_statistics


def test_streamed_e_step_equals_one_batch_and_is_the_trainers():
    model = random_model(3, 5, 2, "diagonal", seed=8)
    x = random_data(150, model, seed=9)
    got = streamed_e_step(model, DataSource(x, model, 40), "float64")
    ref = accumulate_statistics(model, x, model.component_terms())
    for name in ("mass", "sum_x", "sum_x2", "sum_xz", "sum_z", "sum_zz", "log_likelihood"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-10,
                                   atol=1e-10, msg=name)
    assert EMTrainer.e_step is streamed_e_step
