"""Outlier scores on a run's data: the ranking of ``mfa outliers`` and the AUROC/AUPR table
of ``mfa evaluate --outliers-against``.

The scores themselves live in :mod:`mfa.outliers` (every score *higher = more outlying*);
this module applies them to :class:`~mfa.data.ImageData` splits: it picks the data scale
(``256`` for dequantised ``(pixel + u)/256`` rows, ``255`` for ``pixel/255``), fits the
background model a score needs on (a seeded subset of) the training split, and scores a split
batch by batch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mfa import viz
from mfa._temporaries import IfExists, write_atomically
from mfa._validation import check_positive_int
from mfa.data import ImageData
from mfa.model import MixtureOfFactorAnalyzers
from mfa.outliers import DEFAULT_SCORE, SCORE_NAMES, OutlierScorer, evaluate_outliers, get_score

logger = logging.getLogger("mfa")

__all__ = ["check_outlier_data", "data_scale", "make_scorer", "outlier_metrics",
           "patch_size_for", "rank_outliers", "score_split"]

#: At most this many training images (a seeded subset) fit a score's background model.
BACKGROUND_ROWS = 5000
#: Rows per scored batch.
SCORE_BATCH = 1024


def data_scale(data: ImageData) -> int:
    """The divisor that mapped pixels to the model's rows: 256 if dequantised, else 255."""
    return 256 if data.dequantize else 255


def make_scorer(model: MixtureOfFactorAnalyzers, data: ImageData, score: str = DEFAULT_SCORE,
                *, seed: int = 0) -> OutlierScorer:
    """An :class:`~mfa.outliers.OutlierScorer` for rows of ``data`` (the model's training
    data); a background model, when ``score`` needs one, is fitted on up to
    :data:`BACKGROUND_ROWS` training images chosen with ``seed``."""
    spec = get_score(score)
    train = None
    if spec.needs_background:
        n = data.pixels("train").shape[0]
        if n == 0:
            raise ValueError(f"score {score!r} fits a background model on the training split, "
                             f"but {data.name} has no training images")
        train = data.seeded_rows("train", BACKGROUND_ROWS, seed, model.dtype).to(model.device)
        options = {"patch_size": patch_size_for(data.image_shape)}
    return OutlierScorer.fit(model, train, score, image_shape=data.image_shape,
                             scale=data_scale(data), seed=seed,
                             **(options if spec.needs_background else {}))


def patch_size_for(image_shape, preferred: int = 4) -> int:
    """The background model's patch side for ``image_shape`` ``(C, H, W)``: ``preferred`` when
    it divides ``H`` and ``W``, else the side nearest to it that does, the smaller on a tie
    (3 for 15×15 images; 1 at worst: local statistics), so that every image size has a
    background score."""
    _, h, w = image_shape
    sides = sorted(range(1, min(h, w) + 1), key=lambda p: (abs(p - preferred), p))
    return next(p for p in sides if h % p == 0 and w % p == 0)


def score_split(scorer: OutlierScorer, data: ImageData, split: str = "test") -> Tensor:
    """The scores of every image of ``split``: float64 ``[N]`` on the CPU."""
    model = scorer.model
    out = [scorer(batch.to(model.device)).cpu()
           for batch in data.loader(split, batch_size=SCORE_BATCH, dtype=model.dtype)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _log_prob(model: MixtureOfFactorAnalyzers, data: ImageData, split: str) -> Tensor:
    with torch.no_grad():
        return torch.cat([model.log_prob(batch.to(model.device)).double().cpu()
                          for batch in data.loader(split, batch_size=SCORE_BATCH,
                                                   dtype=model.dtype)])


def rank_outliers(model: MixtureOfFactorAnalyzers, data: ImageData, out_dir: str | Path, *,
                  split: str = "test", n: int = 32, nrow: int = 8, scale: int = 2,
                  score: str = DEFAULT_SCORE, seed: int = 0,
                  name: str = "outliers", if_exists: IfExists = "replace") -> list[Path]:
    """Rank ``split`` by an outlier score (most outlying first): the ``n`` most outlying
    images as a grid (``<name>.png``) and every image as ``<name>.csv`` with the columns
    ``rank, index, source, score, log_prob, label`` (``index``: the row of ``split``, as
    ``data.dataset(split)`` numbers it; ``source``: where that image comes from, see
    :meth:`ImageData.source_names`, empty when unknown; ``score`` as in
    :mod:`mfa.outliers`, bits/dim; ``log_prob`` in nats). Ties keep the split's order.
    ``if_exists``: see :func:`mfa._temporaries.write_atomically`; a grid that moves on to
    another name takes its CSV along. Returns the paths written."""
    out_dir = Path(out_dir)
    n, nrow = check_positive_int(n, "n"), check_positive_int(nrow, "nrow")  # (n=-3 drew N-3)
    rows = data.pixels(split).shape[0]
    if rows == 0:
        raise ValueError(f"the {split} split of {data.name} is empty: nothing to rank")
    _, height, width = data.image_shape  # (refused before the scoring, not after it)
    viz.check_figure_size(*viz.grid_size(min(n, rows), nrow, height, width), scale)
    scorer = make_scorer(model, data, score, seed=seed)
    scores = score_split(scorer, data, split)  # [N]
    log_p = _log_prob(model, data, split)  # [N]
    order = torch.argsort(scores, descending=True, stable=True)
    labels = data.labels(split)
    sources = data.source_names(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    def write_csv(temporary: Path) -> None:  # (whole, or the earlier file left as it was)
        with open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "index", "source", "score", "log_prob", "label"])
            for rank, i in enumerate(order.tolist()):
                label = "" if labels is None else int(labels[i])
                writer.writerow([rank, i, "" if sources is None else sources[i],
                                 f"{scores[i].item():.6f}", f"{log_p[i].item():.6f}", label])

    worst = order[: min(n, order.numel())]
    images = viz.rows_to_images(data.pixels(split)[worst], data.image_shape)  # as stored
    png = viz.save_image_grid(images, out_dir / f"{name}.png", nrow, scale=scale,
                              if_exists=if_exists)
    csv_path = write_atomically(  # (after the figure: both, or the CSV not alone)
        png.with_suffix(".csv"), write_csv,
        if_exists="replace" if if_exists == "replace" else "refuse")
    logger.info("most outlying %s images by %s: %s", split, score, ", ".join(
        f"#{i}{'' if sources is None else f' {sources[i]}'} ({scores[i].item():.3f})"
        for i in worst[:5].tolist()))
    return [png, csv_path]


def outlier_metrics(model: MixtureOfFactorAnalyzers, data: ImageData, other: ImageData, *,
                    split: str = "test", scores: Sequence[str] = SCORE_NAMES,
                    seed: int = 0, checked: bool = False) -> dict:
    """AUROC and AUPR of telling ``other``'s ``split`` (the outliers, positives) from
    ``data``'s ``split`` (the model's own data) with every score in ``scores``.

    ``other`` must be read as ``data`` reads its own (``pixel/255``, or dequantised, with
    ``other``'s seed), so both are scored on one scale. ``checked``: the caller ran
    :func:`check_outlier_data` on them already.

    Returns:
        ``{"against": other.name, "split", "n_in", "n_out", "positive", "aupr_chance",
        "default_score", "<score>": {"auroc", "aupr"}, ...}``: ``positive`` names the
        positive class (``other``'s images, the outliers) and ``aupr_chance`` is the AUPR of
        a random score, the positives' share ``n_out / (n_in + n_out)`` (AUROC's is 0.5).

    Raises:
        ValueError: the two image shapes differ, ``other`` is read on another scale
            (``dequantize``), a split is empty, a score is unknown, or more than half of
            ``other``'s images are images of ``data``'s split (some: a warning).
    """
    names = (check_outlier_data(data, other, split, scores) if not checked
             else [get_score(s).name for s in scores])
    n_in, n_out = int(data.pixels(split).shape[0]), int(other.pixels(split).shape[0])
    # (an AUPR of 1.0 against 10,000 outliers and 500 own images was read as a feat: chance
    # is 0.952 there, and nothing said which class was positive)
    result: dict = {"against": other.name, "split": split, "n_in": n_in, "n_out": n_out,
                    "positive": f"{other.name} (the outliers)",
                    "aupr_chance": n_out / (n_in + n_out), "default_score": DEFAULT_SCORE}
    for name in names:
        scorer = make_scorer(model, data, name, seed=seed)
        metrics = evaluate_outliers(score_split(scorer, data, split),
                                    score_split(scorer, other, split))
        result[name] = {"auroc": metrics["auroc"], "aupr": metrics["aupr"]}
        logger.info("outliers %s vs %s by %s: AUROC %.4f (chance 0.5), AUPR %.4f (chance "
                    "%.4f: positives are the %d %s images)", data.name, other.name, name,
                    metrics["auroc"], metrics["aupr"], result["aupr_chance"], n_out,
                    other.name)
    return result


def check_outlier_data(data: ImageData, other: ImageData, split: str = "test",
                       scores: Sequence[str] = SCORE_NAMES) -> list[str]:
    """What :func:`outlier_metrics` refuses, checked before any scoring; returns the scores'
    names.

    Raises:
        ValueError: the two image shapes differ, ``other`` is read on another scale
            (``dequantize``), a split is empty, a score is unknown, or more than half of
            ``other``'s images are images of ``data``'s split (some: a warning).
    """
    if tuple(other.image_shape) != tuple(data.image_shape):
        # (resizing cannot change the channels: data.channels is the library's, not a key)
        fix = "resize it (e.g. data.image_size) or pick another dataset"
        if other.image_shape[0] != data.image_shape[0]:
            fix = (f"its channels differ, which resizing cannot change: pick a dataset of "
                   f"{data.image_shape[0]} channel(s)"
                   + (f", or compare in Python with load_dataset(..., channels="
                      f"{data.image_shape[0]})" if other.name in ("folder", "celeba") else "")
                   + ("; its size differs too: resize it (e.g. data.image_size)"
                      if tuple(other.image_shape[1:]) != tuple(data.image_shape[1:]) else ""))
        raise ValueError(
            f"outlier evaluation needs images of one shape: the run's data {data.name} has "
            f"(C, H, W) = {tuple(data.image_shape)}, {other.name} has "
            f"{tuple(other.image_shape)}; {fix}")
    for name, source in (("run's data", data), ("other data", other)):
        if source.pixels(split).shape[0] == 0:
            raise ValueError(f"the {split} split of the {name} {source.name} is empty")
    if isinstance(scores, str):  # (its characters were taken for score names)
        raise TypeError(f"scores must be a sequence of score names, got the string "
                        f"{scores!r}; pass [{scores!r}]")
    names = [get_score(s).name for s in scores]
    if other.dequantize != data.dequantize:
        raise ValueError(f"{other.name} must be read like the run's data (dequantize="
                         f"{data.dequantize})")
    def digest(row) -> bytes:  # (16 bytes a row, not the row: CelebA's test split is 245 MB)
        return hashlib.blake2b(row.tobytes(), digest_size=16).digest()

    # every split of the run (its training images were taken for outliers: only its own
    # split was compared)
    own = {digest(row) for part in ("train", "val", "test") for row in data.pixels(part).numpy()}
    shared = sum(digest(row) in own for row in other.pixels(split).numpy())
    n_other = other.pixels(split).shape[0]
    if 2 * shared > n_other:  # (the run's own data: an AUROC near 0.5 by construction)
        raise ValueError(
            f"{shared} of the {n_other} {split} images of {other.name} are images of the "
            f"run's own data ({data.name}, any split): they are not outliers; give another "
            "dataset (or other files, --against-set data.root=...)")
    if shared:
        warnings.warn(f"{shared} of the {n_other} {split} images of {other.name} are also in "
                      f"the run's own data ({data.name}); they count as outliers",
                      stacklevel=2)
    return names
