"""Hierarchical training as a run's trainer (``train.method: hierarchical``).

:class:`mfa.hierarchical.HierarchicalTrainer` builds its own models (a root, then one child
per root component) and keeps its own checkpoints, one file per finished stage, in a folder.
:class:`HierarchicalRunTrainer` gives it the interface :mod:`mfa.workflow` drives a trainer
through, so a run folder works as for EM and Adam:

* ``fit(model, data, validation, callbacks, checkpoint_fn, checkpoint_dir=...,
  new_model=...)`` returns the flattened model; ``model``, the run's freshly built (seeded by
  the run's ``seed``) or resumed model, fixes ``D`` and the device the stages are fitted on,
  and is where a new run's root EM starts (``train.hierarchical.seed`` seeds the stages' EM
  and the children); the stages' checkpoints go to ``checkpoint_dir`` (the run's
  ``hierarchy/``);
* ``checkpoint_fn(trainer, model)`` is called once the root is fitted (the run's
  ``checkpoint.pt`` then holds the root, so the run can be resumed from the first unfinished
  child) and at the end with the flattened model;
* ``callbacks`` get ``cb(trainer, model, record)`` per stage record (root, each child, final);
* ``history``, ``state_dict()`` and ``load_state_dict()`` as for the other trainers; a
  resumed stage keeps the record of the session that fitted it (its log-likelihood and
  seconds), so a resumed run's history is that of an uninterrupted one.

A resume reloads every finished stage from ``checkpoint_dir`` and gives the model of an
uninterrupted run (each child is seeded from the seed and its root index alone). A run killed
while the root is being fitted has no checkpoint yet and starts again. An unfinished run
resumed without ``checkpoint_dir/root.pt`` (the folder removed, or a run copied without it)
fits every stage again, with a warning, its root from ``new_model()``, the model a new run
starts from (``model`` is then the checkpoint's fitted root: EM from it gave another model).
A finished run resumed (its state says so) fits nothing: ``fit`` returns the model it is
given, the run's flattened result, and keeps the history, whether or not ``checkpoint_dir``
still holds the stages.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from mfa import distributed
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer
from mfa.model import MixtureOfFactorAnalyzers

__all__ = ["HIERARCHY_DIR", "HierarchicalRunTrainer"]

logger = logging.getLogger(__name__)

#: The sub-folder of a run folder that holds the stages' checkpoints.
HIERARCHY_DIR = "hierarchy"

_STATE_KEYS = {"method", "history", "finished"}


class HierarchicalRunTrainer:
    """A :class:`~mfa.hierarchical.HierarchicalTrainer` with a run trainer's interface.

    Args:
        config: the :class:`~mfa.hierarchical.HierarchicalConfig` (from
            :meth:`mfa.config.RunConfig.trainer_config`).
    """

    def __init__(self, config: HierarchicalConfig) -> None:
        self.trainer = HierarchicalTrainer(config)
        self.config = self.trainer.config
        self.history: list[dict] = []
        self.finished = False

    def fit(
        self,
        model: MixtureOfFactorAnalyzers,
        data: Tensor | Dataset,
        validation: Tensor | Dataset | None = None,
        callbacks: Sequence[Callable] = (),
        checkpoint_fn: Callable[[HierarchicalRunTrainer, MixtureOfFactorAnalyzers], None]
        | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        new_model: Callable[[], MixtureOfFactorAnalyzers] | None = None,
    ) -> MixtureOfFactorAnalyzers:
        """Fit root and children on ``data`` (``[N, D]`` or a map-style dataset of rows) and
        return the flattened model; see the module docstring for the arguments
        (``new_model``: called only where a resumed run's root must be fitted again)."""
        if model.n_features != _n_features(data):
            raise ValueError(f"the model has {model.n_features} features, the data "
                             f"{_n_features(data)}")

        # Under torch.distributed only rank 0 writes the run's checkpoint (as EM's and
        # Adam's trainers do): every rank's write raced for one file and wrote config.yaml.
        checkpoint_fn = distributed.main_process_only(checkpoint_fn)
        # The records of an earlier session (load_state_dict): kept for the stages it fitted.
        earlier = {(r.get("stage"), r.get("component")): r for r in self.history
                   if isinstance(r, dict)}

        def on_stage(trainer: HierarchicalTrainer, record: dict) -> None:
            self.history = _merged(trainer.history, earlier, trainer.fitted)
            current = trainer.model if record["stage"] == "final" else trainer.root
            # After the root and each child: the checkpoint (and its train_seconds) covers
            # every finished stage, which a resume reuses from checkpoint_dir.
            if record["stage"] in ("root", "child") and checkpoint_fn is not None:
                checkpoint_fn(self, trainer.root)
            for callback in callbacks:
                callback(self, current, record)

        # A finished run resumed: ``model`` is its flattened result, returned as it is with
        # its history (without the stages' files every stage was fitted again, the log saying
        # "nothing is left to fit" and train_seconds unchanged).
        if self.finished:
            if checkpoint_fn is not None:  # (at the end, as EM's)
                checkpoint_fn(self, model)
            return model
        # A resumed run's model is its fitted root: its root starts anew where it is not saved.
        start = _root_start(model, checkpoint_dir, new_model) if self.history else model
        # On the model's device (the run's): a dataset (above STREAM_ABOVE) is not on one.
        flat = self.trainer.fit(data, validation, checkpoint_dir=checkpoint_dir,
                                callbacks=[on_stage], device=model.device, root=start)
        self.history = _merged(self.trainer.history, earlier, self.trainer.fitted)
        self.finished = True
        if checkpoint_fn is not None:
            checkpoint_fn(self, flat)
        return flat

    def state_dict(self) -> dict:
        """The stage records and whether the fit finished (the models live in the
        checkpoint folder)."""
        return {"method": "hierarchical", "history": copy.deepcopy(self.history),
                "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state of another trainer is refused."""
        if not isinstance(state, dict) or state.get("method") != "hierarchical":
            raise ValueError("not a hierarchical trainer's state (its 'method' is "
                             f"{state.get('method') if isinstance(state, dict) else state!r})")
        if set(state) != _STATE_KEYS or not isinstance(state["history"], list):
            raise ValueError(f"a hierarchical trainer state has the keys "
                             f"{sorted(_STATE_KEYS)}, got {sorted(state)}")
        self.history = copy.deepcopy(state["history"])
        self.finished = bool(state["finished"])


def _root_start(model: MixtureOfFactorAnalyzers, checkpoint_dir: str | Path | None,
                new_model: Callable[[], MixtureOfFactorAnalyzers] | None
                ) -> MixtureOfFactorAnalyzers:
    """Where the root of an unfinished run resumed from ``model`` (its fitted root) starts:
    ``model`` where ``checkpoint_dir`` holds ``root.pt`` (then unused: the root is loaded),
    else ``new_model()``, the model an uninterrupted run's root started from."""
    root = Path(checkpoint_dir) / "root.pt" if checkpoint_dir is not None else None
    if root is not None and distributed.broadcast_from_main(root.exists):  # (rank 0's view)
        return model
    missing = f"{root} is missing" if root is not None else "no checkpoint_dir is given"
    if new_model is None:
        raise ValueError(f"a resumed hierarchical run's finished stages are not saved "
                         f"({missing}) and fit has no new_model to fit its root again from (its "
                         "model is the fitted root, from which EM gives another model): pass "
                         "new_model, the model a new run starts from")
    logger.warning("%s (removed, or the run was copied without it): every stage is fitted "
                   "again, the root from the model a new run starts from", missing)
    return new_model()


def _merged(records: list[dict], earlier: dict, fitted: dict | None = None) -> list[dict]:
    """A copy of ``records`` with each resumed stage's record replaced by the one an earlier
    session wrote when it fitted that stage (``earlier``, by ``(stage, component)``, else
    the record kept in the stage's file, ``fitted``: a run killed after a stage's file was
    written but before its own checkpoint held the record; where it has one of the same rows
    and components)."""
    out = []
    for record in records:
        key = (record["stage"], record.get("component"))
        saved = earlier.get(key) or (fitted or {}).get(key)
        if record["resumed"] and saved is not None and all(
                saved.get(key) == record[key] for key in ("rows", "n_components")):
            record = saved
        out.append(copy.deepcopy(record))
    return out


def _n_features(data: Tensor | Dataset) -> int:
    if isinstance(data, Tensor):
        return int(data.shape[-1])
    first = data[0]
    row = first[0] if isinstance(first, (tuple, list)) else first
    return int(row.numel())
