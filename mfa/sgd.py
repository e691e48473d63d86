"""Adam on the minibatch negative marginal log-likelihood (as in Richardson & Weiss, 2018)."""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mfa import distributed, linalg, missing, training
from mfa._data_stream import DataSource, RowCollate, gather_rows, reject_numpy
from mfa._terms import SHARP_LOSS_LIMIT, ill_conditioned, woodbury_rounding
from mfa._validation import supported_device
from mfa.adam import (
    add_weight_decay,
    check_adam_state,
    count_rows,
    drop_saved_weight_decay,
    make_adam,
    scaled_step,
    step_buffers,
    unknown_rows,
)
from mfa.data.quantized import QuantizedRows
from mfa.fit_agreement import check_same_fit
from mfa.init import initialise
from mfa.loader_shards import check_same_batch_count, reads_whole_dataset, shard_global_batches
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior
from mfa.sgd_config import SGDConfig, check_resumed_state
from mfa.sgd_start import em_start
from mfa.training import ConvergenceWarning

__all__ = ["SGDConfig", "SGDTrainer"]

logger = logging.getLogger(__name__)


#: An epoch whose mean train log-likelihood per row falls more than this many times
#: ``(|reference| + D)`` nats below the reference (the initial fit, or the best epoch so far)
#: has diverged: a working optimisation never loses that much.
DIVERGENCE_FACTOR = 10.0

def _diverged(train_ll: float, val_ll: float | None, reference: float | None,
              n_features: int) -> bool:
    """Whether an epoch's scores say the optimisation has diverged: non-finite, or the train
    log-likelihood far below ``reference`` (see :data:`DIVERGENCE_FACTOR`)."""
    if not math.isfinite(train_ll) or (val_ll is not None and not math.isfinite(val_ll)):
        return True
    if reference is None or not math.isfinite(reference):
        return False
    return train_ll < reference - DIVERGENCE_FACTOR * (abs(reference) + n_features)


def _check_weights_under_prior(model: MixtureOfFactorAnalyzers, prior: Prior) -> None:
    """Refuse a component of weight 0 under a Dirichlet weight prior (``α > 1``): its
    log-prior ``(α − 1) log 0`` is ``−inf``, so every minibatch loss was inf at any learning
    rate (blamed on ``SGDConfig.lr``), and Adam cannot move a logit of ``−inf``. (EM copes:
    its counts ``N_k + α − 1`` make the weight positive.)"""
    zero = (model.weights.detach() == 0).nonzero().flatten().tolist()
    if prior.has_weight_prior and zero:
        raise ValueError(
            f"SGDConfig.weight_concentration={prior.weight_concentration:g} (> 1) gives "
            f"component(s) {zero}, of weight 0, a log-prior of -inf: the loss would be inf at "
            "any learning rate; give them a positive weight (set_parameters(weights=...)), "
            "set weight_concentration=1, or fit with EMTrainer (its MAP counts make them "
            "positive)")


class SGDTrainer:
    """Adam on ``−mean log p(x)`` over shuffled minibatches; trains every parameter (weights,
    means, loadings, noise) through the model's unconstrained parametrisation.

    Args:
        config: an :class:`SGDConfig` (defaults when ``None``).

    ``fit`` takes a tensor ``[N, D]``, a ``Dataset`` (shuffled by a seeded ``DataLoader``) or
    an iterable of batches such as a ``DataLoader`` (used as it comes). Without explicit
    validation data a seeded ``val_fraction`` of a tensor's or Dataset's rows is held out; the
    parameters with the best validation log-likelihood are kept (early stopping after
    ``patience`` epochs without improvement). With no validation rows at all, every epoch
    runs and the last is kept (a ``ConvergenceWarning`` says so).

    Divergence (a learning rate too large) raises ``FloatingPointError``, as a NaN loss or
    non-finite gradients do, saying so and naming ``SGDConfig.lr``: an epoch whose scores are
    not finite, or whose mean train log-likelihood falls far below that of the initial
    parameters (or of the best epoch so far; see :data:`DIVERGENCE_FACTOR`). The model is
    first reset to the best epoch's parameters (with validation data; without, the last
    finished epoch's; the initial ones if no epoch finished), and the error says which, so
    it stays usable.

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_log_likelihood`` (mean per row over
            the epoch's minibatches, each scored before its step), ``val_log_likelihood``,
            ``lr`` (that of the epoch's first step), ``seconds``.
    """

    def __init__(self, config: SGDConfig | None = None) -> None:
        self.config = config or SGDConfig()
        if not isinstance(self.config, SGDConfig):
            raise TypeError(f"SGDTrainer takes an SGDConfig, got {type(self.config).__name__}")
        self.config.validate()
        self.history: list[dict] = []
        self._state, self._resume = {}, None  # (dict; dict | None)
        #: ``s₀`` chosen at the start (``noise_prior_variance="auto"``), else ``None``.
        self.selected_noise_prior_variance: float | None = None
        #: Validation log-likelihood of the start (mean per row; ``None`` without validation).
        self.start_val_log_likelihood: float | None = None

    def state_dict(self) -> dict:
        """Resume state (primitives and tensors only); save the model's state beside it."""
        return training.save_state(self._state, self.config, self.history)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next :meth:`fit` continues where it stopped,
        provided the model holds the parameters saved with this state. Exactly so for a
        tensor, ``QuantizedRows`` or ``Dataset`` (the trainer's generator, saved here, draws
        their order); a ``DataLoader`` you pass keeps its own sampler and generator, which
        this state does not hold, so its epochs after a resume come in another order."""
        required = {"epoch", "optimizer", "scheduler", "generator", "best_params", "best_val"}
        types = {
            "epoch": (int,), "optimizer": (dict,), "scheduler": (dict,),
            "best_val": (float, int, type(None)), "best_params": (dict, type(None)),
            "bad_epochs": (int,), "reference_log_likelihood": (float, int, type(None)),
            "stopped": (bool,), "final": (bool,),
            "noise_prior_variance": (float, int, type(None)),
            "start_val": (float, int, type(None)), "n_train": (float, int, type(None)),
        }
        resume, history = training.restore_state(state, required, "SGDTrainer", types)
        check_resumed_state(resume, self.config)
        self._resume, self.history = resume, history

    def _split(self, data, validation, model):
        """``(train, validation source)``: a seeded ``val_fraction`` of a tensor or Dataset is
        held out when no validation data is given."""
        cfg = self.config
        allow = cfg.missing == "allow"
        reject_numpy(data, "data")
        if isinstance(data, (Tensor, QuantizedRows)):
            data = DataSource(data, model, cfg.batch_size, "data", allow_missing=allow).tensor
            distributed.check_same_rows(data, "data")  # (global batches index it)
        elif not isinstance(data, (Dataset, Iterable)):
            raise TypeError(
                f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}"
            )
        if validation is None:
            data, validation = training.hold_out(data, model, cfg.val_fraction, cfg.seed,
                                                 cfg.batch_size, allow_missing=allow)
            if validation is None:
                return data, None
        val_source = DataSource(validation, model, cfg.batch_size, "validation", shard=True,
                                allow_missing=allow)
        distributed.check_same_rows(val_source.tensor, "validation")
        return data, val_source

    def prior(self) -> Prior:
        """The config's priors, as a :class:`~mfa.priors.Prior` (``s₀`` the one chosen at the
        start when ``"auto"``; the quantisation variance before a fit has chosen one)."""
        s0 = self.config.noise_prior_variance
        if s0 == "auto":
            s0 = self.selected_noise_prior_variance or self.config.quantization_variance
        return Prior.from_config(self.config, s0)

    def _passes_at_start(self, has_validation: bool) -> tuple[bool, bool]:
        """``(search, step)``: whether the start chooses ``s₀`` and takes an EM step."""
        cfg = self.config
        return cfg.auto_noise_prior and has_validation, cfg.em_start and cfg.init != "none"

    def _start(self, model, train, loader, val_source,
               floor: float) -> tuple[float | None, float | None]:
        """The noise prior's ``s₀`` ("auto": chosen on ``val_source``) and, after an
        initialisation with ``em_start``, one MAP EM step (:mod:`mfa.sgd_start`); returns
        ``(s₀ or None, training rows the pass read or None)``."""
        cfg = self.config
        auto = cfg.auto_noise_prior
        search, step = self._passes_at_start(val_source is not None)
        if auto and val_source is None:
            warnings.warn(
                "SGDConfig.noise_prior_variance='auto' needs validation data (pass "
                "validation=, or a tensor/Dataset with val_fraction > 0); using the weakest "
                f"noise prior, s0 = quantization_variance = {cfg.quantization_variance:g}",
                UserWarning, stacklevel=4)
        self.selected_noise_prior_variance = None  # (prior() then gives the grid's bottom)
        if not (search or step):
            return (cfg.quantization_variance if auto else None), None
        indexable = isinstance(train, Dataset) and not isinstance(train, IterableDataset)
        rows = train if loader is None or indexable else loader  # (the Dataset: not its
        # shuffling loader, whose draws would move the epochs' order)
        source = DataSource(rows, model, max(cfg.batch_size, 4096), "data", shard=True,
                            allow_missing=cfg.missing == "allow")
        s0, rows = em_start(model, source, val_source, self.prior(),
                      auto=search, step=step, lower=cfg.quantization_variance,
                      per_decade=cfg.search_per_decade, variance_floor=floor)
        return (s0 if auto else None), rows

    @staticmethod
    def penalty(model: MixtureOfFactorAnalyzers, prior: Prior, n_train: int) -> Tensor:
        """``−log p(θ) / n_train`` (constants dropped; see :mod:`mfa.priors`): added to the
        mean negative log-likelihood of a minibatch, so an epoch's steps follow the MAP
        objective per row. Differentiable through the model's parameters."""
        return -prior.log_prior_of(model) / n_train

    def _batches(self, train, source, gen):
        if source is not None:  # (a process alone skips a 0-row batch: its mean loss is NaN)
            yield from (batch for batch in source if batch.shape[0] or distributed.is_active())
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
        cfg.validate()  # (again: a field may have been set since __init__)
        resume = self._resume or {}
        if resume:  # (again: as for validate)
            check_resumed_state(resume, cfg)
        training.check_fit_inputs(model, data, validation,
                                  {"best_params": resume.get("best_params")}, "SGDTrainer")
        if cfg.device is not None:
            model.to(supported_device(cfg.device, "SGDConfig.device"))
        if resume:  # saved for this model? (else Adam's fused kernel reads past its buffers)
            check_adam_state(resume["optimizer"], model)
        check_same_fit("SGDTrainer", cfg, model, validation, resume)  # (before any collective)
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
            loader = (DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                 collate_fn=RowCollate(model.n_features, "data"))
                      if isinstance(train, Dataset) and not isinstance(train, IterableDataset)
                      else DataLoader(train, batch_size=cfg.batch_size,
                                      collate_fn=RowCollate(model.n_features, "data"),
                                      generator=torch.Generator())  # (not the global RNG)
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
        # The penalty's 1/N: the data's length, else the rows the start's pass reads.
        needs_rows = not Prior.from_config(cfg, 1.0).is_flat  # (whatever s₀ is)
        passes = self._resume is not None or any(self._passes_at_start(val_source is not None))
        n_train = count_rows(train, dataset_if_unknown=not passes) if needs_rows else None
        if needs_rows and n_train is None and not passes:
            raise unknown_rows(train)
        optimizer = make_adam(list(model.parameters()), cfg.lr)
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
            drop_saved_weight_decay(optimizer)
            scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"].cpu())  # (a checkpoint read onto a GPU: cuda)
            best_val, best_params = state["best_val"], state["best_params"]
            self.selected_noise_prior_variance = state.get("noise_prior_variance")
            counted = n if (n := state.get("n_train")) is not None else count_rows(train, True)
            self.start_val_log_likelihood = state.get("start_val")
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
        else:  # (and no earlier fit's state: an interrupted first epoch described that one)
            self.history, self.start_val_log_likelihood, self._state = [], None, {}
            floor = max(cfg.variance_floor, model.min_noise * (1 + 1e-5) + 1e-30)
            if cfg.init != "none":  # gather no rows for nothing (GBs at CelebA size)
                # A loader over a whole Dataset is the same on every process: its rows are
                # drawn as one process draws them (not sharded, which EM's every-row-once
                # check would refuse for drop_last=True).
                whole = train_source is not None and reads_whole_dataset(loader)
                init_source = DataSource(train if train_source is None else loader, model,
                                         cfg.batch_size,
                                         shard=not (isinstance(train, Dataset) or whole),
                                         allow_missing=allow)
                initialise(
                    model, gather_rows(init_source, cfg.init_samples, cfg.seed),
                    cfg.init, seed=cfg.seed, variance_floor=floor,
                    kmeans_iter=cfg.kmeans_iter, complete_iter=cfg.complete_iter,
                )
            # the same start on every process (init="none" too: each process then trained
            # its own model from its own start with the shared gradients)
            distributed.broadcast_model(model)
            # (under torch.distributed the start reads each process's part of the epochs'
            # global batches: the rows one process reads, drawn from the same generator)
            self.selected_noise_prior_variance, counted = self._start(
                model, train, sharded if train_source is not None else None, val_source, floor)
            start_epoch, best_val, best_params, bad_epochs = 0, -math.inf, None, 0
            reference, stopped = None, False
            if val_source is not None:  # the start competes with the epochs
                best_val = self.start_val_log_likelihood = training.evaluate(model, val_source)
                best_params = training.clone_params(model)
        prior = self.prior()
        _check_weights_under_prior(model, prior)  # (the model as the epochs would start)
        if needs_rows and n_train is None:  # counted by the start's pass (every process's)
            n_train = counted
            if n_train is None:
                raise unknown_rows(train)
        elif n_train is not None and per_rank:
            # the penalty's 1/N: every process's rows, the same on all of them
            n_train = round(distributed.sum_across_processes(n_train)[0])
        # Restored when the optimisation fails before any epoch has been kept.
        start_params = training.clone_params(model) if best_params is None else None

        failed: list[FloatingPointError] = []  # (fail()'s: the model is set as they say)

        def fail(message: str) -> FloatingPointError:
            model.load_state_dict(best_params if best_params is not None else start_params)
            start = best_params is None or best_val == self.start_val_log_likelihood
            kept = ("the initial" if start else "the best epoch's" if val_source is not None
                    else "the last finished epoch's")
            failed.append(FloatingPointError(f"{message}; the model holds {kept} parameters"))
            return failed[-1]

        before = step_buffers(model) if cfg.step_scale == "noise" else None  # (scaled_step)
        bar = training.progress_bar(range(start_epoch, start_epoch if stopped else cfg.epochs),
                                    cfg.progress and distributed.is_main_process(),
                                    desc="Adam", leave=False)
        # Interrupted inside an epoch (Ctrl-C, a data error), the model goes back to that epoch's
        epoch_start = None  # start, as state_dict() says (a resume was 0.018 off, silently)
        try:
            for epoch in bar:
                epoch_start = training.clone_params(model)
                started = time.perf_counter()
                total, seen, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
                # The plain Woodbury loss is cheaper, but its gradients were 30-90x off (float32, a
                # noise far below its loadings') and its loss biased on sharp fits; per epoch.
                a, d = model.factor_loadings, model.noise_variance
                exact = (bool(ill_conditioned(a, d).any())
                         or woodbury_rounding(a, d) > SHARP_LOSS_LIMIT)
                for batch in self._batches(train, train_source, gen):
                    optimizer.zero_grad(set_to_none=True)
                    # The observed-data likelihood when rows may hold NaN (mfa.missing).
                    log_p = (missing.row_log_prob(model, batch) if allow
                             else linalg.logsumexp(model._component_log_prob(batch, exact=exact)))
                    # −mean log p over the global batch (gradients added across processes).
                    nll, rows = distributed.backward_mean(-log_p, model.parameters())
                    if rows == 0:  # no rows on any process: no (momentum) step, no reference
                        continue
                    loss = nll
                    if n_train is not None:  # the priors' penalty: global, the same everywhere
                        penalty = self.penalty(model, prior, n_train)
                        if penalty.requires_grad:  # (a ridge alone, without loadings: 0)
                            penalty.backward()
                        loss = nll + penalty.detach().to(nll.dtype)
                    # The gradient's norm (clipped to grad_clip): a finite loss can have
                    # non-finite gradients (a noise variance whose 1/d² overflows), and a step
                    # on them would leave every parameter NaN. One check for both.
                    norm = (torch.nn.utils.get_total_norm(
                                [p.grad for p in model.parameters() if p.grad is not None])
                            if cfg.grad_clip is None else
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    if not torch.isfinite(loss + norm.to(loss.dtype)):
                        what = (f"the minibatch loss is {loss.item()}" if not torch.isfinite(loss)
                                else f"the gradient's norm is {norm.item()} (the loss "
                                     f"{loss.item():.6g})")
                        raise fail(
                            f"Adam epoch {epoch + 1}: {what}; lower the learning rate "
                            f"(SGDConfig.lr={cfg.lr:g}) or raise min_noise"
                        )
                    if reference is None:  # the initial parameters' fit to the first minibatch
                        reference = -nll.item()
                    if cfg.weight_decay:
                        add_weight_decay(model.parameters(), cfg.weight_decay)
                    scaled_step(optimizer, model, before is not None, before)
                    scheduler.step()
                    total += -nll.item() * rows
                    seen += rows
                train_ll = total / max(seen, 1)
                val_ll = training.evaluate(model, val_source) if val_source is not None else None
                if _diverged(train_ll, val_ll, reference, model.n_features):
                    if math.isfinite(train_ll) and val_ll is not None and not math.isfinite(val_ll):
                        what = (f"the validation log-likelihood is {val_ll:.4g} (train: "
                                f"{train_ll:.4g} nats per row)")
                    else:
                        val_text = "" if val_ll is None else f" (validation: {val_ll:.4g})"
                        what = (f"the mean train log-likelihood is {train_ll:.4g} nats per row"
                                f"{val_text}, down from {reference:.4g}")
                    raise fail(f"Adam diverged at epoch {epoch + 1}: {what}; use a smaller "
                               f"learning rate than SGDConfig.lr={cfg.lr:g}")
                reference = train_ll if reference is None else max(reference, train_ll)
                if val_ll is None:  # nothing to stop on: the last epoch is kept
                    best_params = training.clone_params(model)
                elif val_ll > best_val:
                    best_val, bad_epochs = val_ll, 0
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
                    "noise_prior_variance": self.selected_noise_prior_variance,
                    "start_val": self.start_val_log_likelihood, "n_train": n_train,
                }
                epoch_start = None  # (finished: the state describes the model)
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
        except BaseException as error:
            if epoch_start is not None and not any(error is own for own in failed):
                model.load_state_dict(epoch_start)  # (fail() set the model already)
            raise
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
