"""Streaming EM for a Mixture of Factor Analyzers (Ghahramani & Hinton, 1996)."""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mfa import linalg
from mfa._data_stream import DataSource, gather_rows
from mfa._validation import check_int_fields
from mfa.init import fit_complete, kmeans, random_init
from mfa.model import MixtureOfFactorAnalyzers
from mfa.statistics import accumulate_statistics, m_step


class ConvergenceWarning(UserWarning):
    """EM or SGD stopped at its iteration limit before meeting its tolerance."""


@dataclass
class EMConfig:
    """Settings of :class:`EMTrainer`."""

    max_iter: int = 100  # EM iterations (full passes over the data)
    tol: float = 1e-4  # stop when the mean train log-likelihood per sample gains less than this
    batch_size: int = 4096  # rows per streamed batch; the result does not depend on it
    variance_floor: float = 1e-5  # lower bound of every noise variance after each M-step
    device: str | None = None  # None: the model's device
    # float64: the E-step in float64 (exact); mixed: moment sums in float64, latent products in
    # the data's dtype; float32: every product in the data's dtype (fastest on CPUs). Batch
    # totals are always summed in float64.
    stats_dtype: Literal["float64", "mixed", "float32"] = "float64"
    seed: int = 0  # seeds initialisation and re-seeding of empty components
    n_init: int = 1  # restarts; the best by final train log-likelihood is kept
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 5  # factor-analysis iterations of the complete-data initial fit
    init_samples: int = 50_000  # rows (a seeded random subset) used by the initialisation
    min_component_mass: float = 2.0  # components with less responsibility mass are re-seeded
    checkpoint_every: int = 0  # call checkpoint_fn every this many iterations (0: only at the end)
    progress: bool = True  # tqdm progress bar


logger = logging.getLogger(__name__)

Callback = Callable[["EMTrainer", MixtureOfFactorAnalyzers, dict], None]


def _validate_config(config: EMConfig) -> None:
    minimum = {"max_iter": 0, "batch_size": 1, "n_init": 1, "kmeans_iter": 1,
               "init_samples": 1, "complete_iter": 0, "checkpoint_every": 0}
    check_int_fields(config, minimum)
    if not (isinstance(config.min_component_mass, (int, float))
            and 0 <= config.min_component_mass < math.inf):
        raise ValueError(
            f"EMConfig.min_component_mass must be >= 0, got {config.min_component_mass!r}"
        )
    if not (isinstance(config.tol, (int, float)) and 0 <= config.tol < math.inf):
        raise ValueError(f"EMConfig.tol must be >= 0, got {config.tol!r}")
    if not (isinstance(config.variance_floor, (int, float))
            and 0 < config.variance_floor < math.inf):
        raise ValueError(f"EMConfig.variance_floor must be > 0, got {config.variance_floor!r}")
    if config.stats_dtype not in ("float64", "mixed", "float32"):
        raise ValueError(
            "EMConfig.stats_dtype must be 'float64', 'mixed' or 'float32', "
            f"got {config.stats_dtype!r}"
        )
    if config.init not in ("kmeans", "random", "none"):
        raise ValueError(
            f"EMConfig.init must be 'kmeans', 'random' or 'none', got {config.init!r}"
        )
    if config.init == "none" and config.n_init > 1:
        raise ValueError("EMConfig.n_init > 1 needs a random init ('kmeans' or 'random')")


def initialise(
    model: MixtureOfFactorAnalyzers,
    rows: Tensor,
    method: str,
    *,
    seed: int,
    variance_floor: float,
    kmeans_iter: int = 20,
    complete_iter: int = 5,
) -> None:
    """Set ``model``'s parameters from ``rows`` ``[n, D]`` by K-means + complete-data fit
    (``method="kmeans"``) or random rows (``"random"``); ``"none"`` leaves it unchanged."""
    if method == "none":
        return
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    k, lat = model.n_components, model.n_factors
    if method == "kmeans":
        result = kmeans(rows, k, n_iter=kmeans_iter, generator=gen)
        init = fit_complete(
            rows, result.labels, k, lat, model.noise, n_iter=complete_iter,
            variance_floor=variance_floor, min_noise=model.min_noise,
        )
    elif method == "random":
        init = random_init(
            rows, k, lat, model.noise, generator=gen, variance_floor=variance_floor,
            min_noise=model.min_noise,
        )
    else:
        raise ValueError(f"unknown init method {method!r}")
    model.set_parameters(
        weights=init.weights.detach(),
        means=init.means.detach(),
        factor_loadings=init.factor_loadings.detach(),
        noise_variance=init.noise_variance.detach(),
    )


class EMTrainer:
    """Exact, streamed EM for a :class:`MixtureOfFactorAnalyzers`.

    Each iteration streams every batch once, accumulating the sufficient statistics of
    :mod:`mfa.statistics` (float64 by default), then takes one M-step: the result is the same
    full-batch EM update whatever the batch size. Supports diagonal and isotropic noise and
    ``n_factors = 0`` (a diagonal or spherical GMM).

    Args:
        config: an :class:`EMConfig` (defaults when ``None``).

    Attributes:
        history: one dict per iteration: ``run`` (restart index), ``iteration``,
            ``train_log_likelihood`` (mean per row, nats, of the parameters *before* the
            iteration's M-step), ``val_log_likelihood`` (after it, or ``None``), ``seconds``
            and ``final``: ``True`` on the record of a run that met ``tol``, whose parameters
            get no M-step (they are the ones returned).
        converged: whether the kept run met ``tol``.
    """

    def __init__(self, config: EMConfig | None = None) -> None:
        self.config = config or EMConfig()
        _validate_config(self.config)
        self.history: list[dict] = []
        self.converged = False
        self._resume: dict | None = None
        self._state: dict = {}

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything needed to resume: primitives and tensors only (safe to load with
        ``torch.load(weights_only=True)``). Save the model's ``state_dict`` beside it."""
        state = copy.deepcopy(self._state)
        state["config"] = asdict(self.config)
        state["history"] = copy.deepcopy(self.history)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the next :meth:`fit` continues where it stopped,
        provided the model holds the parameters saved with this state."""
        required = {"run", "iteration", "best_log_likelihood", "best_params", "runs_done"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"EMTrainer state is missing keys {sorted(missing)}")
        self._resume = copy.deepcopy(state)
        self.history = copy.deepcopy(state.get("history", []))

    # -------------------------------------------------------------- fitting

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
            data: a tensor ``[N, D]``, a ``Dataset`` or a ``DataLoader`` of rows (or of
                ``(rows, labels)`` tuples); images are flattened.
            validation: optional held-out data, same forms; its mean log-likelihood is
                recorded each iteration.
            callbacks: ``cb(trainer, model, record)`` after each iteration.
            checkpoint_fn: ``fn(trainer, model)`` every ``checkpoint_every`` iterations and
                at the end.
        """
        cfg = self.config
        if cfg.device is not None:
            model.to(cfg.device)
        source = DataSource(data, model, cfg.batch_size, "data")
        val_source = (
            DataSource(validation, model, cfg.batch_size, "validation")
            if validation is not None
            else None
        )
        floor = max(cfg.variance_floor, model.min_noise * (1 + 1e-5) + 1e-30)
        stats_dtype = cfg.stats_dtype
        if self._resume is not None:
            state = self._resume
            self._resume = None
            start_run, start_iter = int(state["run"]), int(state["iteration"])
            best_ll, best_params = state["best_log_likelihood"], state["best_params"]
            runs_done = int(state["runs_done"])
            prev_ll = state.get("previous_log_likelihood")
            converged_best = bool(state.get("converged", False))
        else:
            self.history = []
            start_run, start_iter, runs_done = 0, 0, 0
            best_ll, best_params, prev_ll, converged_best = -math.inf, None, None, False
            state = {}
        init_rows = None
        for run in range(start_run, cfg.n_init):
            resuming = run == start_run and start_iter > 0
            if not resuming:
                if init_rows is None and cfg.init != "none":
                    init_rows = gather_rows(source, cfg.init_samples, cfg.seed)
                initialise(
                    model, init_rows, cfg.init, seed=cfg.seed + run, variance_floor=floor,
                    kmeans_iter=cfg.kmeans_iter, complete_iter=cfg.complete_iter,
                )
                start_iter, prev_ll = 0, None
            gen_state = state.get("generator") if resuming else None
            run_ll, converged = self._run(
                model, source, val_source, run, start_iter, prev_ll, floor, stats_dtype,
                callbacks, checkpoint_fn, best_ll, best_params, runs_done, gen_state,
            )
            runs_done = run + 1
            if run_ll > best_ll or best_params is None:
                best_ll, converged_best = run_ll, converged
                best_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
            start_iter, prev_ll = 0, None
            if cfg.n_init > 1:
                logger.info("EM run %d/%d: log-likelihood %.6g", run + 1, cfg.n_init, run_ll)
        if best_params is not None:
            model.load_state_dict(best_params)
        self.converged = converged_best
        self._state = {
            "run": cfg.n_init, "iteration": 0, "runs_done": runs_done,
            "best_log_likelihood": best_ll, "best_params": best_params,
            "previous_log_likelihood": None, "converged": converged_best,
        }
        if checkpoint_fn is not None:
            checkpoint_fn(self, model)
        return model

    def _run(self, model, source, val_source, run, start_iter, prev_ll, floor, stats_dtype,
             callbacks, checkpoint_fn, best_ll, best_params, runs_done, gen_state):
        cfg = self.config
        # A CPU generator: its state resumes on any device.
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + run)
        if gen_state is not None:
            gen.set_state(gen_state)
        converged = False
        ll = prev_ll if prev_ll is not None else -math.inf
        bar = tqdm(
            range(start_iter, cfg.max_iter), desc=f"EM run {run + 1}/{cfg.n_init}",
            disable=not cfg.progress, leave=False,
        )
        for it in bar:
            started = time.perf_counter()
            stats = self.e_step(model, source, stats_dtype)
            ll = (stats.log_likelihood / stats.n_rows).item()
            if not math.isfinite(ll):
                raise FloatingPointError(
                    f"EM iteration {it + 1}: the training log-likelihood is {ll}; the "
                    "parameters were left as they were before this iteration"
                )
            if prev_ll is not None and abs(ll - prev_ll) < cfg.tol:
                converged = True
                val_ll = self.evaluate(model, val_source) if val_source is not None else None
                record = self._record(run, it, ll, val_ll, time.perf_counter() - started, bar,
                                      final=True)
                for callback in callbacks:
                    callback(self, model, record)
                break
            self._apply_m_step(model, stats, floor, gen, it)
            val_ll = self.evaluate(model, val_source) if val_source is not None else None
            prev_ll = ll
            self._state = {
                "run": run, "iteration": it + 1, "runs_done": runs_done,
                "best_log_likelihood": best_ll, "best_params": best_params,
                "previous_log_likelihood": prev_ll, "converged": False,
                "generator": gen.get_state(),
            }
            record = self._record(run, it, ll, val_ll, time.perf_counter() - started, bar)
            # Checkpoint before the callbacks, so a callback that stops the fit keeps this
            # iteration.
            if checkpoint_fn is not None and cfg.checkpoint_every and (
                (it + 1) % cfg.checkpoint_every == 0
            ):
                checkpoint_fn(self, model)
            for callback in callbacks:
                callback(self, model, record)
        bar.close()
        if not converged and cfg.max_iter > 0:
            # The last M-step's result has not been scored yet: score it for the comparison.
            ll = self.evaluate(model, source)
            warnings.warn(
                f"EM stopped at max_iter={cfg.max_iter} before the log-likelihood gain fell "
                f"below tol={cfg.tol}",
                ConvergenceWarning,
                stacklevel=3,
            )
        return ll, converged

    def _record(self, run, it, ll, val_ll, seconds, bar, final=False) -> dict:
        record = {
            "run": run, "iteration": it + 1, "train_log_likelihood": ll,
            "val_log_likelihood": val_ll, "seconds": seconds, "final": final,
        }
        self.history.append(record)
        bar.set_postfix(ll=f"{ll:.4f}")
        logger.debug("EM run %d iteration %d: log-likelihood %.6f", run, it + 1, ll)
        return record

    @staticmethod
    def e_step(
        model: MixtureOfFactorAnalyzers, source: DataSource, stats_dtype: str = "float64"
    ) -> object:
        """One streamed pass: the summed sufficient statistics of every batch.

        ``stats_dtype`` as in :class:`EMConfig` (a ``torch.dtype`` is read as its name).
        """
        if isinstance(stats_dtype, torch.dtype):
            stats_dtype = str(stats_dtype).removeprefix("torch.")
        full = stats_dtype == "float64" and model.dtype != torch.float64
        with torch.no_grad():
            terms = model.component_terms()
            chol = linalg.capacitance_cholesky(model.factor_loadings, model.noise_variance)
            if full:
                terms, chol = terms.to(torch.float64), chol.double()
            stats = None
            for batch in source:
                if full:
                    batch = batch.double()
                part = accumulate_statistics(model, batch, terms, chol, stats_dtype=torch.float64,
                                             precise_moments=stats_dtype != "float32")
                stats = part if stats is None else stats + part
        return stats

    def _apply_m_step(self, model, stats, floor, gen, it) -> None:
        cfg = self.config
        with torch.no_grad():
            params = m_step(stats, model, variance_floor=floor)
            dead = (stats.mass < cfg.min_component_mass).nonzero().flatten().tolist()
            if dead:
                _reseed(params, dead, gen)
                logger.warning(
                    "EM iteration %d: component(s) %s lost their mass (< %g rows) and were "
                    "re-seeded by splitting the heaviest component", it + 1, dead,
                    cfg.min_component_mass,
                )
            for name, value in params.items():
                if not bool(torch.isfinite(value).all()):
                    raise FloatingPointError(
                        f"EM iteration {it + 1}: the M-step produced non-finite {name}; the "
                        "parameters were left as they were before this iteration"
                    )
            model.set_parameters(**params)

    @staticmethod
    def evaluate(model: MixtureOfFactorAnalyzers, source: DataSource | Iterable) -> float:
        """Mean log-likelihood per row over a data source (float64 accumulation)."""
        if not isinstance(source, DataSource):
            source = DataSource(source, model, 4096, "data")
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        with torch.no_grad():
            terms = model.component_terms()
            for batch in source:
                total += model._component_log_prob(batch, terms).logsumexp(-1).double().sum().cpu()
                count += batch.shape[0]
        return (total / max(count, 1)).item()


def _reseed(params: dict[str, Tensor], dead: list[int], gen: torch.Generator) -> None:
    """Split the heaviest component into itself and each dead one: copy its parameters,
    shift the two means apart by ± half a standard deviation along a random direction, and
    share its weight."""
    weights = params["weights"].clone()
    for k in dead:
        j = int(weights.argmax())
        std = params["noise_variance"][j].sqrt()
        direction = torch.randn(std.shape, generator=gen, dtype=std.dtype).to(std.device)
        params["means"][k] = params["means"][j] + 0.5 * std * direction
        params["means"][j] = params["means"][j] - 0.5 * std * direction
        params["factor_loadings"][k] = params["factor_loadings"][j]
        params["noise_variance"][k] = params["noise_variance"][j]
        weights[j] = weights[j] / 2
        weights[k] = weights[j]
    params["weights"] = weights / weights.sum()
