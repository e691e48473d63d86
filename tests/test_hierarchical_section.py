"""Tests of mfa.hierarchical_section: the trainer config a run builds from its sections."""

from __future__ import annotations

import dataclasses

from mfa.config import load_config
from mfa.hierarchical_section import hierarchical_config


def test_null_stages_are_copies_of_train_em_not_the_runs_section_itself():
    """A null root_em / child_em is train.em: the trainer config holds a copy of it each,
    so changing one stage (or the run's train.em) leaves the others as they were."""
    config = load_config(None, ["train.method=hierarchical", "train.em.max_iter=7"])
    hier = hierarchical_config(config)
    assert hier.root_em == hier.child_em == config.train.em
    hier.child_em.max_iter = 2
    assert config.train.em.max_iter == 7 and hier.root_em.max_iter == 7
    hier.root_em.tol = 0.5
    assert config.train.em.tol == load_config(None).train.em.tol
    config.train.em.max_iter = 9
    assert (hier.root_em.max_iter, hier.child_em.max_iter) == (7, 2)
    # and the section's own values are copied too: the run's section is left alone
    given = load_config(None, ["train.method=hierarchical",
                               "train.hierarchical.final_em={max_iter: 3}"])
    again = hierarchical_config(given)
    again.final_em.max_iter = 4
    assert given.train.hierarchical.final_em.max_iter == 3
    assert dataclasses.replace(again.final_em, max_iter=3) == given.train.hierarchical.final_em
