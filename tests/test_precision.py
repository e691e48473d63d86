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


def _terms(means, factors, noise):
    """The three fields of mfa._terms.ComponentTerms the checks read (float64 inputs)."""
    from types import SimpleNamespace

    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    return SimpleNamespace(means=t(means), factors=None if factors is None else t(factors),
                           inv_noise=1.0 / t(noise))


def test_float64_components_by_hand():
    """Which components the "float32" sums (moments: (μ−c)² + |a|²) and the "mixed" ones
    (|μ−c|·|a| + |a|²) send to float64: those with ε₃₂·max_j v_j/d_j above 1e-3, i.e.
    v/d above 8389 in some feature. K = 3, D = 2, L = 1, all by hand:
    component 0, 100 from c without loadings: 1e4 for the moments, 0 for "mixed";
    component 1 at c, loadings 100: 1e4 for both;
    component 2, 1 from c in feature 1, noise 1e-4 there, loadings 0.5: 1e4 + 2.5e3 for the
    moments, 5e3 + 2.5e3 = 7.5e3 (below) for "mixed". float64 rows: none."""
    from mfa.precision import float64_components

    terms = _terms(means=[[100.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
                   factors=[[[0.0], [0.0]], [[100.0], [0.0]], [[0.0], [0.5]]],
                   noise=[[1.0, 1.0], [1.0, 1.0], [1.0, 1e-4]])
    assert float64_components(terms, torch.float32).tolist() == [0, 1, 2]
    assert float64_components(terms, torch.float32, moments=False).tolist() == [1]
    assert float64_components(terms, F64) is None
    assert float64_components(terms, F64, moments=False) is None
    # without loadings (L = 0): the moments alone
    plain = _terms(means=[[100.0, 0.0], [50.0, 0.0]], factors=None, noise=[[1.0, 1.0]] * 2)
    assert float64_components(plain, torch.float32).tolist() == [0]
    assert float64_components(plain, torch.float32, moments=False) is None


def test_far_from_reference_by_hand():
    """far_from_reference: ε·max_kj (μ_kj − c_j)²/d_kj above the limit, by hand. float32 at
    FAR_LIMIT (1e-2, i.e. a spread of 83,886): one entry 300 from c (9e4) is far, whichever
    component and feature holds it; 250 (6.25e4) is not. float64 at FLOAT64_FAR_LIMIT (1e-7,
    a spread of 4.5e8): 3e4 from c (9e8) is, 1.5e4 (2.25e8) is not; noise 1e-2 makes 3e3 so."""
    from mfa.precision import FAR_LIMIT, FLOAT64_FAR_LIMIT, far_from_reference

    def far(offset, dtype, limit=FAR_LIMIT, noise=1.0):
        means = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        means[1][2] = offset
        return far_from_reference(_terms(means, None, [[noise] * 3] * 2), dtype, limit)

    assert far(300.0, torch.float32) and far(-300.0, torch.float32)
    assert not far(250.0, torch.float32)
    assert far(3e4, F64, FLOAT64_FAR_LIMIT) and not far(1.5e4, F64, FLOAT64_FAR_LIMIT)
    assert far(3e3, F64, FLOAT64_FAR_LIMIT, noise=1e-2)
    assert not far(300.0, F64)  # (float64's ε at float32's limit)
