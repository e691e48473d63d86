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
