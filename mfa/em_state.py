"""Where an EM fit stands (:class:`RunState`): enough to resume it exactly, and the format of
:meth:`mfa.em.EMTrainer.state_dict`; and what stays fixed during one fit
(:class:`FitContext`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mfa import training
from mfa._data_stream import DataSource

__all__ = ["RESUMABLE", "Callback", "FitContext", "RunState", "check_resumed_max_iter",
           "check_resumed_state", "check_state_ranges", "restart_seed"]

#: ``cb(trainer, model, record)`` after each EM iteration.
Callback = Callable[..., None]

#: What a resumed fit's :class:`~mfa.em.EMConfig` may change from the saved one (how long and
#: where it runs, how often it saves, progress); anything else would be ignored or would
#: change what the rest of the fit computes, so it is refused (``max_iter`` only in the first
#: restart and not below its iterations done: :func:`check_resumed_max_iter`).
RESUMABLE = frozenset({"max_iter", "checkpoint_every", "progress", "device"})


def restart_seed(seed: int, run: int) -> int:
    """The initialisation seed of restart ``run`` of a fit seeded ``seed``: ``seed`` itself
    for the first, then a hash of ``(seed, run)``. (``seed + run`` made restart 1 of seed 0
    restart 0 of seed 1, and so on: with ``n_init`` restarts two consecutive seeds shared
    ``n_init − 1`` of them and often kept the same model.)"""
    if run == 0:
        return seed
    return int(np.random.SeedSequence([seed, run]).generate_state(1, dtype=np.uint64)[0] >> 1)

def check_resumed_state(state: dict, config) -> None:
    """Refuse resuming ``state`` under the :class:`~mfa.em_config.EMConfig` ``config``: a
    field other than :data:`RESUMABLE` changed (:func:`mfa.training.check_resumed_config`),
    counters no fit of it reaches (:func:`check_state_ranges`) or a ``max_iter`` it cannot
    continue under (:func:`check_resumed_max_iter`). Run at ``load_state_dict`` and again by
    ``fit``, since a config field set between them would otherwise go unchecked."""
    training.check_resumed_config(state, config, "EMTrainer", RESUMABLE)
    check_state_ranges(state, config.max_iter, config.n_init + config.reseed_rounds)
    check_resumed_max_iter(state, config.max_iter)


def check_state_ranges(state: dict, max_iter: int, runs: int) -> None:
    """Refuse a state whose counters no fit of this config reaches (a tampered or foreign
    checkpoint: ``iteration = 10000`` resumed as a finished run): ``0 ≤ run ≤ runs`` (the
    restarts and re-seeding rounds), ``0 ≤ runs_done ≤ runs`` and ``0 ≤ iteration ≤`` the
    saved ``max_iter`` (else ``max_iter``)."""
    saved = state.get("config")
    limit = saved.get("max_iter", max_iter) if isinstance(saved, dict) else max_iter
    for key, top in (("run", runs), ("runs_done", runs), ("iteration", limit)):
        value = state.get(key, 0)
        if not 0 <= value <= top:
            raise ValueError(f"EMTrainer state key {key!r} is {value}, outside [0, {top}]: "
                             "not a state of a fit with this config")


def check_resumed_max_iter(state: dict, max_iter: int) -> None:
    """Refuse resuming ``state`` with a ``max_iter`` other than its saved one once a restart
    or re-seeding round has run under the saved one (``run > 0``; the fit would then mix two
    limits and no config would describe it), or below the iterations its restart has done."""
    saved = state.get("config")
    if not isinstance(saved, dict) or saved.get("max_iter", max_iter) == max_iter:
        return
    run, done = int(state.get("run", 0)), int(state.get("iteration", 0))
    if run > 0:
        raise ValueError(
            f"EMTrainer state was saved in restart/round {run + 1}, after earlier ones ran "
            f"with max_iter={saved['max_iter']}; resume with that max_iter (not {max_iter}) "
            "or start a new fit")
    if max_iter < done:
        raise ValueError(f"EMTrainer state has already done {done} iterations of its restart; "
                         f"max_iter={max_iter} is below that")
    if saved.get("noise_prior_variance") == "auto" and saved.get("noise_prior_strength", 1):
        # The automatic s₀ search runs after min(search_warmup, max_iter − 1) iterations.
        warmup = saved.get("search_warmup", 1)
        before, after = (min(warmup, limit - 1) for limit in (saved["max_iter"], max_iter))
        if before != after:
            # (the message said "ran after 1 iteration(s), not after search_warmup=1 as with
            # max_iter=1", which read as a contradiction: it is min(search_warmup, max_iter − 1))
            fits = (f"max_iter >= {warmup + 1}" if before == warmup
                    else f"max_iter={saved['max_iter']}")
            raise ValueError(
                f"EMTrainer state was saved with max_iter={saved['max_iter']}; the automatic "
                f"noise-prior search runs after min(search_warmup, max_iter - 1) iterations, "
                f"{before} there but {after} with max_iter={max_iter} (search_warmup="
                f"{warmup}), so the resumed fit would be neither run: resume with {fits} "
                "(the config key train.em.max_iter) or start a new fit")


@dataclass(frozen=True)
class FitContext:
    """What stays fixed during one :meth:`mfa.em.EMTrainer.fit`."""

    source: DataSource
    val_source: DataSource | None
    floor: float  # noise-variance floor of the M-step
    search: bool  # choose the noise prior's variance on val_source (noise_prior_variance="auto")
    early_stopping: bool  # patience > 0 and validation data
    callbacks: Sequence[Callback]
    checkpoint_fn: Callable | None
    # the features a validation row's score covers, which min_delta (per row and feature)
    # scales by: D, or with missing data the validation rows' mean observed count
    features_per_row: float = math.nan


@dataclass
class RunState:
    """Where a fit stands, enough to resume it; :meth:`as_dict` gives the keys of
    :meth:`EMTrainer.state_dict` (unchanged since the first checkpoints, so old ones resume).

    Attributes:
        run: the restart in progress (``n_init`` once the fit is done).
        iteration: EM iterations done in that restart.
        previous_log_likelihood: the MAP objective per train row (the mean log-likelihood
            without a prior) of the last iteration (``None`` at the start of a restart and
            right after the noise prior was chosen).
        best_log_likelihood, best_params: the best finished restart so far (its model
            ``state_dict``), or ``-inf`` and ``None``; best_run_val: its best validation score
            (``None`` without early stopping), which a re-seeding round must beat.
        runs_done: restarts finished.
        converged: whether the best restart met ``tol`` (set when the fit ends).
        generator: the re-seeding generator's state within the restart (``None`` at its start
            and once the fit is done).
        noise_prior_variance: the ``s₀`` chosen by the latest search of this restart
            (``None`` before it, while a repeated search is due, or when the config fixes it).
        searches, previous_noise_prior_variance: the searches run in this restart (a
            re-seeding round, which runs none, starts at ``max_searches``) and the choice of
            the one before the latest (``None`` before a second one is due).
        best_val_noise_prior_variance: the ``s₀`` under which ``best_val_params`` were fitted.
        selected_noise_prior_variance: the ``s₀`` of ``best_params`` (``None`` without a
            search).
        val_at_search, stint_best, stint_gain, stale_iterations: the best validation score
            when the latest repeated search was due (``None`` before one), the best since then
            (before one: the best so far) and its latest gain, and the iterations since the
            best so far; a stint under the stronger prior that does not beat
            ``val_at_search`` ends the restart.
        stint_mark: the score at which patience last restarted in the stint; patience counts
            against it (see :meth:`track_validation`; with ``min_delta = 0`` it is
            ``stint_best``).
        best_val_log_likelihood, best_val_params, bad_iterations: early stopping within the
            restart: the best validation score so far, its parameters and the iterations since
            (``None``, ``None``, 0 without early stopping).
        tempered: the fields of the fit's :class:`~mfa.tempering.TemperedStep` once the fit
            is done (``None`` before, or when it was not tried): a finished fit resumed keeps
            its result rather than trying the step again.

    The last two groups are saved only when set, so checkpoints without them still load.
    """

    run: int = 0
    iteration: int = 0
    previous_log_likelihood: float | None = None
    best_log_likelihood: float = -math.inf
    best_params: dict[str, Tensor] | None = None
    best_run_val: float | None = None
    runs_done: int = 0
    converged: bool = False
    generator: Tensor | None = field(default=None, repr=False)
    noise_prior_variance: float | None = None
    best_val_log_likelihood: float | None = None
    best_val_params: dict[str, Tensor] | None = field(default=None, repr=False)
    bad_iterations: int = 0
    searches: int = 0
    previous_noise_prior_variance: float | None = None
    best_val_noise_prior_variance: float | None = None
    val_at_search: float | None = None
    stint_best: float | None = None
    stale_iterations: int = 0
    stint_gain: float | None = None
    stint_mark: float | None = None
    selected_noise_prior_variance: float | None = None
    tempered: dict | None = None

    REQUIRED = frozenset({"run", "iteration", "best_log_likelihood", "best_params", "runs_done"})
    #: The accepted types of each saved key (checked on load, so a tampered state fails there).
    TYPES = {
        "run": (int,), "iteration": (int,), "runs_done": (int,),
        "best_log_likelihood": (float, int), "previous_log_likelihood": (float, int, type(None)),
        "best_params": (dict, type(None)), "converged": (bool,),
        "noise_prior_variance": (float, int), "best_val_log_likelihood": (float, int),
        "best_val_params": (dict,), "bad_iterations": (int,), "searches": (int,),
        "previous_noise_prior_variance": (float, int),
        "best_val_noise_prior_variance": (float, int), "val_at_search": (float, int),
        "stint_best": (float, int), "stale_iterations": (int,),
        "stint_gain": (float, int), "stint_mark": (float, int), "best_run_val": (float, int),
        "selected_noise_prior_variance": (float, int), "tempered": (dict,),
    }

    def as_dict(self) -> dict:
        state = {
            "run": self.run, "iteration": self.iteration, "runs_done": self.runs_done,
            "best_log_likelihood": self.best_log_likelihood, "best_params": self.best_params,
            "previous_log_likelihood": self.previous_log_likelihood,
            "converged": self.converged,
        }
        if self.generator is not None:
            state["generator"] = self.generator
        if self.noise_prior_variance is not None:
            state["noise_prior_variance"] = self.noise_prior_variance
        if self.best_val_params is not None:
            state["best_val_log_likelihood"] = self.best_val_log_likelihood
            state["best_val_params"] = self.best_val_params
            state["bad_iterations"] = self.bad_iterations
            state["stale_iterations"] = self.stale_iterations
        if self.searches:
            state["searches"] = self.searches
        for name in ("previous_noise_prior_variance", "best_val_noise_prior_variance",
                     "val_at_search", "stint_best", "stint_gain", "stint_mark", "best_run_val",
                     "selected_noise_prior_variance", "tempered"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name)
        return state

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        # Checkpoints from before repeated stints: the stint is the whole restart. (Right
        # after a repeated search, marked by val_at_search, the stint has no best yet.)
        stint_best = state.get("stint_best", None if "val_at_search" in state
                               else state.get("best_val_log_likelihood"))
        return cls(
            run=int(state["run"]), iteration=int(state["iteration"]),
            previous_log_likelihood=state.get("previous_log_likelihood"),
            best_log_likelihood=state["best_log_likelihood"], best_params=state["best_params"],
            runs_done=int(state["runs_done"]), converged=bool(state.get("converged", False)),
            generator=state.get("generator"),
            noise_prior_variance=state.get("noise_prior_variance"),
            best_val_log_likelihood=state.get("best_val_log_likelihood"),
            best_val_params=state.get("best_val_params"),
            bad_iterations=int(state.get("bad_iterations", 0)),
            searches=int(state.get("searches", 0)),
            previous_noise_prior_variance=state.get("previous_noise_prior_variance"),
            best_val_noise_prior_variance=state.get("best_val_noise_prior_variance"),
            val_at_search=state.get("val_at_search"),
            stint_best=stint_best,
            stale_iterations=int(state.get("stale_iterations", state.get("bad_iterations", 0))),
            stint_gain=state.get("stint_gain"), best_run_val=state.get("best_run_val"),
            # (saved before min_delta: patience counted against the stint's best)
            stint_mark=state.get("stint_mark", stint_best),
            selected_noise_prior_variance=state.get("selected_noise_prior_variance"),
            tempered=state.get("tempered"),
        )

    def records_up_to(self, history: list[dict]) -> list[dict]:
        """The ``history`` records up to this state's iteration of its restart: a state saved
        in a callback of the iteration that converged (or found no stronger prior) stands
        before that iteration, whose record the resumed fit writes again."""
        return [r for r in history if (r["run"], r["iteration"]) <= (self.run, self.iteration)]

    def params_to(self, device: torch.device) -> None:
        """Move the kept parameters (``best_params``, ``best_val_params``) to ``device``, the
        model's: a state read onto the CPU (``load_checkpoint``'s default) met the parameters
        of a CUDA model in ``torch.equal``, which refuses tensors on two devices (a resumed
        GPU fit raised where no iteration after the resume beat the saved best)."""
        for name in ("best_params", "best_val_params"):
            params = getattr(self, name)
            if params is not None:
                setattr(self, name, {k: v.to(device) for k, v in params.items()})

    def start_restart(self) -> None:
        """Forget what belongs to the restart that ended (or has not begun)."""
        self.iteration, self.previous_log_likelihood, self.generator = 0, None, None
        self.noise_prior_variance, self.bad_iterations, self.stale_iterations = None, 0, 0
        self.best_val_log_likelihood, self.best_val_params = None, None
        self.searches, self.previous_noise_prior_variance = 0, None
        self.best_val_noise_prior_variance = self.val_at_search = self.stint_best = None
        self.stint_gain = self.stint_mark = None

    def track_validation(self, clone, model, val_ll: float, counting: bool,
                         patience: int, min_gain: float = 0.0) -> bool:
        """Keep the best validation score and ``clone(model)``, the parameters that reached it
        (and their ``s₀``). ``True`` when the stint is over: ``patience`` iterations without
        a score ``min_gain`` above the one at which patience last restarted, in the current
        stint (``patience // 2`` in a stint after a repeated search; with ``min_gain = 0``:
        without a better score), or ``2·patience`` without a better score overall (a stronger
        prior's stint may climb from below the best for a while, but not for ever). Only
        iterations with ``counting`` count: those after the warm-up and the search. (Gains
        below ``min_gain`` still keep their parameters as the best; a creep of small gains
        restarts patience once it adds up to ``min_gain``.)"""
        if self.best_val_log_likelihood is None or val_ll > self.best_val_log_likelihood:
            self.best_val_log_likelihood, self.stale_iterations = val_ll, 0
            self.best_val_params = clone(model)
            self.best_val_noise_prior_variance = self.noise_prior_variance
        elif counting:
            self.stale_iterations += 1
        if self.stint_best is None or val_ll > self.stint_best:
            self.stint_gain = None if self.stint_best is None else val_ll - self.stint_best
            self.stint_best = val_ll
        if self.stint_mark is None or val_ll > self.stint_mark + min_gain:
            self.stint_mark, self.bad_iterations = val_ll, 0
        elif counting:
            self.bad_iterations += 1
        return self.stint_over(patience)

    def stint_over(self, patience: int) -> bool:
        """Whether patience has run out (see :meth:`track_validation`). A stint after a
        repeated search explores a stronger prior: it is over once it stops climbing for
        ``patience // 2`` iterations (at least 1), or once, climbing from below the best, its
        latest gain per iteration would not reach the best within ``2·patience`` iterations of
        the switch: what a prior that does not pay costs is a few iterations."""
        if self.val_at_search is None:
            return self.bad_iterations >= patience
        left = 2 * patience - self.stale_iterations
        if self.bad_iterations >= max(1, patience // 2) or left <= 0:
            return True
        if self.stint_best is None:  # a repeated search's stint that has not begun
            return False
        # Still below the best: over when its latest gain, kept up, would not get there in time.
        gap = self.best_val_log_likelihood - self.stint_best
        return gap > 0 and self.stint_gain is not None and self.stint_gain * left < gap

    def stint_improved(self) -> bool:
        """Whether the iterations since the latest repeated search beat the best validation
        score it started from (``True`` before any repeated search)."""
        return self.val_at_search is None or self.stint_best > self.val_at_search

    def search_again(self) -> None:
        """Make the next E-step run another noise prior search (from the current model)."""
        self.previous_noise_prior_variance = self.noise_prior_variance
        self.val_at_search = self.best_val_log_likelihood
        self.stint_best = self.stint_gain = self.stint_mark = None
        self.noise_prior_variance, self.bad_iterations, self.stale_iterations = None, 0, 0
