"""The validation-chosen settings of a default EM fit on CUDA against the CPU: the noise prior
searches (golden section, warm-start hill climb, the repeated search's ``above`` walk), the
tempered step's one-standard-error rule (``mfa.tempering._one_standard_error``), the whole
default fit (search, re-seeding round, tempered step) and a resumed fit whose saved state
was read onto the CPU. Float64 models, so every discrete choice must agree exactly. Skipped
where no CUDA device is present, as ``tests/test_cuda_paths.py``.

``MFA_CUDA_TEST_DEVICE=cpu`` runs them CPU against CPU: a dry run of the test code only
(they compare nothing then), for machines without a GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import CUDA_TEST_DEVICE, cuda_test_marks, gen, initialise_on_the_cpu

from mfa import (
    ConvergenceWarning,
    EMConfig,
    EMTrainer,
    MixtureOfFactorAnalyzers,
    tempering,
    training,
)
from mfa._data_stream import DataSource
from mfa.prior_search import choose_noise_variance
from mfa.priors import QUANTIZATION_VARIANCE, Prior

DEVICE = CUDA_TEST_DEVICE
pytestmark = cuda_test_marks()
F64 = torch.float64
FLOOR = 1.00002e-6  # (the trainer's floor for min_noise = 0)


def _image_like(n, d=24, k=6, lat=2, seed=0):
    """Float64 rows in about [0, 1] with few rows per component (the step's regime)."""
    g = gen(seed)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.full((k,), 1.0 / k, dtype=F64),
        0.2 + 0.6 * torch.rand(k, d, generator=g, dtype=F64),
        0.15 * torch.randn(k, d, lat, generator=g, dtype=F64),
        torch.full((k, d), 2e-3, dtype=F64))
    x, _ = truth.sample(n, generator=g)
    return x


def _fitted(train, k=6, lat=2, iters=4):
    """A K-means start and a few MAP EM iterations, on the CPU (both devices start here)."""
    model = MixtureOfFactorAnalyzers(k, train.shape[1], lat, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(max_iter=iters, tol=0.0, progress=False, val_fraction=0.0,
                           noise_prior_variance=1e-4, reseed_rounds=0, batch_size=64)
                  ).fit(model, train)
    return model


def _both(fn):
    """``fn(device)`` on the CPU and on DEVICE."""
    return fn("cpu"), fn(DEVICE)


COMMON = dict(lower=QUANTIZATION_VARIANCE, per_decade=4, variance_floor=FLOOR)


def _on(device, start, x, temperature):
    """``start`` copied to ``device``, its validation source (rows 300 on) and the float64
    E-step statistics of rows 0-299 (tempered by ``temperature`` unless ``None``)."""
    model = copy.deepcopy(start).to(device)
    source = DataSource(x[:300].to(device), model, 64)
    validation = DataSource(x[300:].to(device), model, 64)
    stats = (EMTrainer.e_step(model, source, "float64") if temperature is None
             else EMTrainer.e_step(model, source, "float64", [temperature])[0])
    return model, validation, stats


def test_noise_prior_searches_on_cuda_match_cpu():
    """The three walks of choose_noise_variance score the same candidates and choose the same
    s0 on both devices (the E-step's statistics and the validation passes on the GPU)."""
    x = _image_like(400)
    start = _fitted(x[:300])

    def run(device):
        model, validation, stats = _on(device, start, x, None)
        prior = Prior(1.0, QUANTIZATION_VARIANCE)
        golden = choose_noise_variance(model, stats, validation, prior, **COMMON)
        near = choose_noise_variance(model, stats, validation, prior, near=1e-3, **COMMON)
        above = choose_noise_variance(model, stats, validation, prior, above=golden[0],
                                      **COMMON)
        assert model.means.device.type == torch.device(device).type
        return golden, near, above

    cpu, cuda = _both(run)
    for (s_cpu, scored_cpu), (s_cuda, scored_cuda) in zip(cpu, cuda, strict=True):
        assert s_cuda == s_cpu
        assert [c for c, _ in scored_cuda] == [c for c, _ in scored_cpu]
        assert [v for _, v in scored_cuda] == pytest.approx([v for _, v in scored_cpu],
                                                            rel=1e-9, abs=1e-9)


def test_one_standard_error_rule_on_cuda_matches_cpu():
    """The tempered step's one-standard-error rule from the best-scoring s0 of a tempered
    M-step: the same s0 taken, the same per-row log p (returned on the CPU), the model left
    as it was, on both devices; the rule must have stepped at least once (else it tested
    nothing)."""
    x = _image_like(400)
    start = _fitted(x[:300])

    def run(device):
        model, validation, stats = _on(device, start, x, float(x.shape[1]))  # T = D
        prior = Prior(16.0, QUANTIZATION_VARIANCE)
        best, _ = choose_noise_variance(model, stats, validation, prior, **COMMON)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        chosen, rows, mean = tempering._one_standard_error(
            model, stats, validation, prior, best, saved=training.clone_params(model),
            **COMMON)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
        assert all(r.device.type == "cpu" and r.dtype == F64 for r in rows)
        return best, chosen, torch.cat(rows), mean

    (best_cpu, chosen_cpu, rows_cpu, mean_cpu), (best_cuda, chosen_cuda, rows_cuda,
                                                  mean_cuda) = _both(run)
    assert chosen_cpu > best_cpu, "the rule did not step: pick data where it does"
    assert (best_cuda, chosen_cuda) == (best_cpu, chosen_cpu)
    torch.testing.assert_close(rows_cuda, rows_cpu, rtol=1e-9, atol=1e-9)
    assert mean_cuda == pytest.approx(mean_cpu, rel=1e-12)


def test_default_em_fit_on_cuda_matches_cpu(monkeypatch):
    """EMConfig's defaults (the automatic s0 search, a re-seeding round, the tempered step
    with its one-standard-error rule) on a float64 model: the same choices, history and
    parameters on both devices (the K-means start drawn on the CPU for both: a CUDA
    generator's numbers differ)."""
    initialise_on_the_cpu(monkeypatch)
    x = _image_like(300)
    train, val = x[:150], x[150:]  # 15 rows a component: re-seeding rounds run
    start = MixtureOfFactorAnalyzers(10, x.shape[1], 2, dtype=F64)

    def run(device):
        model = copy.deepcopy(start)
        trainer = EMTrainer(EMConfig(max_iter=30, progress=False, device=device,
                                     batch_size=64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            trainer.fit(model, train.to(device), validation=val.to(device))
        assert model.means.device.type == torch.device(device).type
        return trainer, model.cpu()

    (cpu_t, cpu), (cuda_t, cuda) = _both(run)
    # what this test must exercise (on the CPU: 2 re-seeding rounds, the step applied, the
    # one-standard-error rule one grid step up from the best s0)
    assert {h["run"] for h in cpu_t.history} == {0, 1, 2}
    assert cpu_t.tempered.applied
    assert cpu_t.tempered.noise_prior_variance > cpu_t.tempered.best_noise_prior_variance
    assert cuda_t.selected_noise_prior_variance == cpu_t.selected_noise_prior_variance
    assert (cuda_t.tempered.temperature, cuda_t.tempered.noise_prior_strength,
            cuda_t.tempered.best_noise_prior_variance, cuda_t.tempered.noise_prior_variance,
            cuda_t.tempered.applied) == (
        cpu_t.tempered.temperature, cpu_t.tempered.noise_prior_strength,
        cpu_t.tempered.best_noise_prior_variance, cpu_t.tempered.noise_prior_variance,
        cpu_t.tempered.applied)
    assert [(h["run"], h["iteration"]) for h in cuda_t.history] == [
        (h["run"], h["iteration"]) for h in cpu_t.history]
    for name in ("weights", "means", "factor_loadings", "noise_variance"):
        torch.testing.assert_close(getattr(cuda, name), getattr(cpu, name), rtol=1e-6,
                                   atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_em_resumed_on_cuda_from_a_state_read_onto_the_cpu():
    """load_checkpoint reads a trainer state onto the CPU (map_location="cpu"); resumed with
    the model on CUDA after the best validation iteration, the fit compared the saved best
    parameters (CPU) with the model's (CUDA) in torch.equal."""
    x = _image_like(500)
    train, val = x[:350], x[350:]
    saved = {}

    def keep(trainer, model, record):
        state = trainer.state_dict()
        if state.get("bad_iterations", 0) >= 1 and not record["early_stop"]:
            saved["state"] = copy.deepcopy(state)
            saved["model"] = {k: v.cpu() for k, v in model.state_dict().items()}

    cfg = dict(max_iter=40, progress=False, batch_size=64, reseed_rounds=0,
               tempered_step=False, patience=2, noise_prior_variance=1e-4)
    model = MixtureOfFactorAnalyzers(6, x.shape[1], 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMTrainer(EMConfig(device=DEVICE, **cfg)).fit(model, train.to(DEVICE),
                                                      validation=val.to(DEVICE),
                                                      callbacks=[keep])
    whole = {k: v.cpu() for k, v in model.state_dict().items()}
    assert "state" in saved, "no iteration after the best one: change the data"
    state = torch.utils._pytree.tree_map(  # as load_checkpoint(map_location="cpu") gives it
        lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, saved["state"])
    resumed = MixtureOfFactorAnalyzers(6, x.shape[1], 2, dtype=F64)
    resumed.load_state_dict(saved["model"])
    trainer = EMTrainer(EMConfig(device=DEVICE, **cfg))
    trainer.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(resumed, train.to(DEVICE), validation=val.to(DEVICE))
    assert resumed.means.device.type == torch.device(DEVICE).type
    for name, value in resumed.state_dict().items():  # resumed exactly
        assert torch.equal(value.cpu(), whole[name]), name
