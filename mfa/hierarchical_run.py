"""Hierarchical training as a run's trainer (``train.method: hierarchical``).

:class:`mfa.hierarchical.HierarchicalTrainer` builds its own models (a root, then one child
per root component) and keeps its own checkpoints, one file per finished stage, in a folder.
:class:`HierarchicalRunTrainer` gives it the interface :mod:`mfa.workflow` drives a trainer
through, so a run folder works as for EM and Adam:

* ``fit(model, data, validation, callbacks, checkpoint_fn, checkpoint_dir=...)`` returns the
  flattened model (``model``, the run's freshly built or resumed root-sized model, only fixes
  ``D`` and the device the stages are fitted on); the stages' checkpoints go to
  ``checkpoint_dir`` (the run's ``hierarchy/``);
* ``checkpoint_fn(trainer, model)`` is called once the root is fitted (the run's
  ``checkpoint.pt`` then holds the root, so the run can be resumed from the first unfinished
  child) and at the end with the flattened model;
* ``callbacks`` get ``cb(trainer, model, record)`` per stage record (root, each child, final);
* ``history``, ``state_dict()`` and ``load_state_dict()`` as for the other trainers.

A resume reloads every finished stage from ``checkpoint_dir`` and gives the model of an
uninterrupted run (each child is seeded from the seed and its root index alone). A run killed
while the root is being fitted has no checkpoint yet and starts again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer
from mfa.model import MixtureOfFactorAnalyzers

__all__ = ["HIERARCHY_DIR", "HierarchicalRunTrainer"]

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
    ) -> MixtureOfFactorAnalyzers:
        """Fit root and children on ``data`` (``[N, D]`` or a map-style dataset of rows) and
        return the flattened model; see the module docstring for the arguments."""
        if model.n_features != _n_features(data):
            raise ValueError(f"the model has {model.n_features} features, the data "
                             f"{_n_features(data)}")

        def on_stage(trainer: HierarchicalTrainer, record: dict) -> None:
            self.history = copy.deepcopy(trainer.history)
            current = trainer.model if record["stage"] == "final" else trainer.root
            # After the root and each child: the checkpoint (and its train_seconds) covers
            # every finished stage, which a resume reuses from checkpoint_dir.
            if record["stage"] in ("root", "child") and checkpoint_fn is not None:
                checkpoint_fn(self, trainer.root)
            for callback in callbacks:
                callback(self, current, record)

        self.finished = False
        # On the model's device (the run's): a dataset (above STREAM_ABOVE) is not on one.
        flat = self.trainer.fit(data, validation, checkpoint_dir=checkpoint_dir,
                                callbacks=[on_stage], device=model.device)
        self.history = copy.deepcopy(self.trainer.history)
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


def _n_features(data: Tensor | Dataset) -> int:
    if isinstance(data, Tensor):
        return int(data.shape[-1])
    first = data[0]
    row = first[0] if isinstance(first, (tuple, list)) else first
    return int(row.numel())
