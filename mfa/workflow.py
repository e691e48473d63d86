"""The user's workflow as functions: train a run from a config, then draw samples, inpaint,
rank outliers, evaluate and visualise factors from its checkpoint.

The ``mfa`` command (:mod:`mfa.cli`) is a thin argument parser over these functions; they are
importable for scripts and notebooks. A run folder holds::

    config.yaml      the resolved RunConfig
    train.log        the log of the run
    checkpoint.pt    model, config, trainer state and metrics (written atomically; resumable)
    metrics.json     held-out log-likelihoods, bits/dim, timing
    curve.png        the training curve
    samples.png, inpaint-<mask>.png, outliers.png, outliers.csv, factors.png
"""

from __future__ import annotations

import csv
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mfa import viz
from mfa.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mfa.config import RunConfig, make_run_dir, resolve_device, save_config
from mfa.data import ImageData, load_dataset
from mfa.em import ConvergenceWarning, EMTrainer
from mfa.inference import inpaint as inpaint_rows
from mfa.masks import make_mask
from mfa.metrics import bits_per_dim, mean_log_likelihood
from mfa.model import MixtureOfFactorAnalyzers
from mfa.sgd import SGDTrainer

logger = logging.getLogger("mfa")

CHECKPOINT_NAME = "checkpoint.pt"
#: Above this many training values (N·D) EM streams uint8 batches instead of one float tensor.
STREAM_ABOVE = 2**28


@dataclass
class TrainResult:
    run_dir: Path
    model: MixtureOfFactorAnalyzers
    metrics: dict


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mfa")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder → its ``checkpoint.pt``; a file → itself."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_data(config: RunConfig) -> ImageData:
    """The dataset a run config names (``mfa.data.load_dataset`` with ``config.data``)."""
    return load_dataset(**config.data.load_kwargs())


def _training_data(data: ImageData, config: RunConfig, device: torch.device):
    n, d = data.train_pixels.shape
    if config.train.method == "em" and n * d > STREAM_ABOVE:
        # Large sets (CelebA) stay uint8 on the host and become float one batch at a time.
        batch = config.train.em.batch_size
        val = data.loader("val", batch_size=batch) if data.val_pixels.shape[0] else None
        return data.loader("train", batch_size=batch), val
    val = data.val if data.val_pixels.shape[0] else None
    return data.train.to(device), None if val is None else val.to(device)


def train(
    config: RunConfig | None,
    *,
    resume: str | Path | None = None,
    figures: bool = True,
    callbacks: tuple = (),
) -> TrainResult:
    """Train the model a config describes, in a new run folder (or continue ``resume``).

    Args:
        config: the run (ignored when resuming: the checkpoint's config is used).
        resume: a run folder or checkpoint to continue from its last saved state.
        figures: draw the sample, inpainting, outlier and factor figures at the end.
        callbacks: passed to the trainer's ``fit`` (``cb(trainer, model, record)``).

    Returns:
        The run folder, the trained model and the metrics written to ``metrics.json``.
    """
    ckpt: Checkpoint | None = None
    if resume is None and config is None:
        raise ValueError("train needs a config, or a run to resume")
    if resume is not None:
        ckpt_path = resolve_checkpoint(resume)
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.run_config is None:
            raise ValueError(f"{ckpt_path} holds no run config, so it cannot be resumed")
        config = ckpt.run_config
        run_dir = ckpt_path.parent
    else:
        run_dir = make_run_dir(config)
        save_config(config, run_dir / "config.yaml")
    handler = _attach_log(run_dir)
    try:
        return _train(config, run_dir, ckpt, figures, callbacks)
    finally:
        logging.getLogger("mfa").removeHandler(handler)
        handler.close()


def _train(config: RunConfig, run_dir: Path, ckpt: Checkpoint | None, figures: bool,
           callbacks: tuple = ()):
    device = resolve_device(config.device)
    logger.info("run folder %s; device %s", run_dir, device)
    data = load_data(config)
    logger.info("data %s: %s, image shape %s", data.name, data.sizes, data.image_shape)
    train_data, val_data = _training_data(data, config, device)
    mc = config.model
    if ckpt is not None:
        model = ckpt.model.to(device)
    else:
        model = MixtureOfFactorAnalyzers(
            mc.n_components, data.n_features, mc.n_factors, mc.noise, min_noise=mc.min_noise,
            generator=torch.Generator().manual_seed(config.seed), device=device,
        )
    trainer_config = config.trainer_config()
    trainer = (EMTrainer if config.train.method == "em" else SGDTrainer)(trainer_config)
    if ckpt is not None and ckpt.trainer_state is not None:
        trainer.load_state_dict(ckpt.trainer_state)
    meta = {"image_shape": list(data.image_shape), "dataset": data.name}

    def checkpoint(trainer_, model_):
        save_checkpoint(run_dir / CHECKPOINT_NAME, model_, run_config=config,
                        trainer_state=trainer_.state_dict(), metrics=meta)

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        trainer.fit(model, train_data, val_data, callbacks=callbacks, checkpoint_fn=checkpoint)
    for warning in caught:
        logger.warning("%s", warning.message)
    seconds = time.perf_counter() - started
    metrics = {**meta, "method": config.train.method, "train_seconds": seconds,
               "iterations": len(trainer.history)}
    metrics.update(evaluate_model(model, data, ("train", "val", "test")))
    save_checkpoint(run_dir / CHECKPOINT_NAME, model, run_config=config,
                    trainer_state=trainer.state_dict(), metrics=metrics)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (run_dir / "history.json").write_text(json.dumps(trainer.history, indent=2) + "\n")
    logger.info("metrics: %s", metrics)
    if config.output.plot and trainer.history:
        viz.plot_training_curve(trainer.history, run_dir / "curve.png",
                                title=f"{data.name}: K={mc.n_components}, L={mc.n_factors}")
    if figures:
        draw_figures(model, data, config, run_dir)
    return TrainResult(run_dir, model, metrics)


def evaluate_model(model: MixtureOfFactorAnalyzers, data: ImageData, splits) -> dict:
    """Mean held-out log-likelihood per split (nats per image) and, for dequantised data,
    bits/dim."""
    out = {}
    for split in splits:
        if data.pixels(split).shape[0] == 0:
            continue
        loader = data.loader(split, batch_size=1024, dtype=model.dtype)
        ll = mean_log_likelihood(model, loader)
        out[f"{split}_log_likelihood"] = ll
        if data.dequantize:
            out[f"{split}_bits_per_dim"] = float(bits_per_dim(ll, data.n_features))
    return out


def draw_figures(model: MixtureOfFactorAnalyzers, data: ImageData, config: RunConfig,
                 run_dir: Path) -> list[Path]:
    """The figures a run's config asks for, saved in ``run_dir``."""
    out = config.output
    paths = []
    gen_seed = config.seed
    if out.n_samples:
        paths.append(sample(model, data.image_shape, run_dir / "samples.png", n=out.n_samples,
                            nrow=out.grid_nrow, seed=gen_seed, scale=out.image_scale))
    if out.n_inpaint:
        for kind in out.inpaint_masks:
            paths.append(inpaint(model, data, run_dir / f"inpaint-{kind}.png", mask=kind,
                                 n=out.n_inpaint, n_samples=out.inpaint_samples, seed=gen_seed,
                                 scale=out.image_scale, mask_image=out.mask_image))
    paths.extend(outliers(model, data, run_dir, n=out.n_samples or 32,
                          nrow=out.grid_nrow, scale=out.image_scale))
    if out.n_factor_components:
        paths.append(visualize(model, data.image_shape, run_dir / "factors.png",
                               components=range(min(out.n_factor_components,
                                                    model.n_components)),
                               scale=out.image_scale))
    return paths


def sample(model, image_shape, path, *, n=64, nrow=8, seed=0, scale=2,
           per_component: bool = False, with_noise: bool = True) -> Path:
    """A grid of ``n`` samples (or, with ``per_component``, one row of ``nrow`` samples per
    component, rows ordered by weight) saved as a PNG. ``with_noise=False`` draws
    ``μ_k + A_k z`` without the pixel noise (see :meth:`MixtureOfFactorAnalyzers.sample`)."""
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
    images = viz.rows_to_images(x.float().cpu(), image_shape)
    return viz.save_image_grid(images, path, nrow, scale=scale)


def _component(model: MixtureOfFactorAnalyzers, k: int) -> MixtureOfFactorAnalyzers:
    one = torch.ones(1, dtype=model.dtype, device=model.device)
    return MixtureOfFactorAnalyzers.from_parameters(
        one, model.means[k : k + 1].detach(), model.factor_loadings[k : k + 1].detach(),
        model.noise_variance[k : k + 1].detach(), noise=model.noise,
    )


def inpaint(model, data: ImageData, path, *, mask="center", n=8, n_samples=3, split="test",
            seed=0, scale=2, mask_image=None, fraction=0.5) -> Path:
    """original | masked input | conditional mean | ``n_samples`` conditional samples, for
    the first ``n`` images of ``split``."""
    count = min(n, data.pixels(split).shape[0])
    x = data.dataset(split, dtype=model.dtype).rows(torch.arange(count)).to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    observed = make_mask(mask, data.image_shape, x.shape[0], generator=torch.Generator()
                             .manual_seed(seed), fraction=fraction,
                             mask_image=mask_image).to(model.device)
    with torch.no_grad():
        mean, samples = inpaint_rows(model, x, observed, n_samples, generator=gen)
    masked = torch.where(observed, x, torch.zeros_like(x))
    grid = viz.inpainting_grid(x.float().cpu(), masked.float().cpu(), mean.float().cpu(),
                               samples.float().cpu(), data.image_shape, observed.cpu())
    return viz.save_image(grid, path, scale=scale)


def outliers(model, data: ImageData, out_dir, *, split="test", n=32, nrow=8, scale=2):
    """Rank ``split`` by ``log p``: the ``n`` least likely images as a grid
    (``outliers.png``, least likely first) and every score as ``outliers.csv``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = data.loader(split, batch_size=1024, dtype=model.dtype)
    scores = []
    with torch.no_grad():
        for batch in loader:
            scores.append(model.log_prob(batch.to(model.device)).double().cpu())
    log_p = torch.cat(scores)
    order = torch.argsort(log_p)
    labels = data.labels(split)
    csv_path = out_dir / "outliers.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", "log_prob", "label"])
        for rank, i in enumerate(order.tolist()):
            label = "" if labels is None else int(labels[i])
            writer.writerow([rank, i, f"{log_p[i].item():.6f}", label])
    worst = order[: min(n, order.numel())]
    images = viz.rows_to_images(data.dataset(split).rows(worst), data.image_shape)
    png = viz.save_image_grid(images, out_dir / "outliers.png", nrow, scale=scale)
    logger.info("least likely %s images: %s", split,
                ", ".join(f"#{i} ({log_p[i].item():.1f})" for i in worst[:5].tolist()))
    return [png, csv_path]


def visualize(model, image_shape, path, *, components=(0,), scale=2, factor_scale=2.0) -> Path:
    """Per component: mean | noise | μ − c·A_i | A_i | μ + c·A_i for every factor column."""
    grid = viz.factor_grid(model, list(components), image_shape, factor_scale)
    return viz.save_image(grid, path, scale=scale)


def evaluate(checkpoint: str | Path, *, splits=("test",), ndb_bins: int = 0,
             config: RunConfig | None = None, seed: int = 0) -> dict:
    """Held-out log-likelihood, bits/dim and (``ndb_bins > 0``) NDB of model samples against
    the training bins, with real held-out images as the reference.

    ``config`` names the data (default: the checkpoint's own run config).
    """
    from mfa.metrics import ndb

    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    config = config or ckpt.run_config
    if config is None:
        raise ValueError(f"{checkpoint} holds no run config: cannot tell which data to load")
    data = load_data(config)
    model = ckpt.model
    result = evaluate_model(model, data, splits)
    if ndb_bins:
        train = data.train
        reference = data.as_float(splits[0])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            samples, _ = model.sample(reference.shape[0], generator=gen)
        model_ndb = ndb(train, samples.float(), n_bins=ndb_bins, seed=seed)
        real_ndb = ndb(train, reference, n_bins=ndb_bins, seed=seed)
        result.update({
            "ndb_bins": ndb_bins, "ndb": model_ndb.ndb, "ndb_over_k": model_ndb.ndb_over_k,
            "ndb_js": model_ndb.js_divergence, "ndb_real": real_ndb.ndb,
            "ndb_over_k_real": real_ndb.ndb_over_k, "ndb_js_real": real_ndb.js_divergence,
        })
    return result
