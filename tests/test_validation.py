"""The finite checks of mfa._validation: the sum shortcut never changes the answer."""

import math
import re

import pytest
import torch

from mfa._validation import all_finite, all_not_inf, all_not_nan, check_finite

BIG = 3e38  # float32: two of these overflow a sum though each is finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "values",
    [
        [0.0, 1.0, -2.0],
        [BIG, BIG, BIG],  # the sum overflows (float32, float16): the element-wise fallback
        [-BIG, -BIG],
        [math.nan, 1.0],
        [math.inf, 1.0],
        [-math.inf, 1.0],
        [math.inf, -math.inf],  # the sum is NaN, not inf
        [math.nan, math.inf],
        [],
    ],
)
def test_checks_agree_with_elementwise_tests(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)  # float16 turns BIG into inf
    assert all_finite(x) == bool(torch.isfinite(x).all())
    assert all_not_nan(x) == (not bool(torch.isnan(x).any()))
    assert all_not_inf(x) == (not bool(torch.isinf(x).any()))


def test_a_single_bad_entry_in_a_large_tensor_is_found():
    x = torch.rand(1000, 300)
    assert all_finite(x) and all_not_nan(x) and all_not_inf(x)
    x[731, 17] = math.nan
    assert not all_finite(x) and not all_not_nan(x) and all_not_inf(x)
    x[731, 17] = -math.inf
    assert not all_finite(x) and all_not_nan(x) and not all_not_inf(x)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*-inf at index \(731, 17\)"):
        check_finite(x, "x")


def test_integer_tensors_are_finite():
    assert all_finite(torch.arange(5)) and all_not_nan(torch.arange(5))


@pytest.mark.parametrize("make,field", [
    (lambda: __import__("mfa").EMConfig(tol=10**400), "EMConfig.tol"),
    (lambda: __import__("mfa").EMConfig(noise_prior_variance=10**400),
     "EMConfig.noise_prior_variance"),
    (lambda: __import__("mfa").SGDConfig(lr=10**400), "SGDConfig.lr"),
    (lambda: __import__("mfa").EMConfig(device=5), "EMConfig.device"),
])
def test_config_fields_refuse_huge_ints_and_non_string_devices(make, field):
    """An int beyond float's range raised a bare OverflowError, and device=5 passed (torch
    reads it as cuda:5) to fail later naming no field; both name the field now."""
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} must be"):
        make().validate()


def test_numpy_integers_are_ints_for_sizes_and_counts(tmp_path):
    """bits_per_dim(ll, x.shape[1]) of a numpy array, a model sized from numpy counts: numpy
    integers were refused as 'must be an int, got int64'."""
    import numpy as np

    from mfa import MixtureOfFactorAnalyzers
    from mfa.checkpoint import load_checkpoint, save_checkpoint
    from mfa.metrics import bits_per_dim, n_parameters

    assert bits_per_dim(0.0, np.int64(784)) == pytest.approx(8.0)
    assert n_parameters(np.int32(3), np.int64(10), np.int16(2)) == n_parameters(3, 10, 2)
    model = MixtureOfFactorAnalyzers(np.int64(2), np.int64(5), np.int64(1))
    assert type(model.n_components) is int and type(model.n_factors) is int
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model)).model
    assert loaded.n_components == 2
    with pytest.raises(TypeError, match="n_dims must be an int, got float"):
        bits_per_dim(0.0, 784.0)
    with pytest.raises(TypeError, match="n_dims must be an int, got bool"):
        bits_per_dim(0.0, np.bool_(True))
