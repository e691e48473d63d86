"""Outlier scores and their metrics: AUROC/AUPR against scikit-learn, scores against dense
references, the likelihood ratio where raw likelihood fails, the compressor term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, DenseMixture, assert_finite, gen, random_model
from sklearn.metrics import average_precision_score, roc_auc_score

from mfa import MixtureOfFactorAnalyzers
from mfa.data import dequantize
from mfa.outliers import (
    DEFAULT_SCORE,
    SCORE_NAMES,
    SCORES,
    OutlierScorer,
    PatchBackground,
    aupr,
    auroc,
    complexity,
    compressed_bits_per_dim,
    evaluate_outliers,
    get_score,
    likelihood_ratio,
    neg_log_prob,
    quantize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sklearn_pair(s_in, s_out):
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[np.asarray(s_in, dtype=float), np.asarray(s_out, dtype=float)]
    return roc_auc_score(y, s), average_precision_score(y, s)


# ---------------------------------------------------------------------- AUROC / AUPR


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["continuous", "ties", "imbalanced-in", "imbalanced-out"])
def test_auroc_aupr_match_sklearn(seed, kind):
    g = gen(seed)
    n_in, n_out = {"imbalanced-in": (300, 4), "imbalanced-out": (3, 250)}.get(kind, (60, 45))
    if kind == "ties":  # few distinct values: many ties within and across the classes
        s_in = torch.randint(0, 4, (n_in,), generator=g).to(F64)
        s_out = torch.randint(1, 5, (n_out,), generator=g).to(F64)
    else:
        s_in = torch.randn(n_in, generator=g, dtype=F64)
        s_out = torch.randn(n_out, generator=g, dtype=F64) + 0.7
    ref_roc, ref_ap = sklearn_pair(s_in, s_out)
    assert auroc(s_in, s_out) == pytest.approx(ref_roc, abs=1e-12)
    assert aupr(s_in, s_out) == pytest.approx(ref_ap, abs=1e-12)
    res = evaluate_outliers(s_in.float(), s_out.tolist())
    assert res == pytest.approx({"auroc": ref_roc, "aupr": ref_ap, "n_in": n_in, "n_out": n_out})


def test_auroc_aupr_extremes_and_chance():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and aupr([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    # every score tied: AUROC one half, AP the outliers' share
    assert auroc([1.0] * 3, [1.0] * 5) == 0.5
    assert aupr([1.0] * 3, [1.0] * 5) == pytest.approx(5 / 8)
    assert auroc([0.5], [0.5]) == 0.5


def test_infinite_scores_rank_like_large_ones():
    s_in = torch.tensor([0.1, -math.inf, 2.0, 2.0])
    s_out = torch.tensor([math.inf, 2.0, 0.3])
    ref_roc, ref_ap = sklearn_pair(s_in.clamp(-1e9, 1e9), s_out.clamp(-1e9, 1e9))
    assert auroc(s_in, s_out) == pytest.approx(ref_roc, abs=1e-12)
    assert aupr(s_in, s_out) == pytest.approx(ref_ap, abs=1e-12)


@pytest.mark.parametrize("fn", [auroc, aupr, evaluate_outliers])
def test_metric_input_errors(fn):
    good = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="scores_in is empty"):
        fn(torch.tensor([]), good)
    with pytest.raises(ValueError, match="scores_out contains 1 NaN"):
        fn(good, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"scores_in must have shape \[N\], got \(2, 1\)"):
        fn(good[:, None], good)
    with pytest.raises(TypeError, match="scores_out must hold real numbers, got dtype torch.bool"):
        fn(good, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="scores_in must be a 1-D tensor of scores, got str"):
        fn("0.1", good)
    # float64 would rank 2**53 and 2**53 + 1 as a tie (AUROC 0.5 where scikit-learn gives 0)
    with pytest.raises(ValueError, match=r"scores_in holds integers beyond 2\*\*53"):
        fn(torch.tensor([2**53 + 1]), torch.tensor([2**53]))
    assert auroc(torch.tensor([3, 1]), torch.tensor([2, 5])) == 0.75  # 3 of 4 pairs; ints are fine


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_scores_of_every_width(dtype):
    """Narrow integer scores (PNG lengths, counts) are ranked, not refused: the 2**53 check
    once wrapped in their dtype and refused every non-zero score."""
    s_in, s_out = [1, 2, 3], [2, 3, 4]
    ref_roc, ref_ap = sklearn_pair(s_in, s_out)
    a, b = torch.tensor(s_in, dtype=dtype), torch.tensor(s_out, dtype=dtype)
    assert auroc(a, b) == pytest.approx(ref_roc, abs=1e-12)
    assert aupr(a, b) == pytest.approx(ref_ap, abs=1e-12)
    np_dtype = str(dtype).removeprefix("torch.")
    res = evaluate_outliers(np.array(s_in, np_dtype), np.array(s_out, np_dtype))
    assert res["auroc"] == pytest.approx(ref_roc, abs=1e-12)
    with pytest.raises(ValueError, match=r"scores_out holds integers beyond 2\*\*53"):
        auroc(torch.tensor([0]), torch.tensor([-(2**63)]))


@pytest.mark.parametrize("np_dtype", ["uint16", "uint32"])
def test_unsigned_numpy_scores_are_ranked(np_dtype):
    """numpy's unsigned counts were refused as 'must hold real numbers, got dtype
    torch.uint32'; they are exact as int64. A dtype still refused is named as unsupported."""
    s_in, s_out = [1, 2, 3], [2, 3, 70_000 if np_dtype == "uint32" else 4]
    ref_roc, ref_ap = sklearn_pair(s_in, s_out)
    res = evaluate_outliers(np.array(s_in, np_dtype), np.array(s_out, np_dtype))
    assert res["auroc"] == pytest.approx(ref_roc, abs=1e-12)
    assert res["aupr"] == pytest.approx(ref_ap, abs=1e-12)
    with pytest.raises(TypeError, match=r"scores_in has dtype torch.uint64, which is not "
                                        r"supported; pass int64 or float64"):
        auroc(torch.tensor([1, 2], dtype=torch.uint64), torch.tensor([3]))


# ---------------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def image_model():
    """A fitted-looking model of 4×4 greyscale images in [0, 1) and rows to score."""
    model = MixtureOfFactorAnalyzers.from_parameters(
        weights=torch.tensor([0.3, 0.7], dtype=F64),
        means=torch.rand(2, 16, generator=gen(0), dtype=F64) * 0.6 + 0.2,
        factor_loadings=0.05 * torch.randn(2, 16, 2, generator=gen(1), dtype=F64),
        noise_variance=torch.full((2, 16), 0.01, dtype=F64),
    )
    pixels = torch.randint(0, 256, (40, 16), generator=gen(2), dtype=torch.uint8)
    return model, dequantize(pixels, generator=gen(3), dtype=F64)


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_every_score_shape_dtype_finite(image_model, name):
    model, x = image_model
    scorer = OutlierScorer.fit(model, x, name, image_shape=(1, 4, 4), patch_size=2,
                               n_components=2, n_factors=1, max_iter=3)
    assert scorer.name == name and name in repr(scorer)
    assert_finite(scorer(x), (40,), F64)
    res = scorer.evaluate(x[:25], x[25:])
    assert 0.0 <= res["auroc"] <= 1.0 and 0.0 < res["aupr"] <= 1.0


def test_registry_is_consistent():
    assert DEFAULT_SCORE in SCORE_NAMES and set(SCORES) == set(SCORE_NAMES)
    assert all(get_score(n).name == n for n in SCORE_NAMES)
    with pytest.raises(ValueError, match=r"unknown outlier score 'nll'; choose one of \["):
        get_score("nll")


def test_neg_log_prob_is_bits_per_dim_of_dense_density():
    model = random_model(3, 6, 2)
    x = torch.randn(20, 6, generator=gen(4), dtype=F64)
    ref = DenseMixture.from_model(model).log_prob(x)
    d = 6
    torch.testing.assert_close(neg_log_prob(model, x),
                               -(ref - d * math.log(256)) / (d * math.log(2)))
    torch.testing.assert_close(neg_log_prob(model, x, scale=255),
                               -(ref - d * math.log(255)) / (d * math.log(2)))


def test_likelihood_ratio_is_bits_per_dim_of_the_dense_densities_ratio():
    """``−[log p(x) − log p_bg(x)] / (D ln 2)`` with both densities from dense float64
    mixtures (torch.distributions); ``scale`` cancels."""
    model, background = random_model(3, 8, 2, seed=1), random_model(2, 8, 1, seed=2)
    x = torch.randn(10, 8, generator=gen(3), dtype=F64)
    ref = -(DenseMixture.from_model(model).log_prob(x)
            - DenseMixture.from_model(background).log_prob(x)) / (8 * math.log(2))
    assert float(ref.abs().min()) > 0.1  # (a wrong scale would show)
    for scale in (256, 255):
        torch.testing.assert_close(likelihood_ratio(model, x, background=background,
                                                    scale=scale), ref, rtol=0, atol=1e-10)


def test_patch_background_is_sum_of_patch_densities():
    """Against patches cut by hand (C=2, 4×6 images, 2×2 patches) and a dense mixture."""
    c, h, w, p = 2, 4, 6, 2
    patch_model = random_model(3, c * p * p, 2, seed=5)
    bg = PatchBackground(patch_model, (c, h, w), p)
    x = torch.randn(5, c * h * w, generator=gen(6), dtype=F64)
    images = x.reshape(5, c, h, w)
    dense = DenseMixture.from_model(patch_model)
    ref = sum(dense.log_prob(images[:, :, i:i + p, j:j + p].reshape(5, -1))
              for i in range(0, h, p) for j in range(0, w, p))
    torch.testing.assert_close(bg.log_prob(x), ref)


def test_likelihood_ratio_beats_likelihood_where_simple_outliers_look_likely():
    """The Nalisnick failure in miniature: inliers are 8×8 images with one textured half
    (left or right, N(0, 0.3²) pixels) and one flat half (N(0, 0.01²)); outliers are flat all
    over. The flat half-image sits at the textured component's mean, so the true density ranks
    outliers as *more* likely than inliers; a patch background, which knows flat patches are
    common but not where they belong, rewards the flatness far more, and the ratio flips it."""
    left = (torch.arange(64) % 8 < 4).to(F64)  # [D] 1 on the left half
    means = torch.zeros(2, 64, dtype=F64)
    var = torch.stack([0.09 * left + 1e-4 * (1 - left), 0.09 * (1 - left) + 1e-4 * left])
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.5, 0.5], dtype=F64), means, torch.zeros(2, 64, 0, dtype=F64), var)

    def inliers(n, seed):
        side = torch.randint(0, 2, (n,), generator=gen(seed))
        return torch.randn(n, 64, generator=gen(seed + 1), dtype=F64) * var[side].sqrt()

    train, x_in = inliers(400, 10), inliers(200, 20)
    x_out = 0.01 * torch.randn(200, 64, generator=gen(30), dtype=F64)
    raw = evaluate_outliers(neg_log_prob(model, x_in), neg_log_prob(model, x_out))
    bg = PatchBackground.fit(train, (1, 8, 8), patch_size=2, n_components=2, n_factors=1,
                             max_iter=10, seed=0)
    lr = evaluate_outliers(likelihood_ratio(model, x_in, background=bg),
                           likelihood_ratio(model, x_out, background=bg))
    assert raw["auroc"] < 0.1  # the failure: outliers look more likely than inliers
    assert lr["auroc"] > 0.95 and lr["aupr"] > 0.95


# ---------------------------------------------------------------------- complexity


def test_quantize_inverts_dequantize_and_scaling():
    pixels = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(quantize(dequantize(pixels, generator=gen(0), dtype=F64)), pixels)
    assert torch.equal(quantize(pixels.to(F64) / 255, scale=255), pixels)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        quantize(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="scale must be 256"):
        quantize(torch.tensor([0.5]), scale=1)
    with pytest.raises(ValueError, match="x contains 1 non-finite"):  # was pixel 0
        quantize(torch.tensor([float("nan"), 0.5]))
    with pytest.raises(ValueError, match="x contains 4 non-finite"):  # was a score of 142
        compressed_bits_per_dim(torch.full((1, 4), float("nan")), (1, 2, 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_compressed_length_grows_with_noise(channels):
    d = channels * 16 * 16
    flat = torch.full((3, d), 0.5, dtype=F64)
    noisy = torch.rand(3, d, generator=gen(7), dtype=F64)
    smooth = torch.linspace(0, 0.99, 16, dtype=F64).repeat(3, channels * 16)  # ramps
    shape = (channels, 16, 16)
    b_flat, b_smooth, b_noisy = (compressed_bits_per_dim(v, shape) for v in (flat, smooth, noisy))
    assert_finite(b_noisy, (3,), F64)
    assert bool((b_flat < b_smooth).all()) and bool((b_smooth < b_noisy).all())
    assert bool((b_noisy > 8.0).all())  # incompressible: 8 bits + container overhead
    assert bool((b_flat < 2.5).all())


@pytest.mark.parametrize("scale", [256, 255])
def test_compressed_length_is_pils_png_of_the_colour_image(scale):
    """Colour rows (CHW, as the datasets flatten them) are compressed as the RGB image PIL
    writes from ``[H, W, 3]``: the CLI-level check used greyscale images, where a wrong
    channel layout cannot show, and a reshape to ``[H, W, C]`` moved colour scores by up to
    1.6 bits/dim with every test passing."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = 5, 7  # not square: a swapped H and W fails too
    images = np.zeros((4, h, w, 3), np.uint8)  # [N, H, W, C]
    images[..., 0] = np.arange(w) * 30  # a ramp along the rows in red
    images[..., 1] = rng.integers(0, 256, (4, h, w))  # noise in green
    images[1:, ..., 2] = rng.integers(0, 4, (3, h, w)) * 60  # few levels in blue
    images[0] = 0  # a blank one
    rows = torch.from_numpy(images).permute(0, 3, 1, 2).reshape(4, -1).double()  # [N, C·H·W]
    x = (rows + 0.5) / 256 if scale == 256 else rows / 255
    expected = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=9)
        expected.append(8.0 * len(buffer.getvalue()) / (3 * h * w))
    got = compressed_bits_per_dim(x, (3, h, w), scale=scale)
    assert got.tolist() == expected


def test_complexity_is_bits_minus_compressed_length(image_model):
    model, x = image_model
    torch.testing.assert_close(
        complexity(model, x, image_shape=(1, 4, 4)),
        neg_log_prob(model, x) - compressed_bits_per_dim(x, (1, 4, 4)))


# ---------------------------------------------------------------------- bad input


def test_score_input_errors(image_model):
    model, x = image_model
    with pytest.raises(ValueError, match=r"x must have shape \[N, 16\]"):
        neg_log_prob(model, x[0])
    with pytest.raises(ValueError, match="x contains 2 non-finite"):
        neg_log_prob(model, torch.where(torch.arange(16) == 3, math.nan, x[:2]))
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        neg_log_prob(model, x.float())
    with pytest.raises(ValueError, match="likelihood_ratio needs background"):
        likelihood_ratio(model, x)
    with pytest.raises(ValueError, match="complexity needs image_shape"):
        complexity(model, x)
    with pytest.raises(ValueError, match=r"image_shape \(1, 4, 5\) has 20 pixels but the rows "
                                         r"have D=16"):
        complexity(model, x, image_shape=(1, 4, 5))
    with pytest.raises(ValueError, match="PNG needs 1 or 3 channels"):
        compressed_bits_per_dim(x.repeat(1, 2), (2, 4, 4))
    with pytest.raises(ValueError, match="patch_size 3 must divide the image height 4"):
        PatchBackground.fit(x, (1, 4, 4), patch_size=3)
    for seed in (1.5, True):  # (torch's raw "manual_seed expected a long")
        with pytest.raises(TypeError, match=r"seed must be an int"):
            PatchBackground.fit(x.clamp(0, 1), (1, 4, 4), patch_size=2, seed=seed)
    # quantize of no rows: no pixels (min() of nothing raised inside torch)
    assert quantize(torch.empty(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="score 'likelihood_ratio' needs a background"):
        OutlierScorer(model, "likelihood_ratio")
    with pytest.raises(ValueError, match="score 'complexity' needs image_shape"):
        OutlierScorer(model, "complexity")
    with pytest.raises(TypeError, match="model must be a MixtureOfFactorAnalyzers"):
        OutlierScorer(object(), "neg_log_prob")


def test_a_background_of_fewer_patches_than_components_is_named():
    """Two 8x8 images in 4x4 patches are 8 patches: EM's error spoke of 'the kmeans
    initialisation of K=16 components', read as the main model's."""
    x = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the patch background model of K=16 needs as many "
                                         "4x4 patches, got 8"):
        PatchBackground.fit(x, (1, 8, 8), patch_size=4)


def test_background_patch_side_fits_every_image_size():
    """The runs' likelihood-ratio score used 4×4 patches whatever the image size, so 15×15
    images failed (and `mfa evaluate --outliers-against` with them, which tries every
    score): the side is now the nearest to 4 that divides H and W."""
    from mfa.run_outliers import patch_size_for

    assert [patch_size_for(s) for s in ((1, 28, 28), (3, 64, 64), (1, 15, 15), (1, 7, 7),
                                        (1, 10, 15), (3, 32, 32))] == [4, 4, 3, 1, 5, 4]
    shape = (1, 15, 15)
    g = gen(71)
    train = torch.rand(200, 225, generator=g, dtype=F64)
    model = MixtureOfFactorAnalyzers.from_parameters(
        torch.ones(1, dtype=F64), train.mean(0, keepdim=True),
        torch.zeros(1, 225, 0, dtype=F64), train.var(0, keepdim=True) + 1e-3)
    scorer = OutlierScorer.fit(model, train, "likelihood_ratio", image_shape=shape,
                               patch_size=patch_size_for(shape), n_components=2, n_factors=1)
    assert_finite(scorer(train[:5]), (5,))


def test_scorer_fits_its_background_in_the_model_s_dtype():
    """A float64 ``train`` for a float32 model built a scorer that refused every input."""
    model = random_model(2, 64, 2, dtype=torch.float32, seed=0)
    x = torch.rand(30, 64, generator=gen(1), dtype=F64)
    scorer = OutlierScorer.fit(model, x, "likelihood_ratio", image_shape=(1, 8, 8),
                               n_components=2, max_iter=2)
    assert scorer.background.patch_model.dtype == torch.float32
    scores = scorer(x.float())
    assert scores.shape == (30,) and bool(torch.isfinite(scores).all())
    with pytest.raises(TypeError, match=r"train must be a floating-point tensor .* torch\.uint8"):
        PatchBackground.fit((x * 255).to(torch.uint8), (1, 8, 8), n_components=2, max_iter=2)
