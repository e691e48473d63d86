"""The float64 fallbacks of float32 models on CUDA, against dense float64 references: the
conditioning paths that take ill-conditioned or rank-deficient components in float64
(mfa.conditioning, mfa.inference: masked ``observed_log_prob``, ``conditional_mean``,
``inpaint``, ``condition``) and the ``"centred32"`` E-step's split of its pair sums, which
takes the components too sharp for float32 in float64 (mfa.owner_sums, mfa.statistics,
mfa.exact_components). Skipped where no CUDA device is present, as
``tests/test_cuda_paths.py``.

Each test also checks that its fallback ran on the device (the float64 calls, on it), so a
pass means the float64 path was compared, not a float32 one that happened to be close.

``MFA_CUDA_TEST_DEVICE=cpu`` runs them on the CPU: a dry run of the test code, for machines
without a GPU (the CPU suite covers the same paths there).
"""

from __future__ import annotations

import copy

import torch
from helpers import CUDA_TEST_DEVICE, DenseMixture, cuda_test_marks, gen
from test_inference import (
    _dense_conditional_mean,
    _dense_observed_log_prob,
    _few_observed_case,
    _heywood_case,
    _near_parallel_case,
    _random_masks,
)

from mfa import MixtureOfFactorAnalyzers, conditioning
from mfa.inference import inpaint

DEVICE = CUDA_TEST_DEVICE
pytestmark = cuda_test_marks("no_tf32")
F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7

#: The bound of a float64 fallback's result, in float32 ulps of the largest value compared:
#: the float64 result is rounded to float32 (half an ulp), and the few float32 operations
#: after it (the softmax over K = 3 components, the mean's weighted sum over K and L) add a
#: few roundings of values no larger. Measured on the CPU: 0.3 to 1.0 ulp of the largest
#: value in every case below; the float32 paths these fallbacks replace were 10⁴ to 10⁸ ulps
#: off (tests/test_inference.py: 1.3 to 76 nats, conditional means off by 1.7 to 9.9).
ULPS = 32



def _assert_within_ulps(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``|got − expected| ≤ ULPS·ε₃₂·max |expected|`` (``got`` from the device, float32)."""
    got, expected = got.detach().cpu().double(), expected.detach().double()
    scale = max(float(expected.abs().max()), 1.0)
    error = float((got - expected).abs().max())
    assert error <= ULPS * EPS32 * scale, (what, error, scale)


def _spy_float64_calls(monkeypatch, name: str) -> list[torch.device]:
    """The devices of the calls of ``mfa.conditioning.<name>`` whose tensors are float64
    (its float64 recursion: the fallback)."""
    real, calls = getattr(conditioning, name), []

    def spy(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if name == "row_posterior":
            tensors = [args[1]]  # x (the terms are a dataclass)
        if tensors and all(t.dtype == F64 for t in tensors):
            calls.append(tensors[0].device)
        return real(*args, **kwargs)

    monkeypatch.setattr(conditioning, name, spy)
    return calls


def _on_device(calls: list[torch.device]) -> bool:
    return bool(calls) and all(d.type == torch.device(DEVICE).type for d in calls)


# ---------------------------------------------------------------------- conditioning


def test_float32_heywood_inference_on_cuda_matches_the_dense_reference(monkeypatch):
    """One noise variance at 1e-7 under loadings of size 1 (a Heywood case, always
    observed): the masked rows whose capacitance is too ill-conditioned for float32, and
    condition()'s component conditionals (ε·cond(M_o) above CONDITION_TOLERANCE), are taken
    in float64 on the device; log p(x_o), E[x_h | x_o], inpaint's mean and the conditional
    mixture match the dense block formulas of the float64 copy."""
    m32, m64, x, observed = _heywood_case(1e-7, seed=3)
    x = x.float().double()  # the float32 model's rows, exactly
    ref = DenseMixture.from_model(m64)
    rows = _spy_float64_calls(monkeypatch, "row_posterior")
    components = _spy_float64_calls(monkeypatch, "conditional_components")
    model, xd, od = copy.deepcopy(m32).to(DEVICE), x.float().to(DEVICE), observed.to(DEVICE)
    with torch.no_grad():
        lp = model.observed_log_prob(xd, od)
        mean = model.conditional_mean(xd, od)
        painted, samples = inpaint(model, xd, od, n_samples=1,
                                   generator=torch.Generator(device=DEVICE).manual_seed(0))
        cond = model.condition([0, 1, 2, 3], xd[0, :4])
    assert _on_device(rows) and _on_device(components), (rows, components)
    assert lp.dtype == torch.float32 and cond.means.device.type == torch.device(DEVICE).type
    _assert_within_ulps(lp, _dense_observed_log_prob(ref, x, observed), "log p(x_o)")
    expected = _dense_conditional_mean(ref, x, observed)
    _assert_within_ulps(mean, expected, "conditional mean")
    _assert_within_ulps(painted, expected, "inpaint's mean")
    assert bool(torch.isfinite(samples).all()) and torch.equal(samples[0][od], xd[od])
    dense = ref.condition([0, 1, 2, 3], x[0, :4])
    _assert_within_ulps(cond.weights, dense.weights, "condition: weights")
    _assert_within_ulps(cond.means, dense.means, "condition: means")
    _assert_within_ulps(cond.covariance(), dense.covs, "condition: covariances")


def test_float32_rows_of_at_most_l_observed_features_on_cuda_match_the_dense_reference(
        monkeypatch):
    """Noise far below the loadings' scale (A²/d ≈ 1e6) and rows of at most L = 6 observed
    features (3 and 4; one of none): A_o is rank-deficient, so those rows, and condition()
    on 3 features, are taken in float64 on the device (float32 was off by 1.7 in the means
    of entries of size 10, and 0.6 nats; here the ill-conditioning checks would send them
    to float64 too, and with both off the means were 4.4 off on the CPU)."""
    m32, m64, x = _few_observed_case()
    x = x.float().double()
    ref = DenseMixture.from_model(m64)
    observed = torch.zeros(8, 20, dtype=torch.bool)
    observed[:, :3] = True
    observed[4:, -1] = True
    observed[7] = False
    rows = _spy_float64_calls(monkeypatch, "row_posterior")
    components = _spy_float64_calls(monkeypatch, "conditional_components")
    model, xd, od = copy.deepcopy(m32).to(DEVICE), x.float().to(DEVICE), observed.to(DEVICE)
    with torch.no_grad():
        mean = model.conditional_mean(xd, od)
        lp = model.observed_log_prob(xd, od)
        cond = model.condition([0, 1, 2], xd[0, :3])
    assert _on_device(rows) and _on_device(components), (rows, components)
    _assert_within_ulps(mean, _dense_conditional_mean(ref, x, observed), "conditional mean")
    _assert_within_ulps(lp, _dense_observed_log_prob(ref, x, observed), "log p(x_o)")
    assert lp[7].item() == 0.0  # nothing observed: exactly log 1
    dense = ref.condition([0, 1, 2], x[0, :3])
    _assert_within_ulps(cond.weights, dense.weights, "condition: weights")
    _assert_within_ulps(cond.means, dense.means, "condition: means")
    _assert_within_ulps(cond.covariance(), dense.covs, "condition: covariances")


def test_masked_capacitance_that_float32_cannot_factor_on_cuda_is_factored_in_float64():
    """Two nearly parallel loading columns over noise at 1e-6: the per-row
    M_o = I + A_oᵀD_o⁻¹A_o of component 0 is singular to float32 rounding (its entries ~5e7
    round by ~3, its smallest eigenvalue is 1), so the device's float32 Cholesky fails for
    some rows (24 of 32 on the CPU); those factors come from float64 on the device, and the
    conditional means match the dense float64 ones."""
    from mfa.conditioning import masked_capacitance_cholesky, masked_terms

    k, d, n = 2, 50, 32
    means, loadings, noise, g = _near_parallel_case(k, d)
    m32 = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), means.float(), loadings.float(), noise.float())
    m64 = copy.deepcopy(m32).double()
    x = m64.sample(n, generator=g)[0].float()
    observed = _random_masks(n, d, seed=3, p=0.7)
    model, mask = copy.deepcopy(m32).to(DEVICE), observed.float().to(DEVICE)
    terms = masked_terms(model.weights.log(), model.means, model.factor_loadings,
                         model.noise_variance)
    cap = (mask @ terms.outer).view(n, k, 2, 2) + torch.eye(2, device=DEVICE)
    failed = (torch.linalg.cholesky_ex(cap).info != 0).cpu()
    assert bool(failed.any()), "float32 factored every M_o on this device: the case is gone"
    chol = masked_capacitance_cholesky(terms, mask).cpu()
    assert chol.dtype == torch.float32
    a64, d64 = m32.factor_loadings.detach().double(), m32.noise_variance.detach().double()
    cap64 = torch.einsum("nj,kja,kjb->nkab", observed.double(), a64 / d64.unsqueeze(-1), a64)
    reference = torch.linalg.cholesky(cap64 + torch.eye(2, dtype=F64))
    # each entry within ULPS of itself: the factor's small pivots (~1) beside its large
    # entries (~7e3) are what float32 lost
    torch.testing.assert_close(chol[failed].double(), reference[failed], rtol=ULPS * EPS32,
                               atol=0)
    with torch.no_grad():
        mean = model.conditional_mean(x.to(DEVICE), observed.to(DEVICE))
    expected = _dense_conditional_mean(DenseMixture.from_model(m64), x.double(), observed)
    _assert_within_ulps(mean, expected, "conditional mean")


# ---------------------------------------------------------------------- "centred32"


def _sharp_and_smooth(seed=21, d=20, n=600):
    """A float32 model of two components with loadings of 0.3: component 0 sharp (noise
    1e-6: ε·max|a_j|²/d_j ≈ 1e-2, above owner_sums.SHARP_LIMIT), component 1 not (noise
    1e-2); its float64 copy; 600 float32 rows drawn from the copy."""
    g = gen(seed)
    noise = torch.stack([torch.full((d,), 1e-6), torch.full((d,), 1e-2)])
    m32 = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5]), (0.4 + 0.2 * torch.rand(2, d, generator=g, dtype=F64)).float(),
        (0.3 * torch.randn(2, d, 2, generator=g, dtype=F64)).float(), noise, min_noise=0.0)
    m64 = copy.deepcopy(m32).double()
    return m32, m64, m64.sample(n, generator=g)[0].float()


def test_centred32_sums_a_too_sharp_component_in_float64_on_cuda(monkeypatch):
    """One E-step and M-step of the float32 model on the device in "centred32" (the pairs'
    sums scattered: mfa.owner_sums.scattered_owner_sums), against the float64 model's
    float64 M-step on the CPU:

    * the sharp component's pairs are summed in float64, as "centred" sums them: its noise
      variances equal "centred"'s on the device up to the order of the float64 sums (the
      scattered sums' atomics: n·ε₆₄ relative of sums max|a_j|²/d_j times larger than the
      variance, 7e-8 here), and are within the CPU
      suite's bound for "centred" of the float64 M-step (1e-3 relative,
      test_float32_modes_keep_noise_of_pixel_like_rows; measured 5.5e-6 on the CPU);
      summed in float32 (the split off) they are 0.2 to 0.3 off, so the split is what
      keeps them;
    * the other component keeps float32 pairs, whose noise update errs by about
      100·ε·max|a_j|²/d_j relative (the error model SHARP_LIMIT is set from,
      mfa.owner_sums; measured 4e-5 on the CPU against a bound of 8.5e-4 here);
    * the means, first moments with no cancellation, within 8 ε relative."""
    from mfa import owner_sums
    from mfa._data_stream import DataSource
    from mfa.em import EMTrainer
    from mfa.m_step import m_step

    m32, m64, x = _sharp_and_smooth()
    terms = m32.component_terms()
    assert owner_sums._too_sharp_for(torch.float32, terms).tolist() == [True, False]
    explained = terms.factors.detach().square().sum(-1) * terms.inv_noise.detach()
    bound_smooth = 100 * EPS32 * float(explained[1].max())
    ref = m_step(EMTrainer.e_step(m64, DataSource(x.double(), m64, 1000), "float64"), m64,
                 variance_floor=1e-12)
    model, xd = copy.deepcopy(m32).to(DEVICE), x.to(DEVICE)

    def step(mode):
        stats = EMTrainer.e_step(model, DataSource(xd, model, 1000), mode)
        got = m_step(stats, model, variance_floor=1e-12)
        assert got["noise_variance"].device.type == torch.device(DEVICE).type
        return {name: value.detach().cpu().double() for name, value in got.items()}

    def noise_error(got):  # [K]: the largest relative error of each component's variances
        return ((got["noise_variance"] - ref["noise_variance"]).abs()
                / ref["noise_variance"]).amax(-1)

    split, centred = step("centred32"), step("centred")
    order = x.shape[0] * torch.finfo(F64).eps * float(explained[0].max())
    torch.testing.assert_close(split["noise_variance"][0], centred["noise_variance"][0],
                               rtol=order, atol=0)
    error = noise_error(split)
    assert error[0] < 1e-3 and error[1] < bound_smooth, (error, bound_smooth)
    torch.testing.assert_close(split["means"], ref["means"], rtol=8 * EPS32, atol=0)
    monkeypatch.setattr(owner_sums, "_too_sharp_for", lambda work, terms: None)
    assert noise_error(step("centred32"))[0] > 0.1  # float32 pairs: the case needs the split
