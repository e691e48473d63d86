"""The ``train.hierarchical`` section of a run config (:mod:`mfa.config`).

:class:`HierarchicalSection` is :class:`mfa.hierarchical.HierarchicalConfig` as a run sets it:
the root's ``K₁``, ``L`` and noise type are the run's ``model`` values and the stages' EM is
the run's ``train.em`` unless given here. :func:`hierarchical_config` builds the trainer's
config from a :class:`~mfa.config.RunConfig`; :func:`check_hierarchical` validates it with the
trainer's own checks, naming the YAML keys.

``mfa.hierarchical`` is imported inside the functions: it imports ``mfa.checkpoint``, which
imports ``mfa.config``, which imports this module.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mfa.em import EMConfig

__all__ = ["HIERARCHY_FROM_MODEL", "MOVED_KEYS", "HierarchicalSection", "check_hierarchical",
           "fill_stages", "hierarchical_config", "ignored_seeds_note"]


#: ``mfa.hierarchical.HierarchicalConfig`` fields a run takes from its ``model`` section.
HIERARCHY_FROM_MODEL: dict[str, str] = {
    "root_components": "n_components", "n_factors": "n_factors", "noise": "noise",
    "min_noise": "min_noise",
}

#: Where a key that is not in ``train.hierarchical`` lives instead (named in the unknown-key
#: error of :mod:`mfa.config`).
MOVED_KEYS: dict[str, str] = {
    f"train.hierarchical.{key}": f"model.{name}" for key, name in HIERARCHY_FROM_MODEL.items()
}


@dataclass
class HierarchicalSection:
    """``train.hierarchical``: :class:`mfa.hierarchical.HierarchicalConfig` as a run sets it.

    The root's ``K₁``, ``L``, noise type and noise floor are the run's ``model.n_components``,
    ``model.n_factors``, ``model.noise`` and ``model.min_noise`` (:data:`HIERARCHY_FROM_MODEL`;
    the children's too), and the EM of
    the root and of the children is the run's ``train.em`` unless ``root_em`` / ``child_em``
    is given. The other fields and defaults are HierarchicalConfig's; a test keeps the two in
    step.
    """

    rows_per_component: int = 1000  # a child of rows_k rows gets rows_k // this components
    min_child_components: int = 1  # lower clamp of a child's component count
    max_child_components: int = 100  # upper clamp of a child's component count
    min_child_rows: int | None = None  # fewer rows: keep the root component; None: rows_per_...
    # (a stage's seed, and train.em.seed, are not used: train.hierarchical.seed seeds them)
    root_em: EMConfig | None = None  # EM of the root; None: train.em
    child_em: EMConfig | None = None  # EM of each child; None: train.em
    final_em: EMConfig | None = None  # EM on the flattened model (keys left out: train.em's,
    # init "none", n_init 1); None: no EM
    assign_batch_size: int = 4096  # rows per batch of the hard assignment
    seed: int = 0  # seeds the stages' EM and the children (the root starts from the run's model)


def hierarchical_config(config: Any) -> Any:
    """The ``mfa.hierarchical.HierarchicalConfig`` of a run: ``train.hierarchical`` with the
    root's size, factors, noise type and floor from ``model`` (see :data:`HIERARCHY_FROM_MODEL`) and
    a copy of ``train.em`` for a ``root_em`` / ``child_em`` left at ``None``."""
    from mfa.hierarchical import HierarchicalConfig

    section = copy.deepcopy(config.train.hierarchical)
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    values.update({key: getattr(config.model, name) for key, name in HIERARCHY_FROM_MODEL.items()})
    for stage in ("root_em", "child_em"):
        if values[stage] is None:
            values[stage] = copy.deepcopy(config.train.em)
    return HierarchicalConfig(**values)


def ignored_seeds_note(config: Any) -> str | None:
    """For a hierarchical run (``config`` a :class:`~mfa.config.RunConfig`) that sets EM
    seeds it does not use, what to tell it, else ``None``: ``train.em.seed`` when not 0 (its
    default) and a stage's ``seed`` where it differs from ``train.em``'s (a stage's other
    keys are used; its seed is derived from ``train.hierarchical.seed``, so that every child
    is seeded alone; they were ignored without a word)."""
    if config.train.method != "hierarchical":
        return None
    section, em_seed = config.train.hierarchical, config.train.em.seed
    ignored = [f"train.em.seed={em_seed}"] if em_seed != 0 else []
    ignored += [f"train.hierarchical.{stage}.seed={getattr(section, stage).seed}"
                for stage in ("root_em", "child_em", "final_em")
                if getattr(section, stage) is not None
                and getattr(section, stage).seed != em_seed]
    if not ignored:
        return None
    return (f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by a "
            f"hierarchical run: train.hierarchical.seed (here {section.seed}) seeds its "
            "stages' EM and every child; set that instead")


def check_hierarchical(config: Any) -> None:
    """``train.hierarchical`` with the model's values, checked by the trainer itself."""
    from mfa.hierarchical import HierarchicalTrainer

    checked = hierarchical_config(config)
    if config.train.method != "hierarchical":  # a null stage copies train.em, which the run
        # uses as it is (missing='allow' for EM on incomplete rows): not a stage's value
        checked = dataclasses.replace(checked, **{
            stage: dataclasses.replace(getattr(checked, stage), missing="error")
            for stage in ("root_em", "child_em")
            if getattr(config.train.hierarchical, stage) is None})
    try:
        HierarchicalTrainer(checked)
    except (TypeError, ValueError) as error:
        from mfa.config import yaml_words  # (mfa.config imports this module)

        text = yaml_words(str(error))
        match = re.match(r"HierarchicalConfig\.([\w.]+) (.*)", text, re.DOTALL)
        if match is None:
            raise ValueError(f"invalid value in train.hierarchical: {text}") from None
        key, problem = match.groups()
        stage, _, field = key.partition(".")
        where = (f"model.{HIERARCHY_FROM_MODEL[key]}" if key in HIERARCHY_FROM_MODEL
                 # a null stage is train.em's copy: the value came from there
                 else f"train.em.{field}" if field and stage in ("root_em", "child_em")
                 and getattr(config.train.hierarchical, stage) is None
                 else f"train.hierarchical.{key}")
        problem = re.sub(r"HierarchicalConfig\.(\w+)", r"train.hierarchical.\1", problem)
        raise ValueError(f"invalid value for {where}: {problem}") from None


def fill_stages(train: Mapping[str, Any], em_default: EMConfig) -> Mapping[str, Any]:
    """The ``train`` mapping with a partial ``hierarchical.root_em`` / ``child_em`` /
    ``final_em`` completed from ``train.em`` (``em_default`` with the keys ``train.em``
    gives): the keys a stage leaves out take the run's EM values, as a null root or child
    stage does, not EMConfig's class defaults (which save no checkpoint until the end);
    ``final_em``'s ``init`` is ``"none"`` and its ``n_init`` 1 unless given (it continues
    from the flattened model: the only values it takes; ``train.em.n_init`` 2 made every
    ``final_em`` section an error). ``missing`` is not copied: a stage takes only
    ``"error"`` (an EM run on incomplete rows was refused for its unused partial stage)."""
    hier = train.get("hierarchical")
    if not isinstance(hier, Mapping):
        return train
    base = {f.name: getattr(em_default, f.name) for f in dataclasses.fields(EMConfig)}
    em = train.get("em")
    if isinstance(em, Mapping):  # (unknown keys are reported under train.em)
        base.update({key: value for key, value in em.items()
                     if key in base and key != "missing"})
    filled = {"root_em": base, "child_em": base, "final_em": {**base, "init": "none", "n_init": 1}}
    hier = {stage: {**filled[stage], **value} if stage in filled
            and isinstance(value, Mapping) else value for stage, value in hier.items()}
    return {**train, "hierarchical": hier}


def resolve_stages(config: Any) -> Any:
    """``config`` with a null ``train.hierarchical.root_em`` / ``child_em`` replaced by a
    copy of ``train.em`` (what the run uses), for comparing two configs."""
    section = config.train.hierarchical
    stages = {stage: copy.deepcopy(config.train.em) for stage in ("root_em", "child_em")
              if getattr(section, stage) is None}
    if not stages:
        return config
    train = dataclasses.replace(config.train, hierarchical=dataclasses.replace(section, **stages))
    return dataclasses.replace(config, train=train)
