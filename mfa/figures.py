"""The figures of a trained run: sample grids, inpainting grids, outlier rankings, factor
grids and the training curve, each saved as an image (the ``mfa sample`` / ``inpaint`` /
``outliers`` / ``visualize`` commands and the end of ``mfa train``, :mod:`mfa.workflow`)."""

from __future__ import annotations

from pathlib import Path

import torch

from mfa import viz
from mfa._temporaries import IfExists
from mfa._validation import check_positive_int, check_seed
from mfa.data import ImageData
from mfa.data.layout import check_image_shape
from mfa.inference import inpaint as inpaint_rows
from mfa.masks import make_mask, require_hidden
from mfa.model import MixtureOfFactorAnalyzers
from mfa.outliers import DEFAULT_SCORE
from mfa.run_outliers import rank_outliers

__all__ = ["check_output", "inpaint", "outliers", "sample", "training_curve", "visualize"]


def check_output(output, image_shape, n_components: int | None = None,
                 n_factors: int = 0) -> None:
    """Refuse, before training, a run's output config (:class:`mfa.config.OutputConfig`)
    whose sample, outlier, inpainting or factor grid of ``image_shape`` ``(C, H, W)`` images
    would exceed :data:`mfa.viz.MAX_FIGURE_PIXELS` (it failed after the training, out of
    memory), or whose inpainting mask image cannot be read or hides no pixel. The factor
    grid has ``min(n_factor_components, n_components)`` rows (all of them when ``K`` is not
    known yet, as in a hierarchical run) of ``2 + 3·n_factors`` images."""
    _, height, width = image_shape
    grids = [(output.n_samples, output.grid_nrow)] if output.n_samples else []  # the sample
    # and outlier grids (0: neither, as mfa.workflow.draw_figures draws them)
    if output.n_inpaint:  # a row an image: the image, the masked one, the mean, the samples
        grids.append((output.n_inpaint * (3 + output.inpaint_samples), 3 + output.inpaint_samples))
    rows = min(output.n_factor_components, n_components or output.n_factor_components)
    if rows:
        grids.append((rows * (2 + 3 * n_factors), 2 + 3 * n_factors))
    for n, nrow in grids:
        viz.check_figure_size(*viz.grid_size(n, nrow, height, width), output.image_scale)
    if output.n_inpaint and "image" in output.inpaint_masks:
        try:  # (the error named the file, not the setting that gave it)
            mask = make_mask("image", image_shape, 1, mask_image=output.mask_image)
        except (OSError, ValueError) as error:
            raise type(error)(f"output.mask_image: {error}") from None
        require_hidden(mask, "image")


def sample(model, image_shape, path, *, n=64, nrow=8, seed=0, scale=2,
           per_component: bool = False, with_noise: bool = True, dequantized: bool = False,
           if_exists: IfExists = "replace") -> Path:
    """A grid of ``n`` samples (or, with ``per_component``, one row of ``nrow`` samples per
    component, rows ordered by weight) saved as a PNG. ``with_noise=False`` draws
    ``μ_k + A_k z`` without the pixel noise (see :meth:`MixtureOfFactorAnalyzers.sample`).
    ``dequantized``: the model's data were dequantised (a run's ``data.dequantize``), so a
    value ``x`` is drawn as the pixel ``floor(256·x)`` it stands for (see
    :func:`mfa.viz.to_pixels`), else as ``round(255·x)``.
    Each figure here returns the path written; ``if_exists``: what a file already at that
    path does, as in :func:`mfa._temporaries.write_atomically`."""
    _, height, width = _model_image_shape(model, image_shape)
    nrow, seed = check_positive_int(nrow, "nrow"), check_seed(seed)  # (nrow=0: "n must be >= 1")
    count = model.n_components * nrow if per_component else n  # (checked before the draws:
    viz.check_figure_size(*viz.grid_size(count, nrow, height, width), scale)  # 33 s wasted)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        if per_component:
            order = torch.argsort(model.weights, descending=True)
            rows = []
            for k in order.tolist():
                single = _component(model, k)
                rows.append(single.sample(nrow, generator=gen, with_noise=with_noise)[0])
            x = torch.cat(rows)
        else:
            x, _ = model.sample(n, generator=gen, with_noise=with_noise)
    images = viz.rows_to_images(x.cpu(), image_shape)
    return viz.save_image_grid(images, path, nrow, scale=scale, if_exists=if_exists,
                               dequantized=dequantized)


def _model_image_shape(model, image_shape) -> tuple[int, int, int]:
    """``image_shape`` ``(C, H, W)`` checked against the model's ``D`` before any work (a
    wrong one failed after the sampling)."""
    c, h, w = check_image_shape(image_shape)
    if c not in (1, 3) or c * h * w != model.n_features:
        raise ValueError(f"image shape (C, H, W) = {(c, h, w)} does not fit the model: it needs "
                         f"C = 1 or 3 and C·H·W = its {model.n_features} features")
    return c, h, w


def _component(model: MixtureOfFactorAnalyzers, k: int) -> MixtureOfFactorAnalyzers:
    one = torch.ones(1, dtype=model.dtype, device=model.device)
    return MixtureOfFactorAnalyzers.from_parameters(
        one, model.means[k : k + 1].detach(), model.factor_loadings[k : k + 1].detach(),
        model.noise_variance[k : k + 1].detach(), noise=model.noise,
    )


def inpaint(model, data: ImageData, path, *, mask="center", n=8, n_samples=3, split="test",
            seed=0, scale=2, mask_image=None, fraction=0.5, observed=None,
            if_exists: IfExists = "replace") -> Path:
    """original | masked input | conditional mean | ``n_samples`` conditional samples, for
    the first ``n`` images of ``split`` (masked by ``mask``, or by the given bool
    ``observed`` [n, D]). The original and masked columns show the stored pixels; the
    model's values are drawn as the pixels they stand for on ``data``'s scale
    (``floor(256·x)`` where dequantised, :func:`mfa.viz.to_pixels`)."""
    count, seed = min(check_positive_int(n, "n"), data.pixels(split).shape[0]), check_seed(seed)
    if count == 0:
        raise ValueError(f"the {split} split of {data.name} is empty: nothing to inpaint")
    columns = 3 + check_positive_int(n_samples, "n_samples", minimum=0)  # (checked first: the
    viz.check_figure_size(*viz.grid_size(count * columns, columns,  # sampling took 35 s)
                                         *data.image_shape[1:]), scale)
    x = data.dataset(split, dtype=model.dtype).rows(torch.arange(count)).to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    if observed is None:  # (given masks, of training rows' missing pixels, are drawn as are)
        observed = require_hidden(make_mask(
            mask, data.image_shape, x.shape[0], generator=torch.Generator().manual_seed(seed),
            fraction=fraction, mask_image=mask_image), mask)
    observed = observed[:count].to(model.device)
    with torch.no_grad():
        mean, samples = inpaint_rows(model, x, observed, n_samples, generator=gen)
    pixels = data.pixels(split)[:count]  # [n, D] uint8: the rows x stands for, drawn as stored
    masked = torch.where(observed.cpu(), pixels, torch.zeros_like(pixels))
    grid = viz.inpainting_grid(pixels, masked, mean.cpu(), samples.cpu(), data.image_shape,
                               observed.cpu(), dequantized=data.dequantize)
    return viz.save_image(grid, path, scale=scale, if_exists=if_exists)


def outliers(model, data: ImageData, out_dir, *, split="test", n=32, nrow=8, scale=2,
             score: str = DEFAULT_SCORE, seed: int = 0, name: str = "outliers",
             if_exists: IfExists = "replace"):
    """Rank ``split`` by the outlier ``score`` (one of :data:`mfa.outliers.SCORE_NAMES`):
    the ``n`` most outlying images as a grid (``<name>.png``, most outlying first) and every
    score as ``<name>.csv``; see :func:`mfa.run_outliers.rank_outliers`."""
    return rank_outliers(model, data, out_dir, split=split, n=n, nrow=nrow, scale=scale,
                         score=score, seed=seed, name=name, if_exists=if_exists)


def visualize(model, image_shape, path, *, components=(0,), scale=2, factor_scale=2.0,
              dequantized: bool = False, if_exists: IfExists = "replace") -> Path:
    """Per component (one index or several): mean | noise | μ − c·A_i | A_i | μ + c·A_i for
    every factor column (``dequantized``: as in :func:`sample`)."""
    _model_image_shape(model, image_shape)
    grid = viz.factor_grid(model, components, image_shape, factor_scale,
                           dequantized=dequantized)
    return viz.save_image(grid, path, scale=scale, if_exists=if_exists)


def training_curve(history, path, *, method: str, title: str | None = None,
                   n_init: int | None = None) -> Path:
    """A run's ``curve.png``: the train and validation log-likelihoods of the trainer's
    ``history``. An EM record (``method == "em"``) scores the training data with the
    parameters *before* its M-step and the validation data with those *after* it, so the
    train points are drawn one to the left: x counts the M-steps applied to the parameters
    a point scores. A record without an M-step (``final``) scores the validation data with
    the parameters of the record before, drawn there already: its point is left out. Where
    an iteration's M-step took another noise prior ``s₀`` than the iteration before (the
    automatic search, or a repeated one), a dotted line marks it: the train log-likelihood
    falls there, as a stronger prior means (EM's objective, the MAP one, does not). With
    ``n_init`` (``EMConfig.n_init``), runs from ``n_init`` on are labelled as the
    re-seeding rounds they are. Adam (``"sgd"``) records, per epoch, are drawn as they
    are."""
    if method != "em":
        return viz.plot_training_curve(history, path, title=title)
    history = [dict(r, val_log_likelihood=None) if r.get("final") else r for r in history]
    markers = [(r["iteration"] - 0.5, "noise prior s0 changed") for r in history
               if r.get("step_noise_prior_variance") is not None
               and r.get("noise_prior_variance") is not None
               and r["step_noise_prior_variance"] != r["noise_prior_variance"]
               and isinstance(r.get("iteration"), int)]
    runs = {r["run"] for r in history if isinstance(r.get("run"), int)}
    labels = None if n_init is None else {
        run: f"run {run}" if run < n_init else f"re-seed {run - n_init + 1}" for run in runs}
    return viz.plot_training_curve(history, path, title=title,
                                   x_offsets={"train_log_likelihood": -1},
                                   x_label="EM iterations (M-steps applied)",
                                   run_labels=labels, markers=markers)
