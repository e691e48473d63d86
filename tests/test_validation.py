"""The finite checks of mfa._validation: the sum shortcut never changes the answer."""

import math
import re
import warnings

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


def test_config_fields_take_numpy_numbers_and_store_python_ones():
    """A value from np.arange or a float32 grid was refused with a message its value met
    ("must be a finite number > 0, got np.float32(0.01)"); now it is taken and stored as a
    Python number (configs are saved as YAML/JSON). A tensor is refused naming its type."""
    import numpy as np

    from mfa import EMConfig, SGDConfig
    from mfa.config import RunConfig, validate_config
    from mfa.hierarchical_config import HierarchicalConfig, validate_hierarchical_config
    from mfa.metrics import bits_per_dim

    config = SGDConfig(lr=np.float32(0.01), batch_size=np.int64(64), epochs=np.int64(3),
                       noise_prior_variance=np.float64(0.5))
    config.validate()
    assert (type(config.lr), type(config.batch_size), type(config.epochs)) == (float, int, int)
    assert config.lr == pytest.approx(0.01) and config.batch_size == 64
    assert type(config.noise_prior_variance) is float and config.noise_prior_variance == 0.5
    em = EMConfig(tol=np.float64(1e-3), max_iter=np.int32(5), min_delta=np.float16(0))
    em.validate()
    assert (type(em.tol), type(em.max_iter), type(em.min_delta)) == (float, int, float)
    assert bits_per_dim(0.0, 10, scale=np.float32(256.0)) == pytest.approx(8.0)
    with warnings.catch_warnings():  # (a float32 s₀ compared with 1e308 overflowed)
        warnings.simplefilter("error")
        EMConfig(noise_prior_variance=np.float32(0.01)).validate()
        SGDConfig(noise_prior_variance=np.float16(0.01)).validate()
    hier = HierarchicalConfig(min_child_rows=np.int64(5))
    validate_hierarchical_config(hier)
    assert type(hier.min_child_rows) is int
    run = RunConfig()
    run.train.em.tol, run.model.n_components = np.float32(1e-3), np.int64(7)
    run = validate_config(run)
    assert type(run.train.em.tol) is float and type(run.model.n_components) is int
    with pytest.raises(ValueError, match=r"SGDConfig.lr must be .* \(a Tensor: pass a Python"):
        SGDConfig(lr=torch.tensor(0.01)).validate()
    with pytest.raises(ValueError, match="SGDConfig.epochs must be an int >= 1"):
        SGDConfig(epochs=np.float64(3.0)).validate()
    with pytest.raises(ValueError, match="SGDConfig.lr must be a finite number > 0"):
        SGDConfig(lr=np.float32("nan")).validate()


def test_a_generator_on_another_device_than_the_model_is_refused_by_name():
    """sample, conditional_sample and inpaint say the generator must be on the model's
    device; one elsewhere failed inside torch at its first draw (conditional_sample: after
    its first chunk's work). Checked against a device name here (no second device)."""
    from mfa._validation import check_generator

    check_generator(torch.Generator(), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"generator is on cpu but the model is on cuda:0: make "
                                         r"it with torch.Generator\(device='cuda:0'\)"):
        check_generator(torch.Generator(), device=torch.device("cuda:0"))
