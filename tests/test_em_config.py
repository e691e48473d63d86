"""Tests of mfa.em_config (EMConfig): the limits validate() draws, each side of them, and the
defaults the docs report."""

from __future__ import annotations

import pytest

from mfa.em import EMConfig, EMTrainer


@pytest.mark.parametrize("field, refused, accepted", [
    ("quantization_variance", 0.0, 1e-12),  # a variance: > 0
    ("search_per_decade", 0, 1),  # a grid of no points a decade
    ("max_searches", 0, 1),  # "auto" searches at least once
    ("search_warmup", -1, 0),
    ("patience", -1, 0),
    ("reseed_rounds", -1, 0),
    ("val_fraction", 1.0, 0.999),  # every row held out leaves none to train on
    ("val_fraction", -0.1, 0.0),
    ("min_delta", -1e-4, 0.0),
    ("min_component_mass", -1.0, 0.0),
    ("max_iter", -1, 0),  # 0: initialise only
    ("complete_iter", -1, 0),
    ("kmeans_iter", 0, 1),
    ("batch_size", 0, 1),
    ("seed", -1, 0),
    ("variance_floor", 0.0, 1e-30),  # a floor of 0 lets a variance reach 0: > 0
    ("checkpoint_every", -1, 0),
])
def test_each_limit_is_refused_beyond_and_accepted_at(field, refused, accepted):
    with pytest.raises(ValueError, match=rf"^EMConfig\.{field} .*got {refused!r}"):
        EMConfig(**{field: refused}).validate()
    EMConfig(**{field: accepted}).validate()
    EMTrainer(EMConfig(**{field: accepted}))


@pytest.mark.parametrize("field", ["tempered_step", "allow_tf32", "progress"])
def test_switches_take_a_bool_only(field):
    """A YAML "yes" is a bool but "on" typed as a string, or 1, is not a switch."""
    for value in ("yes", 1):
        with pytest.raises(ValueError, match=rf"^EMConfig\.{field} "):
            EMConfig(**{field: value}).validate()
    for value in (True, False):
        EMConfig(**{field: value}).validate()


def test_the_device_is_checked():
    with pytest.raises(ValueError, match=r"^EMConfig\.device .*got 'gpu0'"):
        EMConfig(device="gpu0").validate()
    for device in (None, "cpu", "cuda", "cuda:1"):  # (checked here, resolved by fit)
        EMConfig(device=device).validate()


def test_restarts_need_a_random_initialisation():
    """n_init > 1 restarts from the same model when init is "none": refused; one start
    from the model as it is, or restarts of a random init, are fine."""
    with pytest.raises(ValueError, match=r"EMConfig\.n_init=2 > 1 needs a random EMConfig"
                                         r"\.init \('kmeans' or 'random'\), got 'none'"):
        EMConfig(init="none", n_init=2).validate()
    EMConfig(init="none", n_init=1).validate()
    EMConfig(init="random", n_init=2).validate()


def test_the_defaults_are_those_the_docs_report():
    """docs/results.md states the settings of EMTrainer(EMConfig(seed=0, progress=False)),
    README.md the early-stopping margin and re-seeding rounds, docs/benchmarks.md TF32 off,
    docs/data.md the initialisation subsample (configs/*.yaml write the same values)."""
    documented = {
        "max_iter": 100, "tol": 1e-4, "variance_floor": 1e-6, "noise_prior_strength": 1.0,
        "noise_prior_variance": "auto", "weight_concentration": 1.0, "loading_ridge": 0.0,
        "quantization_variance": 1 / (12 * 256**2), "search_warmup": 1, "max_searches": 4,
        "search_per_decade": 4, "patience": 5, "min_delta": 1e-4, "reseed_rounds": 3,
        "tempered_step": True, "allow_tf32": False, "init_samples": 50_000,
        "val_fraction": 0.1, "stats_dtype": "auto", "init": "kmeans", "n_init": 1,
        "missing": "error", "device": None, "min_component_mass": 0.0,
        # the library's trainer saves at the end only; a run's config every iteration
        # (README: a run takes embedded-mnist.yaml's values, not EMConfig's class defaults)
        "checkpoint_every": 0,
    }
    config = EMConfig()
    assert {name: getattr(config, name) for name in documented} == documented


def test_missing_is_error_or_allow():
    with pytest.raises(ValueError, match=r"^EMConfig\.missing .*got 'ignore'"):
        EMConfig(missing="ignore").validate()
    for value in ("error", "allow"):
        EMConfig(missing=value).validate()
