"""Adam's options and resume, and the outlier score's background model, on CUDA against the
CPU: Adam with weight decay, gradient clipping and the noise prior's start (mfa.sgd,
mfa.adam, mfa.sgd_start) and a resume from a mid-run checkpoint read onto the CPU; the
``"likelihood_ratio"`` score's :class:`~mfa.outliers.PatchBackground` fitted on the device
(mfa.outliers, mfa.run_outliers) against the CPU's fit and a dense float64 reference.
Skipped where no CUDA device is present, as ``tests/test_cuda_paths.py``.

``MFA_CUDA_TEST_DEVICE=cpu`` runs them CPU against CPU: a dry run of the test code only
(they compare nothing then), for machines without a GPU.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from helpers import (
    CUDA_TEST_DEVICE,
    DenseMixture,
    cuda_test_marks,
    gen,
    initialise_on_the_cpu,
    random_model,
)

from mfa import ConvergenceWarning, MixtureOfFactorAnalyzers, SGDConfig, SGDTrainer
from mfa import sgd as sgd_module

DEVICE = CUDA_TEST_DEVICE
pytestmark = cuda_test_marks("no_tf32")
F64 = torch.float64
PARAMS = ("weights", "means", "factor_loadings", "noise_variance")



def _read_onto_the_cpu(obj):
    """``obj`` through ``torch.save`` and ``torch.load(map_location="cpu")``, as
    :func:`mfa.checkpoint.load_checkpoint` reads a checkpoint (a GPU's tensors come back on
    the CPU)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def _assert_params_close(got, expected, **tol):
    for name in PARAMS:
        torch.testing.assert_close(getattr(got, name).detach().cpu(),
                                   getattr(expected, name).detach().cpu(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------- Adam


def _image_like(n, d=24, k=3, lat=2, seed=0):
    """Float64 rows in about [0, 1] from a model whose loadings explain most of the
    variance (as ``tests/test_cuda_paths.py``)."""
    g = gen(seed)
    weights = torch.arange(k, 0, -1, dtype=F64)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        weights / weights.sum(), 0.2 + 0.6 * torch.rand(k, d, generator=g, dtype=F64),
        0.15 * torch.randn(k, d, lat, generator=g, dtype=F64), torch.full((k, d), 2e-3, dtype=F64))
    return truth.sample(n, generator=g)[0]


#: Weight decay, a clipping norm that the first epochs' gradients exceed and the last ones'
#: do not (norms 13.5-15.9 from this start, a model of other data, on the CPU), the noise
#: prior's s₀ chosen at the start ("auto", mfa.sgd_start), a checkpoint every epoch.
#: init="none": the K-means start draws on the device, whose generator draws other numbers
#: than the CPU's.
ADAM = dict(epochs=4, batch_size=128, lr=1e-2, init="none", patience=0, progress=False,
            weight_decay=1e-2, grad_clip=15.0, checkpoint_every=1, seed=3)


def _adam(device, x, start, state=None):
    """Adam on ``device`` from ``start`` (or from ``state``: ``(trainer state, model
    parameters)`` read onto the CPU); returns ``(model on the CPU, trainer, {epoch: the
    checkpoint read onto the CPU})``."""
    model = copy.deepcopy(start)
    trainer = SGDTrainer(SGDConfig(device=device, **ADAM))
    if state is not None:
        trainer.load_state_dict(state[0])
        model.load_state_dict(state[1])
    saved = {}

    def checkpoint(trainer, model):
        saved[trainer.state_dict()["epoch"]] = _read_onto_the_cpu(
            (trainer.state_dict(), model.state_dict()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer.fit(model, x.to(device), checkpoint_fn=checkpoint)
    assert model.loc.device.type == torch.device(device).type
    return model.cpu(), trainer, saved


def _scores(trainer):
    return [(h["epoch"], h["train_log_likelihood"], h["val_log_likelihood"], h["lr"])
            for h in trainer.history]


def test_adam_with_weight_decay_and_clipping_on_cuda_matches_cpu_and_resumes_exactly(
        monkeypatch):
    """Weight decay (mfa.adam.add_weight_decay), clipping (clip_grad_norm_ to
    SGDConfig.grad_clip) and the noise prior's s₀ chosen at the start, float64, one start:

    * the CPU and CUDA fits choose the same s₀ and follow the same trajectory (float64: the
      two devices differ in summation order only, ~1e-16 relative an operation, and the
      clipping factor min(1, c/‖g‖) is continuous in ‖g‖; the tolerances are those of
      test_cuda_paths' test_adam_on_cuda_follows_the_cpu_trajectory, whose start is also
      far from the optimum: near it, gradients are differences of large terms and rounding
      could flip the sign of Adam's first, sign-like steps);
    * resumed on CUDA from its own checkpoint after epoch 2, read onto the CPU (as
      load_checkpoint reads it: Adam's moments and step count, the scheduler and the CPU
      generator of the shuffling), the fit ends exactly where the uninterrupted one did;
    * resumed on CUDA from the CPU fit's checkpoint, it ends where the CPU fit did."""
    x = _image_like(800)
    start = random_model(3, 24, 2, seed=2)
    record = []
    clip, decay = torch.nn.utils.clip_grad_norm_, sgd_module.add_weight_decay

    def clip_spy(parameters, max_norm, *args, **kwargs):
        norm = clip(parameters, max_norm, *args, **kwargs)
        record.append(("norm", float(norm)))
        return norm

    def decay_spy(params, weight_decay):
        record.append(("decay", weight_decay))
        return decay(params, weight_decay)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    monkeypatch.setattr(sgd_module, "add_weight_decay", decay_spy)
    cpu, cpu_trainer, cpu_saved = _adam("cpu", x, start)
    cpu_record, record[:] = list(record), []
    cuda, cuda_trainer, cuda_saved = _adam(DEVICE, x, start)
    steps = ADAM["epochs"] * math.ceil(720 / ADAM["batch_size"])  # (80 rows held out)
    for got in (cpu_record, record):  # what this test is about ran on both devices
        norms = [v for kind, v in got if kind == "norm"]
        assert len(norms) == steps and [v for kind, v in got if kind == "decay"] == [
            ADAM["weight_decay"]] * steps
        assert any(v > ADAM["grad_clip"] for v in norms), "no step was clipped: change lr"
        assert any(v < ADAM["grad_clip"] for v in norms)
    assert cuda_trainer.selected_noise_prior_variance == cpu_trainer.selected_noise_prior_variance
    vals = [h["val_log_likelihood"] for h in cpu_trainer.history]
    assert vals[-1] > cpu_trainer.start_val_log_likelihood + 1.0  # it trained
    assert [h["val_log_likelihood"] for h in cuda_trainer.history] == pytest.approx(vals,
                                                                                   rel=1e-9)
    _assert_params_close(cuda, cpu, rtol=1e-6, atol=1e-9)

    resumed, trainer, _ = _adam(DEVICE, x, start, state=cuda_saved[2])
    assert _scores(trainer) == _scores(cuda_trainer)
    for name, value in cuda.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    across, _, _ = _adam(DEVICE, x, start, state=cpu_saved[2])
    _assert_params_close(across, cpu, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- outlier scores


def _images(n, seed, textured=True):
    """8×8 uint8 images ``[n, 64]``: one half (left or right, at random) textured (pixels
    about N(128, 40²)), the other flat at 128; all flat with ``textured=False`` (the outliers
    of tests/test_outliers.py's likelihood-ratio test, as pixels)."""
    g = gen(seed)
    left = (torch.arange(64) % 8 < 4)
    side = torch.randint(0, 2, (n, 1), generator=g).bool()
    noisy = (left == side) & textured  # [n, 64]
    texture = (128 + 40 * torch.randn(n, 64, generator=g)).round().clamp(0, 255)
    return torch.where(noisy, texture, torch.full_like(texture, 128.0)).to(torch.uint8)


def _image_data(seed=0):
    """An :class:`~mfa.data.ImageData` of such images (dequantised: (pixel + u)/256, so no
    two flat images are the same row) and another of flat ones, its outliers."""
    from mfa.data.image_data import ImageData

    def data(textured):
        pixels = [_images(n, seed + 10 * i, textured) for i, n in enumerate((300, 20, 120))]
        return ImageData("halves" if textured else "flat", (1, 8, 8), *pixels,
                         *(torch.full((p.shape[0],), -1) for p in pixels), dequantize=True,
                         seed=seed)
    return data(True), data(False)


def _halves_model(dtype):
    """The density of the textured-half images (the rows' scale: pixels/256): components
    for either side, independent features, variance 0.025 (std 40/256) on the textured half
    and 1e-5 on the flat one (its dequantisation noise is 1.3e-6)."""
    left = (torch.arange(64) % 8 < 4).to(F64)
    var = torch.stack([0.025 * left + 1e-5 * (1 - left), 0.025 * (1 - left) + 1e-5 * left])
    return MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64), torch.full((2, 64), 128.5 / 256, dtype=F64),
        torch.zeros(2, 64, 0, dtype=F64), var).to(dtype)


def _dense_ratio(model, background, x):
    """−[log p(x) − Σ_patches log p_patch(patch)]/(D ln 2) from dense float64 mixtures of
    the parameters, with patches cut by hand: ``[N]``."""
    x = x.double().cpu()
    p = background.patch_size
    _, h, w = background.image_shape
    images = x.reshape(x.shape[0], 1, h, w)
    patch = DenseMixture.from_model(copy.deepcopy(background.patch_model).cpu())
    log_bg = sum(patch.log_prob(images[:, :, i:i + p, j:j + p].reshape(x.shape[0], -1))
                 for i in range(0, h, p) for j in range(0, w, p))
    log_p = DenseMixture.from_model(copy.deepcopy(model).cpu()).log_prob(x)
    return -(log_p - log_bg) / (64 * math.log(2.0))


#: The background's fit: a seeded subset of the patches (PatchBackground.fit's randperm,
#: then the rows indexed on the device), K = 3 components, six EM iterations with EMConfig's
#: validation-chosen settings (the noise prior search; the tempered step, applied here on
#: the CPU), "mixed" statistics.
BACKGROUND = dict(patch_size=4, n_components=3, n_factors=1, max_iter=6, max_patches=800)


def test_likelihood_ratio_background_fitted_on_cuda_matches_cpu(monkeypatch):
    """OutlierScorer.fit's PatchBackground on each device from one start (float64: every
    validation-chosen setting must agree, as in tests/test_cuda_selection.py, with those
    tolerances): the same background parameters, likelihood-ratio scores equal to those of
    dense float64 mixtures of the fitted parameters (float64 rounding of sums of ~10²-nat
    terms: 1e-9 is far above it), and the same scores on both devices."""
    from mfa.outliers import OutlierScorer

    initialise_on_the_cpu(monkeypatch)
    data, other = _image_data()
    train = data.seeded_rows("train", 250, 0, F64)  # a seeded subset, as make_scorer takes
    x = torch.cat([data.as_float("test", dtype=F64), other.as_float("test", dtype=F64)])
    fitted = []
    for device in ("cpu", DEVICE):
        model = _halves_model(F64).to(device)
        scorer = OutlierScorer.fit(model, train.to(device), "likelihood_ratio",
                                   image_shape=(1, 8, 8), seed=0, **BACKGROUND)
        background = scorer.background
        assert background.patch_model.loc.device.type == torch.device(device).type
        scores = scorer(x.to(device))
        assert scores.device.type == torch.device(device).type and scores.dtype == F64
        torch.testing.assert_close(scores.cpu(), _dense_ratio(model, background, x),
                                   rtol=1e-9, atol=1e-9)
        fitted.append((copy.deepcopy(background.patch_model).cpu(), scores.cpu()))
    (cpu, cpu_scores), (cuda, cuda_scores) = fitted
    _assert_params_close(cuda, cpu, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(cuda_scores, cpu_scores, rtol=1e-6, atol=1e-9)


def test_run_outliers_scores_a_float32_model_on_cuda_like_the_dense_reference():
    """mfa.run_outliers on a float32 model on the device: make_scorer fits the background on
    a seeded subset of the training images moved there (float32, "mixed" statistics; K = 16,
    with its re-seeding rounds and tempered step on the CPU), score_split scores each batch
    there and returns float64 on the CPU, and the ratio ranks the flat images as outliers
    (the raw likelihood ranks them as inliers: the failure the ratio is for). The scores
    against dense float64 mixtures of the same float32 parameters: a float32 log-density
    errs by about ε·Σ_j |terms| (ε = 1.2e-7; Σ_j |terms| a few hundred nats here, over 64
    features and 4 patches of 16), so ~1e-4 nats in log p − log p_bg, ~2e-6 bits/dim after
    the division by D ln 2 (measured 1.5e-6 on the CPU); the bound 2e-5 allows ten times
    that."""
    from mfa.outliers import auroc, evaluate_outliers, neg_log_prob
    from mfa.run_outliers import make_scorer, score_split

    data, other = _image_data()
    model = _halves_model(torch.float32).to(DEVICE)
    scorer = make_scorer(model, data, "likelihood_ratio", seed=0)
    assert scorer.background.patch_model.dtype == torch.float32
    assert scorer.background.patch_model.loc.device.type == torch.device(DEVICE).type
    scores = []
    for source in (data, other):
        scores.append(score_split(scorer, source, "test"))
        assert scores[-1].device.type == "cpu" and scores[-1].dtype == F64
        rows = source.as_float("test")  # as score_split's loader gives them
        torch.testing.assert_close(scores[-1], _dense_ratio(model, scorer.background, rows),
                                   rtol=0, atol=2e-5)
    assert evaluate_outliers(*scores)["auroc"] > 0.95
    with torch.no_grad():
        raw = [neg_log_prob(model, s.as_float("test").to(DEVICE)).cpu() for s in (data, other)]
    assert auroc(*raw) < 0.1
