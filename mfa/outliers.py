"""Outlier scores of a density model and their evaluation by AUROC and AUPR.

Convention
----------
Every score is *higher = more outlying*, and in the metrics the **positive class is the
outliers**: ``auroc(scores_in, scores_out)`` is the probability that a random outlier scores
higher than a random in-distribution row (ties count one half), 1.0 a perfect ranking, 0.5
chance. ``aupr`` is the average precision of finding the outliers.

Scores (registry :data:`SCORES`, names :data:`SCORE_NAMES`, default :data:`DEFAULT_SCORE`)
------------------------------------------------------------------------------------------
* ``"neg_log_prob"``: ``−log p(x)`` in bits/dim (:func:`mfa.metrics.bits_per_dim`). Known to
  fail when the outliers are *simpler* than the training data: a model of clothing gives
  digits, mostly flat black, a higher density than clothing (Nalisnick et al., 2019).
* ``"likelihood_ratio"``: ``−[log p(x) − log p_bg(x)]/(D ln 2)`` (Ren et al., 2019). The
  background density ``p_bg`` captures only low-level statistics, so the ratio cancels what
  both models owe to them (flat backgrounds, smoothness) and keeps the semantic part. Here the
  background is :class:`PatchBackground`: a small MFA of non-overlapping ``p × p`` patches,
  the same at every position, fitted to the model's training data, with
  ``log p_bg(x) = Σ_patches log p_patch(patch)``. It is a proper density on the whole image,
  knows local texture but not where anything is, and costs seconds to fit. Any object with a
  ``log_prob([N, D]) -> [N]`` can stand in for it (e.g. a low-capacity
  :class:`~mfa.MixtureOfFactorAnalyzers`).
* ``"complexity"``: bits/dim under the model minus the image's losslessly compressed length
  in bits/dim (Serrà et al., 2020), with PNG (zlib level 9) as the generic compressor: a simple
  image is cheap for any compressor, so its high density says little. The compressed length
  includes PNG's fixed container overhead (the same for every image of one size; rankings do
  not change).

Data scale: ``scale=256`` (the default) means the model was fitted to dequantised pixels
``x = (pixel + u)/256``; ``scale=255`` means ``x = pixel/255``. It sets the bits/dim offset and
how ``"complexity"`` turns rows back into uint8 pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mfa._validation import (
    check_data,
    check_finite,
    check_positive_int,
    check_seed,
    check_tensor,
)
from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.metrics import bits_per_dim
from mfa.model import MixtureOfFactorAnalyzers

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quieter(log: logging.Logger):
    """``log`` at WARNING while inside where it is at INFO (the background fit's INFO lines
    read as the main model's); at DEBUG it shows them all."""
    level = log.level
    if log.getEffectiveLevel() == logging.INFO:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)

F64 = torch.float64

# --------------------------------------------------------------------------------------
# Ranking metrics (outliers are the positive class)
# --------------------------------------------------------------------------------------


def _check_scores(scores: object, name: str) -> Tensor:
    if isinstance(scores, Tensor):
        t = scores
    elif isinstance(scores, (Sequence, np.ndarray)) and not isinstance(scores, (str, bytes)):
        try:
            t = torch.as_tensor(np.asarray(scores))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a 1-D tensor of real numbers: {err}") from None
    else:
        raise TypeError(f"{name} must be a 1-D tensor of scores, got {type(scores).__name__}")
    if t.dtype in (torch.uint16, torch.uint32):  # (numpy's unsigned counts: exact as int64)
        t = t.to(torch.int64)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} has dtype {t.dtype}, which is not supported; pass int64 or "
                        "float64 scores")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; AUROC/AUPR need at least one score per class")
    # Only int64 holds integers float64 cannot tell apart (2**53 wraps in a narrower type,
    # where the comparison held for every non-zero score); abs() of int64's minimum wraps too.
    if t.dtype == torch.int64 and bool(((t.detach() > 2**53) | (t.detach() < -2**53)).any()):
        raise ValueError(f"{name} holds integers beyond 2**53, which float64 ranks as ties; "
                         "rescale them first")
    t = t.detach().to("cpu", F64)
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains {int(torch.isnan(t).sum())} NaN score(s)")
    return t


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` [N], tied values sharing their average rank."""
    order = torch.argsort(values, stable=True)
    _, counts = torch.unique_consecutive(values[order], return_counts=True)  # [G]
    ends = torch.cumsum(counts, 0).to(F64)  # last rank of each tie group
    group_rank = ends - (counts.to(F64) - 1) / 2  # mean of ranks end-count+1 .. end
    ranks = torch.empty_like(values)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def auroc(scores_in: Tensor | Sequence[float], scores_out: Tensor | Sequence[float]) -> float:
    """Area under the ROC curve of outlier detection (outliers = positives).

    Exact, via the Mann–Whitney identity ``AUROC = (R_out − n_out(n_out+1)/2)/(n_in·n_out)``
    with ``R_out`` the sum of the outliers' ranks among all scores, ties taking their average
    rank: the same value as :func:`sklearn.metrics.roc_auc_score` with the outliers labelled 1.

    Args:
        scores_in: ``[N_in]`` scores of in-distribution rows (higher = more outlying).
        scores_out: ``[N_out]`` scores of outliers. ``±inf`` is allowed, NaN is not.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    n_in, n_out = s_in.numel(), s_out.numel()
    ranks = _average_ranks(torch.cat([s_in, s_out]))  # [N_in + N_out]
    rank_sum = ranks[n_in:].sum().item()
    return (rank_sum - n_out * (n_out + 1) / 2) / (n_in * n_out)


def aupr(scores_in: Tensor | Sequence[float], scores_out: Tensor | Sequence[float]) -> float:
    """Average precision of finding the outliers (outliers = positives).

    ``AP = Σ_t (R_t − R_{t−1}) P_t`` over the distinct score thresholds ``t`` from the highest
    down, with recall ``R_t`` and precision ``P_t`` of "score ≥ t": the same value as
    :func:`sklearn.metrics.average_precision_score` (no interpolation; tied scores enter
    together). Chance level is ``N_out/(N_in + N_out)``. Arguments as in :func:`auroc`.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    scores = torch.cat([s_in, s_out])
    labels = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)])
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # last index of each run of equal scores: where the threshold takes them all in
    last = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(),
                      torch.tensor([scores.numel() - 1])])
    tp = torch.cumsum(labels, 0)[last]  # [T]
    precision = tp / (last + 1).to(F64)
    recall = tp / s_out.numel()
    gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gain * precision).sum())


def evaluate_outliers(
    scores_in: Tensor | Sequence[float], scores_out: Tensor | Sequence[float]
) -> dict[str, float]:
    """``{"auroc", "aupr", "n_in", "n_out"}`` of the scores (outliers = positives; see
    :func:`auroc`)."""
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    return {"auroc": auroc(s_in, s_out), "aupr": aupr(s_in, s_out),
            "n_in": s_in.numel(), "n_out": s_out.numel()}


# --------------------------------------------------------------------------------------
# Background model of low-level statistics
# --------------------------------------------------------------------------------------


def _check_image_shape(image_shape: object, n_features: int | None) -> tuple[int, int, int]:
    if (not isinstance(image_shape, Sequence) or len(image_shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in image_shape)):
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape!r}")
    if n_features is not None and math.prod(image_shape) != n_features:
        raise ValueError(
            f"image_shape {tuple(image_shape)} has {math.prod(image_shape)} pixels but the rows "
            f"have D={n_features} features"
        )
    return tuple(image_shape)  # type: ignore[return-value]


def _check_rows(x: object, name: str, n_features: int, dtype: torch.dtype, device) -> Tensor:
    x = check_data(x, name, n_features, dtype, device)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, {n_features}] with N >= 1, "
                         f"got {tuple(x.shape)}")
    return x


def _check_patch_layout(image_shape: object, patch_size: object) -> tuple[int, int, int]:
    check_positive_int(patch_size, "patch_size")
    c, h, w = _check_image_shape(image_shape, None)
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image height {h} and "
                         f"width {w}")
    return c, h, w


def to_patches(x: Tensor, image_shape: Sequence[int], patch_size: int) -> Tensor:
    """Cut rows ``[N, C·H·W]`` (CHW order) into non-overlapping patches ``[N, P, C·p·p]``,
    ``P = (H/p)(W/p)``, each patch flattened in CHW order."""
    c, h, w = image_shape
    p = patch_size
    n = x.shape[0]
    patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // p) * (w // p), c * p * p)  # [N, P, C·p·p]


class PatchBackground(nn.Module):
    """``log p_bg(x) = Σ_patches log p_patch(patch)``: one small MFA shared by every
    non-overlapping ``p × p`` patch of an image (a density of local statistics only).

    Args:
        patch_model: the MFA over flattened patches, ``n_features = C·p·p``.
        image_shape: ``(C, H, W)`` of the images; ``p`` must divide ``H`` and ``W``.
        patch_size: ``p``.
    """

    def __init__(self, patch_model: MixtureOfFactorAnalyzers, image_shape: Sequence[int],
                 patch_size: int) -> None:
        super().__init__()
        c, h, w = _check_patch_layout(image_shape, patch_size)
        if patch_model.n_features != c * patch_size**2:
            raise ValueError(f"patch_model has {patch_model.n_features} features; patches of "
                             f"{c}×{patch_size}×{patch_size} have {c * patch_size**2}")
        self.patch_model = patch_model
        self.image_shape = (c, h, w)
        self.patch_size = patch_size
        self.n_features = c * h * w

    @classmethod
    def fit(
        cls,
        train: Tensor,
        image_shape: Sequence[int],
        *,
        patch_size: int = 4,
        n_components: int = 16,
        n_factors: int = 4,
        max_patches: int = 100_000,
        max_iter: int = 20,
        seed: int = 0,
    ) -> PatchBackground:
        """Fit by EM to up to ``max_patches`` patches (a seeded random subset) of ``train``
        ``[N, D]``, the rows the main model was fitted to, on the same scale."""
        image_shape = _check_patch_layout(image_shape, patch_size)
        c = image_shape[0]
        train = check_tensor(train, "train")
        if not train.is_floating_point():
            raise TypeError(f"train must be a floating-point tensor (pixels scaled as the main "
                            f"model's rows, e.g. to [0, 1]), got {train.dtype}")
        train = _check_rows(train, "train", math.prod(image_shape), train.dtype, train.device)
        check_positive_int(max_patches, "max_patches")
        patches = to_patches(train, image_shape, patch_size).reshape(-1, c * patch_size**2)
        gen = torch.Generator().manual_seed(check_seed(seed))  # (1.5: torch's raw error)
        if patches.shape[0] > max_patches:
            keep = torch.randperm(patches.shape[0], generator=gen)[:max_patches]
            patches = patches[keep.to(patches.device)]
        model = MixtureOfFactorAnalyzers(
            n_components, c * patch_size**2, min(n_factors, c * patch_size**2),
            generator=gen, dtype=train.dtype, device=train.device,
        )
        config = EMConfig(max_iter=max_iter, seed=seed, progress=False, stats_dtype="mixed")
        if patches.shape[0] < n_components:  # (EM's own error read as the main model's)
            raise ValueError(f"the patch background model of K={n_components} needs as many "
                             f"{patch_size}x{patch_size} patches, got {patches.shape[0]}")
        logger.info("fitting the background model: K=%d on %d %d×%d patches (its EM's "
                    "info lines not shown)", n_components, patches.shape[0], patch_size,
                    patch_size)
        with warnings.catch_warnings(), _quieter(logging.getLogger("mfa")):
            warnings.simplefilter("ignore", ConvergenceWarning)  # (a fixed, small budget)
            EMTrainer(config).fit(model, patches.contiguous())
        return cls(model, image_shape, patch_size)

    def log_prob(self, x: Tensor) -> Tensor:
        """``[N, D]`` → ``[N]``: the sum of the patch log-densities of each row."""
        x = _check_rows(x, "x", self.n_features, self.patch_model.dtype, self.patch_model.device)
        patches = to_patches(x, self.image_shape, self.patch_size)  # [N, P, C·p·p]
        with torch.no_grad():
            return self.patch_model.log_prob(patches).sum(-1)  # [N]


# --------------------------------------------------------------------------------------
# Scores: each (model, x [N, D], ...) -> float64 [N], higher = more outlying
# --------------------------------------------------------------------------------------


def _check_scale(scale: object) -> float:
    if scale not in (255, 256):
        raise ValueError(f"scale must be 256 (x = (pixel+u)/256, dequantised) or 255 "
                         f"(x = pixel/255), got {scale!r}")
    return float(scale)


def _bits(model: MixtureOfFactorAnalyzers, x: Tensor, scale: float) -> Tensor:
    with torch.no_grad():
        log_p = model.log_prob(x).to(F64)  # [N]
    return bits_per_dim(log_p, model.n_features, scale=scale)


def neg_log_prob(model: MixtureOfFactorAnalyzers, x: Tensor, *, scale: float = 256) -> Tensor:
    """``−log p(x)`` in bits/dim: float64 ``[N]`` for rows ``x`` ``[N, D]``."""
    scale = _check_scale(scale)
    x = _check_rows(x, "x", model.n_features, model.dtype, model.device)
    return _bits(model, x, scale)


def likelihood_ratio(model: MixtureOfFactorAnalyzers, x: Tensor, *, background: object = None,
                     scale: float = 256) -> Tensor:
    """``−[log p(x) − log p_bg(x)] / (D ln 2)``, bits/dim: float64 ``[N]`` (Ren et al., 2019).

    ``background`` has ``log_prob([N, D]) -> [N]`` on the same data scale as ``model``
    (e.g. :meth:`PatchBackground.fit` on the training rows); ``scale`` is checked but
    cancels in the ratio.
    """
    _check_scale(scale)
    x = _check_rows(x, "x", model.n_features, model.dtype, model.device)
    if background is None or not callable(getattr(background, "log_prob", None)):
        raise ValueError("likelihood_ratio needs background=<an object with log_prob>, "
                         "e.g. PatchBackground.fit(train_rows, image_shape)")
    with torch.no_grad():
        log_p = model.log_prob(x).to(F64)  # [N]
        log_bg = background.log_prob(x).to(F64)  # [N]
    if log_bg.shape != log_p.shape:
        raise ValueError(f"background.log_prob returned shape {tuple(log_bg.shape)}, "
                         f"expected {tuple(log_p.shape)}")
    return -(log_p - log_bg) / (model.n_features * math.log(2.0))


def quantize(x: Tensor, scale: float = 256) -> Tensor:
    """Rows in ``[0, 1]`` back to uint8 pixels: ``floor(256 x)`` for dequantised data
    (``scale=256``, the inverse of :func:`mfa.data.dequantize`), ``round(255 x)`` for
    ``scale=255``; values are clipped to ``0..255``."""
    scale = _check_scale(scale)
    check_finite(check_tensor(x, "x"), "x")  # NaN would pass the range test and become 0
    if x.numel() == 0:  # (min() of nothing raised inside torch)
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"x must lie in [0, 1] to be quantised to 8-bit pixels, got values "
                         f"in [{lo:.4g}, {hi:.4g}]")
    pixels = torch.floor(x * 256) if scale == 256 else torch.round(x * 255)
    return pixels.clamp_(0, 255).to(torch.uint8)


def compressed_bits_per_dim(x: Tensor, image_shape: Sequence[int], *, scale: float = 256,
                            compress_level: int = 9) -> Tensor:
    """PNG-compressed length of each image in bits/dim: float64 ``[N]`` (on ``x``'s device) for
    rows ``[N, D]`` in ``[0, 1]`` (quantised with :func:`quantize`; compressed on the CPU, one
    image at a time). ``C`` must be 1 (greyscale) or 3 (RGB)."""
    x = check_tensor(x, "x")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [N, D] with N >= 1, got {tuple(x.shape)}")
    c, h, w = _check_image_shape(image_shape, x.shape[1])
    if c not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels, got image_shape {(c, h, w)}")
    from PIL import Image  # only this score needs an imaging library

    pixels = quantize(x.detach().cpu(), scale).reshape(-1, c, h, w).permute(0, 2, 3, 1).numpy()
    out = torch.empty(pixels.shape[0], dtype=F64)
    for i, img in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if c == 1 else img).save(
            buf, format="PNG", compress_level=compress_level)
        out[i] = 8.0 * buf.tell()
    return (out / (c * h * w)).to(x.device)


def complexity(model: MixtureOfFactorAnalyzers, x: Tensor, *, image_shape: object = None,
               scale: float = 256) -> Tensor:
    """bits/dim under ``model`` − PNG bits/dim of the image: float64 ``[N]`` (Serrà et al.,
    2020). ``x`` ``[N, D]`` in ``[0, 1]``; ``image_shape`` ``(C, H, W)`` is required."""
    scale = _check_scale(scale)
    x = _check_rows(x, "x", model.n_features, model.dtype, model.device)
    if image_shape is None:
        raise ValueError("complexity needs image_shape=(C, H, W) to compress the images")
    return _bits(model, x, scale) - compressed_bits_per_dim(x, image_shape, scale=scale)


# --------------------------------------------------------------------------------------
# Registry and a scorer object
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSpec:
    """A registered outlier score: ``function(model, x, *, scale, [background], [image_shape])
    -> [N]`` (the bracketed options where ``needs_background`` / ``needs_image_shape``)."""

    name: str
    function: Callable[..., Tensor]
    needs_background: bool
    needs_image_shape: bool
    description: str


SCORES: dict[str, ScoreSpec] = {
    s.name: s
    for s in (
        ScoreSpec("neg_log_prob", neg_log_prob, False, False, "−log p(x) in bits/dim"),
        ScoreSpec("likelihood_ratio", likelihood_ratio, True, False,
                  "−log p(x) + log p_bg(x) in bits/dim, p_bg a 4×4-patch MFA (Ren et al. 2019)"),
        ScoreSpec("complexity", complexity, False, True,
                  "bits/dim − PNG bits/dim of the image (Serrà et al. 2020)"),
    )
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORES)
# Chosen by scripts/outlier_eval.py on validation pairs (best worst-direction AUROC), see
# docs/results/outliers.md.
DEFAULT_SCORE = "complexity"


def get_score(name: object) -> ScoreSpec:
    """The :class:`ScoreSpec` called ``name``; ``ValueError`` listing :data:`SCORE_NAMES`."""
    if not isinstance(name, str) or name not in SCORES:
        raise ValueError(f"unknown outlier score {name!r}; choose one of {list(SCORE_NAMES)}")
    return SCORES[name]


class OutlierScorer:
    """A model, a score name and what that score needs, callable on rows ``[N, D]`` → ``[N]``.

    Args:
        model: the fitted density model.
        score: one of :data:`SCORE_NAMES`.
        image_shape: ``(C, H, W)``; required by ``"complexity"`` (and by :meth:`fit` for
            the background).
        background: for ``"likelihood_ratio"``: an object with ``log_prob([N, D]) -> [N]``.
        scale: 256 (dequantised data, the default) or 255 (``pixel/255``).
    """

    def __init__(self, model: MixtureOfFactorAnalyzers, score: str = DEFAULT_SCORE, *,
                 image_shape: Sequence[int] | None = None, background: object = None,
                 scale: float = 256) -> None:
        if not isinstance(model, MixtureOfFactorAnalyzers):
            raise TypeError(f"model must be a MixtureOfFactorAnalyzers, "
                            f"got {type(model).__name__}")
        self.spec = get_score(score)
        self.scale = _check_scale(scale)
        if image_shape is not None:
            image_shape = _check_image_shape(image_shape, model.n_features)
        if self.spec.needs_image_shape and image_shape is None:
            raise ValueError(f"score {score!r} needs image_shape=(C, H, W)")
        if self.spec.needs_background and background is None:
            raise ValueError(f"score {score!r} needs a background model; build one with "
                             "OutlierScorer.fit(model, train, score, image_shape=...)")
        self.model, self.image_shape, self.background = model, image_shape, background

    @classmethod
    def fit(cls, model: MixtureOfFactorAnalyzers, train: Tensor, score: str = DEFAULT_SCORE,
            *, image_shape: Sequence[int], scale: float = 256, seed: int = 0,
            **background_options: object) -> OutlierScorer:
        """Build a scorer, fitting a :class:`PatchBackground` on ``train`` ``[N, D]`` (the
        model's training rows) when the score needs one. ``background_options`` go to
        :meth:`PatchBackground.fit` (``patch_size``, ``n_components``, ``n_factors`` …)."""
        background = None
        if get_score(score).needs_background:  # in the model's dtype, on its device
            train = check_tensor(train, "train")
            if train.is_floating_point():
                train = train.to(model.device, model.dtype)
            background = PatchBackground.fit(train, image_shape, seed=seed, **background_options)
        return cls(model, score, image_shape=image_shape, background=background, scale=scale)

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, x: Tensor) -> Tensor:
        """Scores of rows ``x`` ``[N, D]``: float64 ``[N]``, higher = more outlying."""
        options: dict[str, object] = {"scale": self.scale}
        if self.spec.needs_background:
            options["background"] = self.background
        if self.spec.needs_image_shape:
            options["image_shape"] = self.image_shape
        return self.spec.function(self.model, x, **options)

    def evaluate(self, x_in: Tensor, x_out: Tensor) -> dict[str, float]:
        """:func:`evaluate_outliers` of the scores of in-distribution rows ``x_in`` and
        outliers ``x_out``."""
        return evaluate_outliers(self(x_in), self(x_out))

    def __repr__(self) -> str:
        return (f"OutlierScorer(score={self.name!r}, image_shape={self.image_shape}, "
                f"background={type(self.background).__name__ if self.background else None})")
