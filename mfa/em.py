"""Streaming EM for a Mixture of Factor Analyzers (Ghahramani & Hinton, 1996)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from mfa import distributed, prior_search, tempering, training
from mfa._data_stream import DataSource, gather_rows
from mfa._validation import supported_device
from mfa.e_step import streamed_e_step
from mfa.em_config import EMConfig
from mfa.em_state import Callback, FitContext, RunState, check_resumed_state, restart_seed
from mfa.fit_agreement import check_same_fit
from mfa.init import floored_weights, initialise, split_heaviest
from mfa.m_step import m_step
from mfa.model import MixtureOfFactorAnalyzers
from mfa.priors import Prior
from mfa.pruning import reseed_round
from mfa.tempering import TemperedStep, tempered_step
from mfa.training import ConvergenceWarning

__all__ = ["ConvergenceWarning", "EMConfig", "EMTrainer", "RunState"]


logger = logging.getLogger(__name__)


class EMTrainer:
    """Exact, streamed EM for a :class:`MixtureOfFactorAnalyzers`.

    Each iteration streams every batch once, accumulating the sufficient statistics of
    :mod:`mfa.statistics` (float64 by default), then takes one M-step: the result is the same
    full-batch EM update whatever the batch size. Supports diagonal and isotropic noise and
    ``n_factors = 0`` (a diagonal or spherical GMM). Every weight stays positive: a component's
    mass is floored at :data:`mfa.init.MIN_WEIGHT_MASS` rows in the M-step, as in the
    initialisation (even with ``min_component_mass=0``, which turns re-seeding off).

    Args:
        config: an :class:`EMConfig` (defaults when ``None``); checked by
            :meth:`EMConfig.validate`.

    Raises (from :meth:`fit`):
        FloatingPointError: an iteration produced a non-finite log-likelihood or parameter;
            the model keeps the parameters from before that iteration.

    Attributes:
        history: one dict per iteration: ``run`` (restart index), ``iteration``,
            ``train_log_likelihood`` (mean per row, nats, of the parameters *before* the
            iteration's M-step), ``val_log_likelihood`` (after it, or ``None``; on a
            ``final`` record, which has no M-step, of the same parameters as the train
            figure), ``seconds``
            and ``final``: ``True`` on the record of a run that met ``tol``, whose parameters
            get no M-step (they are the ones returned, unless early stopping keeps an
            earlier iteration's that scored better on validation); ``train_objective``: the
            MAP objective per row (:mod:`mfa.priors`) of the same parameters under the
            iteration's prior, never lower than the previous iteration's for a fixed prior
            (for a float32 model, up to the E-step's rounding of this figure, not of the fit:
            ~2e-3 nats a row on pixel-like rows, 6e-3 at components ±1e4 apart, noise 1e-2;
            not across an iteration that re-seeded a component, ``min_component_mass``);
            ``noise_prior_variance``: the ``s₀`` of that prior;
            ``step_noise_prior_variance``: the ``s₀`` of the iteration's M-step, whose
            parameters ``val_log_likelihood`` scores (``None`` without an M-step; at an
            iteration that ran the ``"auto"`` search, the value it chose, where
            ``noise_prior_variance`` is still the one before); ``early_stop``: ``True`` on
            the record after which early stopping ended the restart.
        converged: whether the kept run met ``tol``.
        selected_noise_prior_variance: the ``s₀`` of the M-step that gave the kept run's
            parameters: the ``"auto"`` search's choice, or the warm-up's weakest value when
            that run scored best on validation before its search (then the parameters also
            carry the earlier rounds' priors, and a fit with this ``s₀`` fixed is not the same
            fit); ``None`` when no search chose it: the config fixes ``s₀``, or ``"auto"`` had
            no validation data (it then warns and uses ``quantization_variance``). A
            regulariser chosen for the validation score, not an estimate of the noise: on
            rows with a planted noise variance, the default strength chose ~20× it while the
            fitted noise variances matched it (a review, 2026-12-07).
            ``search_seconds``: the wall time of the last search (``None`` without one);
            ``selection_seconds``: that of every search and of the tempered step in the
            last call of ``fit`` together — what the automatic choice of ``s₀`` cost beyond
            the EM iterations it led to (``None`` when the config fixes ``s₀``; a resumed fit
            counts its own call only).
        init_seconds: the wall time the last call of ``fit`` spent initialising: sampling
            the rows the initialisation sees, K-means and the per-cluster factor analysis,
            summed over restarts (``None`` before a fit; 0.0 when it resumed past them).
        tempered: the :class:`~mfa.tempering.TemperedStep` tried last (``None`` when it did
            not run): its temperature, prior strength, ``s₀`` and validation score, and whether
            it was applied.

    MAP EM and the automatic noise prior: see :mod:`mfa.priors` and :mod:`mfa.prior_search`.
    Without validation data, ``val_fraction`` of a tensor's or Dataset's rows is held out
    (seeded by ``seed``) when the search or early stopping needs it. Early stopping
    (``patience > 0``) keeps the parameters with the best validation log-likelihood and
    returns them; it counts iterations from ``search_warmup`` on, and after each search;
    with ``"auto"``, running out of patience first moves to a stronger ``s₀``
    (``max_searches``), whose stint ends the restart unless it beats the best score
    (:meth:`~mfa.em_state.RunState.track_validation`). After the restarts, with early
    stopping and ``missing="error"`` (with ``"allow"`` this and the tempered step are skipped,
    even if no entry is missing), ``reseed_rounds`` rounds each re-seed the best result's
    components that lower the validation score (:mod:`mfa.pruning`; not on fewer than
    :data:`mfa.tempering.MIN_ROWS` validation rows, whose score is mostly noise) and run EM
    again from there (``run`` = ``n_init``, ``n_init + 1``, ...) under the kept result's
    ``s₀`` (with ``"auto"``: no warm-up and no search in a round); a round is kept if its best
    validation score beats the best so far, and the first that does not ends them. Last, with
    ``"auto"`` and ``tempered_step``, one M-step from tempered responsibilities replaces the
    result when it raises the validation score clearly (:mod:`mfa.tempering`).
    """

    def __init__(self, config: EMConfig | None = None) -> None:
        self.config = config or EMConfig()
        if not isinstance(self.config, EMConfig):
            raise TypeError(f"EMTrainer takes an EMConfig, got {type(self.config).__name__}")
        self.config.validate()
        self.history: list[dict] = []
        self.converged = False
        self.selected_noise_prior_variance: float | None = None
        self.search_seconds: float | None = None
        self.selection_seconds: float | None = None
        self.init_seconds: float | None = None
        self.tempered: TemperedStep | None = None
        self._resume: RunState | None = None
        self._loaded: dict = {}  # (the state it came from, checked again by fit)
        self._state: dict = {}

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything needed to resume: primitives and tensors only (safe to load with
        ``torch.load(weights_only=True)``). Save the model's ``state_dict`` beside it."""
        return training.save_state(self._state, self.config, self.history)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next :meth:`fit` continues where it stopped,
        provided the model holds the parameters saved with this state."""
        state, self.history = training.restore_state(
            state, RunState.REQUIRED, "EMTrainer", RunState.TYPES)
        check_resumed_state(state, self.config)
        saved = state.get("config")
        if (isinstance(saved, dict) and saved and "min_delta" not in saved
                and self.config.min_delta > 0 and state["run"] < self.config.n_init
                + self.config.reseed_rounds):
            warnings.warn(
                "EMTrainer state saved before EMConfig.min_delta existed: its early stopping "
                "counted any validation gain (min_delta=0); resumed with min_delta="
                f"{self.config.min_delta:g} it may stop elsewhere than it would have; pass "
                "min_delta=0 to continue it as it was", UserWarning, stacklevel=2)
        self._resume, self._loaded = RunState.from_dict(state), state
        self._state = self._resume.as_dict()  # what state_dict() gives until fit moves on

    # -------------------------------------------------------------- fitting

    @training.with_config_tf32
    def fit(
        self,
        model: MixtureOfFactorAnalyzers,
        data: Tensor | Iterable,
        validation: Tensor | Iterable | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_fn: Callable[[EMTrainer, MixtureOfFactorAnalyzers], None] | None = None,
    ) -> MixtureOfFactorAnalyzers:
        """Fit ``model`` in place and return it.

        Args:
            model: the model to fit; its shape and noise type are kept.
            data: a tensor ``[N, D]``, :class:`~mfa.data.QuantizedRows`, a ``Dataset`` or a
                ``DataLoader`` of rows (or of ``(rows, labels)`` tuples); images are flattened.
            validation: optional held-out data, same forms; its mean log-likelihood is
                recorded each iteration.
            callbacks: ``cb(trainer, model, record)`` after each iteration.
            checkpoint_fn: ``fn(trainer, model)`` every ``checkpoint_every`` iterations and
                at the end.
        """
        cfg, resume = self.config, self._resume
        cfg.validate()  # (again: a field may have been set since __init__)
        if resume is not None:  # (again: as for validate)
            check_resumed_state(self._loaded, cfg)
        training.check_fit_inputs(model, data, validation, {} if resume is None else {
            "best_params": resume.best_params, "best_val_params": resume.best_val_params},
            "EMTrainer")
        if cfg.device is not None:
            model.to(supported_device(cfg.device, "EMConfig.device"))
        check_same_fit("EMTrainer", cfg, model, validation, resume)  # (before any collective)
        # Under torch.distributed each process streams its shard; rank 0 alone checkpoints.
        checkpoint_fn = distributed.main_process_only(checkpoint_fn)
        allow = cfg.missing == "allow"
        auto = cfg.noise_prior_variance == "auto" and cfg.noise_prior_strength > 0
        if validation is None and (auto or cfg.patience) and cfg.val_fraction > 0:
            # The same seeded rows on every process, before the rest is sharded.
            data, validation = training.hold_out(data, model, cfg.val_fraction, cfg.seed,
                                                 cfg.batch_size, allow_missing=allow)
        source = DataSource(data, model, cfg.batch_size, "data", shard=True,
                            allow_missing=allow)
        val_source = None if validation is None else DataSource(
            validation, model, cfg.batch_size, "validation", shard=True, allow_missing=allow)
        for checked in (source, val_source):  # (a tensor per process lost rows silently)
            if checked is not None and checked.sharded:
                distributed.check_same_rows(checked.tensor, checked.name)
        if auto and val_source is None:
            warnings.warn(
                "EMConfig.noise_prior_variance='auto' needs validation data (pass validation=, "
                "or a tensor/Dataset with val_fraction > 0); using the weakest noise prior, "
                f"s0 = quantization_variance = {cfg.quantization_variance:g}",
                UserWarning, stacklevel=3,
            )
        ctx = FitContext(
            source=source, val_source=val_source,
            floor=max(cfg.variance_floor, model.min_noise * (1 + 1e-5) + 1e-30),
            search=auto and val_source is not None,
            early_stopping=cfg.patience > 0 and val_source is not None,
            callbacks=tuple(callbacks), checkpoint_fn=checkpoint_fn,
            features_per_row=(training.observed_per_row(val_source)
                              if allow and val_source is not None and cfg.patience > 0
                              else float(model.n_features)),
        )
        # (None until this fit runs them: not an earlier fit's)
        self.selection_seconds = 0.0 if ctx.search else None
        self.search_seconds, self.tempered, self.init_seconds = None, None, 0.0
        if self._resume is not None:
            state, self._resume = self._resume, None
            state.params_to(model.device)
            self.history = state.records_up_to(self.history)  # later ones come again
        else:
            self.history = []
            state = RunState()
        # Records before this fit's first M-step (a converged or a search-ended one) save
        # this state: not an earlier fit's, nor an empty one.
        self._state = state.as_dict()
        init_rows = None
        rounds = cfg.reseed_rounds if ctx.early_stopping and not allow and cfg.max_iter else 0
        if rounds and tempering.too_few_rows(val_source, "EM's re-seeding rounds"):
            rounds = 0  # (on 1 to 5 rows, rounds that halved the train likelihood were kept)
        # A finished fit resumed: the model holds its result (the tempered step's included).
        finished = state.run >= cfg.n_init + rounds
        for run in range(state.run, cfg.n_init + rounds):
            resuming = run == state.run and state.iteration > 0
            state.run = run
            if not resuming and run >= cfg.n_init:  # a re-seeding round, from the best so far
                model.load_state_dict(state.best_params)
                if state.best_run_val is None:  # a fit saved before the rounds existed
                    state.best_run_val = self._score_validation(model, ctx)
                if not reseed_round(model, ctx.val_source, cfg.batch_size, cfg.seed + run):
                    break
                state.start_restart()
                if ctx.search and state.selected_noise_prior_variance is not None:
                    # The round refines the kept result under its s₀: no warm-up, no search.
                    # (A state saved before the s₀ was recorded searches as a restart does.)
                    state.noise_prior_variance = state.selected_noise_prior_variance
                    state.searches = cfg.max_searches
            elif not resuming:
                init_started = time.perf_counter()
                if init_rows is None and cfg.init != "none":
                    init_rows = gather_rows(source, cfg.init_samples, cfg.seed)
                initialise(
                    model, init_rows, cfg.init, seed=restart_seed(cfg.seed, run),
                    variance_floor=ctx.floor,
                    kmeans_iter=cfg.kmeans_iter, complete_iter=cfg.complete_iter,
                )
                if run + 1 >= cfg.n_init:  # the last initialisation: free its float rows
                    init_rows = None  # (50,000 CelebA rows: 2.5 GB held through the fit)
                distributed.broadcast_model(model)  # the same start on every process
                if model.means.is_cuda:  # (its kernels done: the time is the initialisation's)
                    torch.cuda.synchronize(model.means.device)
                self.init_seconds += time.perf_counter() - init_started
                state.start_restart()
            run_ll, converged = self._run(model, ctx, state)
            run_val, state.runs_done = state.best_val_log_likelihood, run + 1
            round_val = -math.inf if run_val is None else run_val  # None: never scored
            if state.best_params is None or (run_ll > state.best_log_likelihood if run < cfg.n_init
                                             else round_val > state.best_run_val):
                state.best_log_likelihood, state.converged = run_ll, converged
                state.best_params, state.best_run_val = training.clone_params(model), run_val
                state.selected_noise_prior_variance = state.noise_prior_variance
            elif run >= cfg.n_init:
                break  # the round did not pay: no further one would start from elsewhere
            state.start_restart()
            if cfg.n_init > 1:
                logger.info("EM run %d/%d: log-likelihood %.6g", run + 1, cfg.n_init, run_ll)
        if state.best_params is not None and not finished:
            model.load_state_dict(state.best_params)
        self.selected_noise_prior_variance = state.selected_noise_prior_variance
        if finished:
            self.tempered = None if state.tempered is None else TemperedStep(**state.tempered)
        elif cfg.tempered_step and ctx.search and not allow and cfg.max_iter:
            tempering_started = time.perf_counter()
            self.tempered = tempered_step(
                model, lambda t: self.e_step(model, source, cfg.stats_dtype, t), val_source,
                Prior.from_config(cfg, cfg.quantization_variance),
                before=self._score_validation(model, ctx), lower=cfg.quantization_variance,
                per_decade=cfg.search_per_decade, variance_floor=ctx.floor,
                start=self.selected_noise_prior_variance)
            self.selection_seconds += time.perf_counter() - tempering_started
        self.converged = state.converged
        state.run = cfg.n_init + rounds
        state.tempered = None if self.tempered is None else dataclasses.asdict(self.tempered)
        self._state = state.as_dict()
        if checkpoint_fn is not None:
            checkpoint_fn(self, model)
        return model

    def _run(self, model: MixtureOfFactorAnalyzers, ctx: FitContext,
             state: RunState) -> tuple[float, bool]:
        """One restart from ``state.iteration`` to convergence, early stopping or
        ``max_iter``; updates ``state`` after every M-step. Returns ``(mean train
        log-likelihood of the parameters it leaves in the model, converged)``.
        """
        cfg = self.config
        run = state.run
        search_at = min(cfg.search_warmup, cfg.max_iter - 1) if ctx.search else -1
        # A CPU generator: its state resumes on any device.
        gen = torch.Generator().manual_seed((cfg.seed * 1000003 + run) % 2**63)
        if state.generator is not None:
            gen.set_state(state.generator.cpu())  # (a checkpoint read onto a GPU: cuda)
        converged = False
        prev_ll = state.previous_log_likelihood
        ll = prev_ll if prev_ll is not None else -math.inf
        # (a re-seeding round read "EM run 3/1")
        label = (f"EM run {run + 1}/{cfg.n_init}" if run < cfg.n_init else
                 f"EM re-seeding round {run - cfg.n_init + 1}/{cfg.reseed_rounds}")
        bar = training.progress_bar(range(state.iteration, cfg.max_iter), cfg.progress
                                    and distributed.is_main_process(), desc=label, leave=False)
        # Resumed from the checkpoint of the iteration that stopped early: nothing left to do.
        stopped = ctx.early_stopping and state.stint_over(cfg.patience)
        exhausted = False  # (the loop ran to max_iter: not tol, patience or a search)
        for it in bar:
            if stopped:
                break
            started = time.perf_counter()
            stats = self.e_step(model, ctx.source, cfg.stats_dtype)
            if it == 0 and run == 0:  # (once a fit: the data's scale against the floor)
                prior_search.warn_if_floored(stats, ctx.floor, 4, model.dtype)
            ll = (stats.log_likelihood / stats.n_rows).item()
            if not math.isfinite(ll):
                raise FloatingPointError(
                    f"EM iteration {it + 1}: the training log-likelihood is {ll}; the "
                    "parameters were left as they were before this iteration"
                )
            prior = self._prior(state)
            objective = ll + prior.log_prior_of(model).item() / stats.n_rows.item()
            searching = ctx.search and state.noise_prior_variance is None
            if not searching and prev_ll is not None and abs(objective - prev_ll) < cfg.tol:
                converged = True
                val_ll = self._score_validation(model, ctx)
                record = self._record(run, it, ll, val_ll, time.perf_counter() - started, bar,
                                      final=True, objective=objective, prior=prior)
                for callback in ctx.callbacks:
                    callback(self, model, record)
                break
            prev_ll = objective
            if searching and it >= search_at:
                search_started = time.perf_counter()
                state.noise_prior_variance, _ = prior_search.choose_noise_variance(
                    model, stats, ctx.val_source, prior, lower=cfg.quantization_variance,
                    per_decade=cfg.search_per_decade, variance_floor=ctx.floor,
                    above=state.previous_noise_prior_variance,
                )
                state.bad_iterations, state.searches = 0, state.searches + 1
                prev_ll = None  # the prior changed: the next iteration starts a new series
                self.search_seconds = time.perf_counter() - search_started
                self.selection_seconds += self.search_seconds
                previous = state.previous_noise_prior_variance
                if previous is not None and state.noise_prior_variance <= previous:
                    # A repeated search found no stronger prior: the restart ends here.
                    state.noise_prior_variance = previous
                    record = self._record(run, it, ll, None, time.perf_counter() - started,
                                          bar, objective=objective, prior=prior, early_stop=True)
                    for callback in ctx.callbacks:
                        callback(self, model, record)
                    break
            step_prior = self._prior(state)  # (after a search: the s₀ it chose)
            self._apply_m_step(model, stats, ctx.floor, gen, it, step_prior)
            val_ll = self._score_validation(model, ctx)
            state.iteration, state.previous_log_likelihood = it + 1, prev_ll
            state.generator = gen.get_state()
            if ctx.early_stopping:
                # Patience counts from the end of the warm-up (and the search, if any): the
                # first iterations from the initialisation can score lower before they rise.
                counting = it >= cfg.search_warmup and not (
                    ctx.search and state.noise_prior_variance is None)
                stopped = state.track_validation(training.clone_params, model, val_ll,
                                                 counting, cfg.patience,
                                                 cfg.min_delta * ctx.features_per_row)
                if (stopped and ctx.search and state.searches < cfg.max_searches
                        and state.stint_improved()):
                    state.search_again()  # patience ran out: a stronger prior from here
                    stopped = False
            self._state = state.as_dict()
            record = self._record(run, it, ll, val_ll, time.perf_counter() - started, bar,
                                  objective=objective, prior=prior, early_stop=stopped,
                                  step_prior=step_prior)
            # Checkpoint before the callbacks, so a callback that stops the fit keeps this
            # iteration.
            if (ctx.checkpoint_fn is not None and cfg.checkpoint_every
                    and (it + 1) % cfg.checkpoint_every == 0):
                ctx.checkpoint_fn(self, model)
            for callback in ctx.callbacks:
                callback(self, model, record)
            if stopped:
                break
        else:
            exhausted = not stopped
        bar.close()
        best = state.best_val_params
        current = model.state_dict()
        if best is not None and ctx.search:  # the s₀ of the kept parameters (or the warm-up's)
            state.noise_prior_variance = (state.best_val_noise_prior_variance
                                          or cfg.quantization_variance)
        kept_best = best is not None and any(not torch.equal(best[k], current[k])
                                             for k in best)
        if exhausted and cfg.max_iter > 0 and not converged:  # (also when the best is kept:
            warnings.warn(  # it was silent then; each restart and round its own, named)
                f"{label}: stopped at max_iter={cfg.max_iter} before the log-likelihood gain fell "
                f"below tol={cfg.tol}" + (" (or early stopping's patience ran out); the "
                                          "best-validation iteration's parameters are kept"
                                          if kept_best else ""),
                ConvergenceWarning,
                stacklevel=4,
            )
        if kept_best:
            # Stopped early, or ended after iterations that did not beat the best validation
            # score: return the best parameters, scored for the comparison of restarts.
            model.load_state_dict(best)
            return self.evaluate(model, ctx.source), converged
        if cfg.max_iter == 0 or not converged:  # the initialisation, or the last M-step's
            ll = self.evaluate(model, ctx.source)  # result: scored for the comparison
        return ll, converged

    def _score_validation(self, model, ctx: FitContext) -> float | None:
        return self.evaluate(model, ctx.val_source) if ctx.val_source is not None else None

    def _prior(self, state: RunState) -> Prior:
        """The prior of the current iteration: the configured one, with the chosen (or,
        before the search, the weakest) ``s₀`` when it is ``"auto"``."""
        cfg = self.config
        s0 = cfg.noise_prior_variance
        if s0 == "auto":  # during a repeated search: the previous choice
            s0 = (state.noise_prior_variance or state.previous_noise_prior_variance
                  or cfg.quantization_variance)
        return Prior.from_config(cfg, s0)

    def _record(self, run, it, ll, val_ll, seconds, bar, final=False, objective=None,
                prior=None, early_stop=False, step_prior=None) -> dict:
        record = {
            "run": run, "iteration": it + 1, "train_log_likelihood": ll,
            "val_log_likelihood": val_ll, "seconds": seconds, "final": final,
            "train_objective": objective,
            "noise_prior_variance": None if prior is None else prior.noise_variance,
            "step_noise_prior_variance": None if step_prior is None
            else step_prior.noise_variance,
            "early_stop": early_stop,
        }
        self.history.append(record)
        bar.set_postfix(ll=f"{ll:.4f}")
        logger.debug("EM run %d iteration %d: log-likelihood %.6f", run, it + 1, ll)
        return record

    e_step = staticmethod(streamed_e_step)  # one pass over a source (mfa.e_step)

    def _apply_m_step(self, model, stats, floor, gen, it, prior: Prior) -> None:
        cfg = self.config
        with torch.no_grad():
            params = m_step(stats, model, variance_floor=floor, prior=prior)
            # Every weight stays positive (log 0 = −inf would kill the component for good).
            params["weights"] = floored_weights(prior.weight_counts(stats.mass),
                                                params["weights"].dtype)
            if cfg.min_component_mass * model.n_components > float(stats.n_rows):
                raise ValueError(
                    f"EMConfig.min_component_mass={cfg.min_component_mass:g} with "
                    f"{model.n_components} components needs at least "
                    f"{cfg.min_component_mass * model.n_components:g} rows, the data has "
                    f"{float(stats.n_rows):g}: some component would be re-seeded at every "
                    "iteration; lower min_component_mass or the number of components")
            dead = (stats.mass < cfg.min_component_mass).nonzero().flatten().tolist()
            if dead:
                split_heaviest(params, dead, gen)
                logger.warning(
                    "EM iteration %d: component(s) %s lost their mass (< %g rows) and were "
                    "re-seeded by splitting the heaviest component", it + 1, dead,
                    cfg.min_component_mass,
                )
            try:
                training.check_finite_params(params, f"EM iteration {it + 1}: the M-step")
            except FloatingPointError as err:
                raise FloatingPointError(
                    f"{err}; the parameters were left as they were before this iteration"
                ) from None
            model.set_parameters(**params)

    @staticmethod
    def evaluate(model: MixtureOfFactorAnalyzers, source: DataSource | Iterable, *,
                 across_processes: bool = False) -> float:
        """Mean log-likelihood per row of a data source (float64 sums; observed-data ones with
        NaN entries), this process's rows or all processes': :func:`mfa.training.evaluate`."""
        return training.evaluate(model, source, across_processes=across_processes)

