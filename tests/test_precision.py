"""The E-step's precision modes (mfa.precision): what "auto" resolves to and which modes
exist. The modes' accuracy against float64 is tested with the statistics
(tests/test_statistics.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import F64

from mfa.precision import STATS_DTYPES, resolve_stats_dtype


def test_resolve_stats_dtype():
    assert resolve_stats_dtype("auto", "cpu", torch.float32) == "centred"
    assert resolve_stats_dtype("auto", "cpu", F64) == "float64"
    for mode in ("float64", "precise", "centred", "mixed", "centred32", "float32"):
        assert resolve_stats_dtype(mode, "cpu", torch.float32) == mode
    with pytest.raises(ValueError, match="stats_dtype must be one of"):
        resolve_stats_dtype("float16", "cpu", torch.float32)


def test_modes_are_the_configs_choices():
    """EMConfig accepts every mode and refuses others by name."""
    from mfa.em import EMConfig

    for mode in STATS_DTYPES:
        EMConfig(stats_dtype=mode).validate()
    with pytest.raises(ValueError, match="stats_dtype"):
        EMConfig(stats_dtype="bfloat16").validate()


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 0), "float64"), ((7, 0), "float64"), ((8, 0), "float64"), ((9, 0), "float64"),
    ((6, 1), "centred"), ((7, 5), "centred"), ((8, 6), "centred"), ((8, 9), "centred"),
    ((12, 0), "centred"),
])
def test_auto_on_a_cuda_device_follows_its_float64_rate(monkeypatch, capability, expected):
    """"auto" on CUDA (no GPU needed: the device's compute capability is all it reads):
    "float64" on the full-rate float64 chips (P100 6.0, V100 7.0, A100 8.0, H100/H200 9.0),
    "centred" on the consumer and workstation ones (6.1, 7.5, 8.6, 8.9, 12.0), whose float64
    runs at 1/32-1/64 of float32; a float64 model is "float64" on every device."""
    asked = []

    def capability_of(device=None):
        asked.append(torch.device(device))
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert resolve_stats_dtype("auto", "cuda:1", torch.float32) == expected
    assert asked == [torch.device("cuda:1")]  # (the model's own device, not the current one)
    assert resolve_stats_dtype("auto", torch.device("cuda"), F64) == "float64"
    for mode in STATS_DTYPES[1:]:  # an explicit mode is the user's on any device
        assert resolve_stats_dtype(mode, "cuda", torch.float32) == mode
