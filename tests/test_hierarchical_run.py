"""HierarchicalRunTrainer: the hierarchical trainer behind a run's trainer interface."""

from __future__ import annotations

import torch
from helpers import gen

from mfa import MixtureOfFactorAnalyzers
from mfa.data import ImageDataset
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer
from mfa.hierarchical_run import HierarchicalRunTrainer


def test_the_stages_are_fitted_on_the_run_models_device(monkeypatch):
    """A dataset (the form of data above STREAM_ABOVE, e.g. CelebA) is on no device: the
    stages were fitted on the CPU whatever the run's device was. The run's model now says
    where (tests/test_cuda_workflow.py checks a CUDA run end to end)."""
    seen = {}
    real_fit = HierarchicalTrainer.fit

    def spy(self, data, validation=None, **kwargs):
        seen["device"] = kwargs.get("device")
        return real_fit(self, data, validation, **kwargs)

    monkeypatch.setattr(HierarchicalTrainer, "fit", spy)
    pixels = torch.randint(0, 256, (300, 6), generator=gen(0), dtype=torch.uint8)
    model = MixtureOfFactorAnalyzers(2, 6, 1, dtype=torch.float64)
    cfg = HierarchicalConfig(root_components=2, n_factors=1, rows_per_component=60)
    flat = HierarchicalRunTrainer(cfg).fit(model, ImageDataset(pixels, dtype=torch.float64))
    assert seen["device"] == model.device
    assert flat.device == model.device
