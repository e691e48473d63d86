"""Adam on the minibatch negative marginal log-likelihood (as in Richardson & Weiss, 2018)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from mfa import distributed, linalg, missing, training
from mfa._data_stream import DataSource, gather_rows, reject_numpy
from mfa._terms import ill_conditioned
from mfa._validation import (
    check_bool_field,
    check_choice_field,
    check_device_field,
    check_int_fields,
    check_real_field,
)
from mfa.data.quantized import QuantizedRows
from mfa.init import initialise
from mfa.loader_shards import check_same_batch_count, shard_global_batches
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior, check_prior_fields
from mfa.training import ConvergenceWarning

__all__ = ["SGDConfig", "SGDTrainer"]

logger = logging.getLogger(__name__)


@dataclass
class SGDConfig:
    """Settings of :class:`SGDTrainer`."""

    lr: float = 5e-3  # Adam learning rate
    batch_size: int = 256  # rows per step
    epochs: int = 20  # passes over the training data
    schedule: Literal["constant", "cosine", "step"] = "constant"  # learning-rate schedule
    grad_clip: float | None = 10.0  # max global gradient norm; None disables clipping
    val_fraction: float = 0.1  # held out for early stopping when no validation data is given
    patience: int = 5  # epochs without validation improvement before stopping (0: never)
    seed: int = 0  # seeds the split, the shuffling and the initialisation
    device: str | None = None  # None: the model's device
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 2  # factor-analysis iterations of the complete-data initial fit
    init_samples: int = 50_000  # rows (a seeded random subset) used by the initialisation
    variance_floor: float = 1e-5  # noise-variance floor of the initialisation
    weight_decay: float = 0.0  # Adam weight decay
    # The priors of MAP EM (mfa.priors) as a penalty: −log p(θ) / N_train added to the loss.
    # Strength 0, concentration 1, ridge 0 (the defaults): no penalty.
    noise_prior_strength: float = 0.0  # ν, pseudo-rows of the inverse-gamma noise prior
    noise_prior_variance: float = 1e-4  # s₀, their noise variance
    weight_concentration: float = 1.0  # α of the Dirichlet prior on the weights
    loading_ridge: float = 0.0  # λ of the Gaussian prior on the loading rows
    checkpoint_every: int = 0  # call checkpoint_fn every this many epochs (0: only at the end)
    progress: bool = True  # tqdm progress bar
    # TF32 tensor cores for the float32 products during fit (CUDA only; see EMConfig.allow_tf32)
    allow_tf32: bool = False
    # "allow": NaN marks a missing entry and Adam maximises the observed-data likelihood
    # (mfa.missing.row_log_prob); "error": data with NaN is refused
    missing: Literal["error", "allow"] = "error"

    def validate(self) -> None:
        """Check every field; the trainer's limits live here only.

        Raises:
            ValueError: naming the field as ``SGDConfig.<field>`` with the bad value.
        """
        check_real_field(self, "lr", minimum=0, strict=True)
        check_real_field(self, "weight_decay", minimum=0)
        check_prior_fields(self, allow_auto=False)
        check_real_field(self, "variance_floor", minimum=0, strict=True)
        check_int_fields(self, {"batch_size": 1, "epochs": 1, "kmeans_iter": 1,
                                "init_samples": 1, "complete_iter": 0, "checkpoint_every": 0,
                                "patience": 0, "seed": 0})
        check_choice_field(self, "schedule", ("constant", "cosine", "step"))
        check_real_field(self, "grad_clip", minimum=0, strict=True, allow_none=True)
        check_real_field(self, "val_fraction", minimum=0, maximum=1)
        check_choice_field(self, "init", ("kmeans", "random", "none"))
        check_choice_field(self, "missing", ("error", "allow"))
        check_device_field(self)
        check_bool_field(self, "progress")
        check_bool_field(self, "allow_tf32")


#: An epoch whose mean train log-likelihood per row falls more than this many times
#: ``(|reference| + D)`` nats below the reference (the initial fit, or the best epoch so far)
#: has diverged: a working optimisation never loses that much.
DIVERGENCE_FACTOR = 10.0

#: What a resumed fit's config may change from the saved one (how long and where it runs,
#: how often it saves, progress); anything else would be ignored, so it is refused.
RESUMABLE = frozenset({"epochs", "checkpoint_every", "progress", "device"})


def _diverged(train_ll: float, val_ll: float | None, reference: float | None,
              n_features: int) -> bool:
    """Whether an epoch's scores say the optimisation has diverged: non-finite, or the train
    log-likelihood far below ``reference`` (see :data:`DIVERGENCE_FACTOR`)."""
    if not math.isfinite(train_ll) or (val_ll is not None and not math.isfinite(val_ll)):
        return True
    if reference is None or not math.isfinite(reference):
        return False
    return train_ll < reference - DIVERGENCE_FACTOR * (abs(reference) + n_features)


class SGDTrainer:
    """Adam on ``−mean log p(x)`` over shuffled minibatches; trains every parameter (weights,
    means, loadings, noise) through the model's unconstrained parametrisation.

    Args:
        config: an :class:`SGDConfig` (defaults when ``None``).

    ``fit`` takes a tensor ``[N, D]``, a ``Dataset`` (shuffled by a seeded ``DataLoader``) or
    an iterable of batches such as a ``DataLoader`` (used as it comes). Without explicit
    validation data a seeded ``val_fraction`` of a tensor's or Dataset's rows is held out; the
    parameters with the best validation log-likelihood are kept (early stopping after
    ``patience`` epochs without improvement).

    Divergence (a learning rate too large) raises ``FloatingPointError``, as a NaN loss
    does, saying so and naming ``SGDConfig.lr``: an epoch whose scores are not finite, or
    whose mean train log-likelihood falls far below that of the initial parameters (or of
    the best epoch so far; see :data:`DIVERGENCE_FACTOR`). The model is first reset to the
    best epoch's parameters (the initial ones if no epoch finished), so it stays usable.

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_log_likelihood`` (mean over the epoch's
            minibatches), ``val_log_likelihood``, ``lr`` (that of the epoch's first step),
            ``seconds``.
    """

    def __init__(self, config: SGDConfig | None = None) -> None:
        self.config = config or SGDConfig()
        self.config.validate()
        self.history: list[dict] = []
        self._state: dict = {}
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """Resume state (primitives and tensors only); save the model's state beside it."""
        return training.save_state(self._state, self.config, self.history)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next :meth:`fit` continues where it stopped,
        provided the model holds the parameters saved with this state."""
        required = {"epoch", "optimizer", "scheduler", "generator", "best_params", "best_val"}
        types = {
            "epoch": (int,), "optimizer": (dict,), "scheduler": (dict,),
            "best_val": (float, int, type(None)), "best_params": (dict, type(None)),
            "bad_epochs": (int,), "reference_log_likelihood": (float, int, type(None)),
            "stopped": (bool,), "final": (bool,),
        }
        resume, history = training.restore_state(state, required, "SGDTrainer", types)
        for key in ("epoch", "bad_epochs"):
            if resume.get(key, 0) < 0:
                raise ValueError(f"SGDTrainer state key {key!r} must be >= 0, got {resume[key]}")
        training.check_resumed_config(resume, self.config, "SGDTrainer", RESUMABLE)
        saved, epochs = resume.get("config"), self.config.epochs
        if isinstance(saved, dict) and saved.get("epochs", epochs) != epochs:
            # "final": saved after fit() returned (before 2026-12: read from the epoch count)
            if resume.get("stopped") or resume.get("final", resume["epoch"] >= saved["epochs"]):
                raise ValueError(
                    f"SGDTrainer state is of a finished fit ({resume['epoch']} of "
                    f"{saved['epochs']} epochs{', stopped early' if resume.get('stopped') else ''}"
                    f"): its model holds the best epoch, not the last one its Adam state "
                    f"continues from, so epochs={self.config.epochs} would not continue the same "
                    "run; start a new fit from the model (init='none')")
            if epochs < resume["epoch"]:
                raise ValueError(f"SGDTrainer state has already done {resume['epoch']} epochs; "
                                 f"epochs={epochs} is below that")
            if saved.get("schedule", "constant") != "constant":
                raise ValueError(
                    f"SGDTrainer state was saved with schedule={saved['schedule']!r}, laid out "
                    f"over epochs={saved['epochs']}; resume with that many epochs (not "
                    f"{self.config.epochs}) or start a new fit")
        self._resume, self.history = resume, history

    def _split(self, data, validation, model):
        """``(train, validation source)``: a seeded ``val_fraction`` of a tensor or Dataset is
        held out when no validation data is given."""
        cfg = self.config
        allow = cfg.missing == "allow"
        reject_numpy(data, "data")
        if isinstance(data, (Tensor, QuantizedRows)):
            data = DataSource(data, model, cfg.batch_size, "data", allow_missing=allow).tensor
        elif not isinstance(data, (Dataset, Iterable)):
            raise TypeError(
                f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}"
            )
        if validation is None:
            data, validation = training.hold_out(data, model, cfg.val_fraction, cfg.seed,
                                                 cfg.batch_size, allow_missing=allow)
            if validation is None:
                return data, None
        return data, DataSource(validation, model, cfg.batch_size, "validation", shard=True,
                                allow_missing=allow)

    def prior(self) -> Prior:
        """The config's priors, as a :class:`~mfa.priors.Prior`."""
        return Prior.from_config(self.config, self.config.noise_prior_variance)

    @staticmethod
    def penalty(model: MixtureOfFactorAnalyzers, prior: Prior, n_train: int) -> Tensor:
        """``−log p(θ) / n_train`` (constants dropped; see :mod:`mfa.priors`): added to the
        mean negative log-likelihood of a minibatch, so an epoch's steps follow the MAP
        objective per row. Differentiable through the model's parameters."""
        return -prior.log_prior_of(model) / n_train

    def _batches(self, train, source, gen):
        if source is not None:
            yield from source
            return
        perm = torch.randperm(train.shape[0], generator=gen).to(train.device)
        for i in range(0, train.shape[0], self.config.batch_size):
            # Under torch.distributed: this process's part of the global batch.
            yield train[distributed.shard_batch(perm[i : i + self.config.batch_size])]

    @training.with_config_tf32
    def fit(
        self,
        model: MixtureOfFactorAnalyzers,
        data: Tensor | Dataset | Iterable,
        validation: Tensor | Dataset | Iterable | None = None,
        callbacks: Sequence[Callable] = (),
        checkpoint_fn: Callable | None = None,
    ) -> MixtureOfFactorAnalyzers:
        """Fit ``model`` in place and return it.

        Args:
            model: the model to train.
            data: ``[N, D]`` training rows (a tensor, or :class:`~mfa.data.QuantizedRows`
                made float per batch on the model's device), a ``Dataset`` or a
                ``DataLoader``.
            validation: held-out rows for early stopping, in any of those forms (else a split
                of ``data``).
            callbacks: ``cb(trainer, model, record)`` after each epoch.
            checkpoint_fn: ``fn(trainer, model)`` every ``checkpoint_every`` epochs and at
                the end.
        """
        cfg = self.config
        if cfg.device is not None:
            model.to(cfg.device)
        resume = self._resume or {}
        training.check_fit_inputs(model, data, validation,
                                  {"best_params": resume.get("best_params")}, "SGDTrainer")
        if resume:  # saved for this model? (else Adam's fused kernel reads past its buffers)
            _check_adam_state(resume["optimizer"], model)
        checkpoint_fn = distributed.main_process_only(checkpoint_fn)
        gen = torch.Generator().manual_seed(cfg.seed)
        allow = cfg.missing == "allow"  # rows may hold NaN (mfa.missing)
        train, val_source = self._split(data, validation, model)
        per_rank = False  # the training rows are this process's own (a loader of them)
        if isinstance(train, (Tensor, QuantizedRows)):  # rows drawn by index, shuffled
            n = train.shape[0]
            steps_per_epoch = math.ceil(n / cfg.batch_size)
            train_source = None
        else:
            # A Dataset is shuffled by a DataLoader driven by the trainer's generator; any other
            # iterable (e.g. a DataLoader) is used as it comes.
            loader = (DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
                      if isinstance(train, Dataset) and not isinstance(train, IterableDataset)
                      else DataLoader(train, batch_size=cfg.batch_size)
                      if isinstance(train, IterableDataset) else train)
            # Under torch.distributed each process reads its part of every global batch.
            sharded = shard_global_batches(loader)
            per_rank = distributed.is_active() and sharded is loader  # this process's rows
            train_source = DataSource(sharded, model, cfg.batch_size, "data",
                                      allow_missing=allow)
            try:  # (a DataLoader of an IterableDataset has __len__ only if the dataset has)
                steps_per_epoch = len(loader)
            except TypeError:
                if cfg.schedule != "constant":  # stepped per batch: its length is needed
                    raise ValueError(
                        f"SGDConfig.schedule={cfg.schedule!r} needs the number of batches an "
                        f"epoch, but the training data ({type(train).__name__}) has no length; "
                        "use schedule='constant' or data with a length") from None
                steps_per_epoch = None
            if per_rank and steps_per_epoch is not None:
                check_same_batch_count(steps_per_epoch)
            steps_per_epoch = steps_per_epoch or 1
        prior = self.prior()
        n_train = None if prior.is_flat else _count_rows(train)
        if n_train is not None and per_rank:
            # the penalty's 1/N: every process's rows, the same on all of them
            n_train = round(distributed.sum_across_processes(n_train)[0])
        optimizer = _adam(list(model.parameters()), cfg.lr, cfg.weight_decay)
        if cfg.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=cfg.epochs * steps_per_epoch
            )
        elif cfg.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=max(1, cfg.epochs // 3) * steps_per_epoch, gamma=0.3
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if self._resume is not None:
            state, self._resume = self._resume, None
            start_epoch = int(state["epoch"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            best_val, best_params = state["best_val"], state["best_params"]
            bad_epochs = int(state.get("bad_epochs", 0))
            # A fit that stopped early is finished: resuming it returns its best epoch.
            stopped = bool(state.get("stopped", cfg.patience and bad_epochs >= cfg.patience))
            # What state_dict() gives until an epoch runs (none does when stopped).
            self._state = {key: value for key, value in state.items()
                           if key not in ("config", "history")}
            self._state["stopped"] = stopped
            # Checkpoints from before the divergence check lack the reference: the best epoch.
            reference = state.get("reference_log_likelihood")
            if reference is None:
                reference = max((r["train_log_likelihood"] for r in self.history),
                                default=None)
        else:
            self.history = []
            if cfg.init != "none":  # gather no rows for nothing (GBs at CelebA size)
                init_source = DataSource(train if train_source is None else loader, model,
                                         cfg.batch_size, shard=not isinstance(train, Dataset),
                                         allow_missing=allow)
                initialise(
                    model, gather_rows(init_source, cfg.init_samples, cfg.seed),
                    cfg.init, seed=cfg.seed, variance_floor=cfg.variance_floor,
                    kmeans_iter=cfg.kmeans_iter, complete_iter=cfg.complete_iter,
                )
                distributed.broadcast_model(model)  # the same start on every process
            start_epoch, best_val, best_params, bad_epochs = 0, -math.inf, None, 0
            reference, stopped = None, False
        # Restored when the optimisation fails before any epoch has been kept.
        start_params = training.clone_params(model) if best_params is None else None

        def fail(message: str) -> FloatingPointError:
            model.load_state_dict(best_params if best_params is not None else start_params)
            kept = "the best epoch's" if best_params is not None else "the initial"
            return FloatingPointError(f"{message}; the model holds {kept} parameters")

        bar = tqdm(range(start_epoch, start_epoch if stopped else cfg.epochs), desc="Adam",
                   leave=False,
                   disable=not cfg.progress or not distributed.is_main_process())
        for epoch in bar:
            started = time.perf_counter()
            total, seen, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
            # The plain Woodbury loss is cheaper, but its gradients were 30-90x off for a
            # float32 component with a noise variance far below its loadings' (checked per epoch).
            exact = bool(ill_conditioned(model.factor_loadings, model.noise_variance).any())
            for batch in self._batches(train, train_source, gen):
                optimizer.zero_grad(set_to_none=True)
                # The observed-data likelihood when rows may hold NaN (mfa.missing).
                log_p = (missing.row_log_prob(model, batch) if allow
                         else linalg.logsumexp(model._component_log_prob(batch, exact=exact)))
                # −mean log p over the global batch (gradients added across processes).
                nll, rows = distributed.backward_mean(-log_p, model.parameters())
                loss = nll
                if n_train is not None:  # the priors' penalty: global, the same everywhere
                    penalty = self.penalty(model, prior, n_train)
                    penalty.backward()
                    loss = nll + penalty.detach().to(nll.dtype)
                if not torch.isfinite(loss):
                    raise fail(
                        f"Adam epoch {epoch + 1}: the minibatch loss is {loss.item()}; lower "
                        f"the learning rate (SGDConfig.lr={cfg.lr:g}) or raise min_noise"
                    )
                if reference is None:  # the initial parameters' fit to the first minibatch
                    reference = -nll.item()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                total += -nll.item() * rows
                seen += rows
            train_ll = total / max(seen, 1)
            val_ll = training.evaluate(model, val_source) if val_source is not None else None
            if _diverged(train_ll, val_ll, reference, model.n_features):
                val_text = "" if val_ll is None else f" (validation: {val_ll:.4g})"
                raise fail(
                    f"Adam diverged at epoch {epoch + 1}: the mean train log-likelihood is "
                    f"{train_ll:.4g} nats per row{val_text}, down from {reference:.4g}; use a "
                    f"smaller learning rate than SGDConfig.lr={cfg.lr:g}"
                )
            reference = train_ll if reference is None else max(reference, train_ll)
            score = val_ll if val_ll is not None else train_ll
            if score > best_val:
                best_val, bad_epochs = score, 0
                best_params = training.clone_params(model)
            else:
                bad_epochs += 1
            record = {
                "epoch": epoch + 1, "train_log_likelihood": train_ll,
                "val_log_likelihood": val_ll, "lr": lr,
                "seconds": time.perf_counter() - started,
            }
            self.history.append(record)
            bar.set_postfix(ll=f"{train_ll:.4f}", val=f"{val_ll:.4f}" if val_ll else "-")
            logger.debug("Adam epoch %d: %s", epoch + 1, record)
            # Decided before the checkpoint: resumed from it, the fit must stop here too.
            stopped = bool(cfg.patience and bad_epochs >= cfg.patience)
            self._state = {
                "epoch": epoch + 1, "optimizer": copy.deepcopy(optimizer.state_dict()),
                "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                "best_val": best_val, "best_params": best_params, "bad_epochs": bad_epochs,
                "reference_log_likelihood": reference, "stopped": stopped, "final": False,
            }
            if checkpoint_fn is not None and cfg.checkpoint_every and (
                (epoch + 1) % cfg.checkpoint_every == 0
            ):
                checkpoint_fn(self, model)
            for callback in callbacks:
                callback(self, model, record)
            if stopped:
                logger.info("Adam: early stop after epoch %d (no improvement in %d epochs)",
                            epoch + 1, cfg.patience)
                break
        bar.close()
        if best_params is not None:
            model.load_state_dict(best_params)
        if not stopped and val_source is None and cfg.epochs > 0:
            warnings.warn(
                f"Adam ran all {cfg.epochs} epochs without validation data to stop on",
                ConvergenceWarning, stacklevel=3,
            )
        if self._state:  # the model now holds the best epoch, not the last
            self._state["final"] = True
        if checkpoint_fn is not None:
            checkpoint_fn(self, model)
        return model


def _check_adam_state(state: dict, model: MixtureOfFactorAnalyzers) -> None:
    """Refuse a saved Adam state whose moment buffers do not have the shapes of ``model``'s
    parameters (Adam's fused kernel would read past them)."""
    params = list(model.parameters())
    groups = state.get("param_groups")
    moments = state.get("state")
    if (not isinstance(groups, list) or len(groups) != 1 or not isinstance(moments, dict)
            or list(groups[0].get("params", ())) != list(range(len(params)))):
        raise ValueError("SGDTrainer state key 'optimizer' is not an Adam state of this "
                         f"model's {len(params)} parameters")
    for index, buffers in moments.items():
        if not 0 <= int(index) < len(params) or not isinstance(buffers, dict):
            raise ValueError(f"SGDTrainer state key 'optimizer' has no parameter {index}")
        shape = params[int(index)].shape
        for key in ("exp_avg", "exp_avg_sq"):
            value = buffers.get(key)
            if not isinstance(value, Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"SGDTrainer state: Adam's {key} of parameter {index} has shape {got}, but "
                    f"the model's is {tuple(shape)}: the state was saved for another model")


def _adam(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with its fused kernel where the parameters' device has one (the same update in
    one pass over each tensor: 0.3 against 0.7 ms a step for K=50, D=784, L=6 on one CPU
    thread), else the default ``foreach`` implementation."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _count_rows(train) -> int:
    """Rows of the training data (for the prior penalty's ``1/N``)."""
    if isinstance(train, (Tensor, QuantizedRows)):
        return train.shape[0]
    if isinstance(train, Dataset):
        return len(train)
    sampler = getattr(train, "sampler", None)  # a DataLoader's: the rows it draws an epoch
    if sampler is not None and not isinstance(train.dataset, IterableDataset):
        with contextlib.suppress(TypeError):
            return len(sampler)
    dataset = getattr(train, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    raise ValueError(
        "SGDConfig priors (noise_prior_strength > 0, weight_concentration > 1 or "
        "loading_ridge > 0) need the number of training rows: pass a tensor, a Dataset or a "
        f"DataLoader with a sized dataset, got {type(train).__name__}"
    )
