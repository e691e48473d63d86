"""Tests of mfa.hierarchical_section: the trainer config a run builds from its sections."""

from __future__ import annotations

import dataclasses

import pytest

from mfa.config import load_config
from mfa.em import EMConfig, EMTrainer
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


# ------------------------------------------------ mfa.hierarchical_config: what it accepts


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_hierarchy_of_diagonal_gaussians_has_no_factors():
    """n_factors 0 (every component a diagonal Gaussian) is a model the library fits: the
    trainer and a run config take it, and the flattened model is the dense two-level one."""
    import torch
    from helpers import F64, DenseMixture, gen

    from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer

    load_config(None, ["train.method=hierarchical", "model.n_factors=0"])
    g = gen(0)
    x = torch.cat([torch.randn(60, 3, generator=g, dtype=F64) + shift for shift in (0.0, 8.0)])
    em = EMConfig(max_iter=3, progress=False, patience=0, noise_prior_variance=1e-3)
    trainer = HierarchicalTrainer(HierarchicalConfig(
        root_components=2, n_factors=0, rows_per_component=30, root_em=em, child_em=em))
    model = trainer.fit(x)
    assert model.n_factors == 0 and model.n_components == sum(
        c.n_components for c in trainer.children) > 2
    outer = [trainer.root.weights.detach()[k].log()
             + DenseMixture.from_model(child).log_prob(x)
             for k, child in enumerate(trainer.children)]
    torch.testing.assert_close(model.log_prob(x).detach(),
                               torch.logsumexp(torch.stack(outer, -1), -1),
                               rtol=1e-10, atol=1e-9)


def test_a_child_em_without_validation_trains_on_all_its_rows():
    """A child's EM holds out validation rows only for its automatic noise prior (strength
    > 0) or early stopping: with strength 0 and patience 0 it trains on all 49 rows, so up
    to 49 components; with either, round(49 · 0.1) = 5 are held out."""
    from mfa.hierarchical_config import HierarchicalConfig, child_components

    def children(**em):
        em = EMConfig(progress=False, **em)
        return child_components(49, HierarchicalConfig(
            rows_per_component=1, min_child_components=60, max_child_components=60,
            min_child_rows=10, child_em=em))

    assert children(noise_prior_strength=0.0, patience=0) == 49
    assert children(noise_prior_strength=0.5, patience=0) == 44
    assert children(noise_prior_strength=0.0, patience=3) == 44
    assert children(noise_prior_strength=0.0, patience=0, noise_prior_variance=1e-3) == 49


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_a_child_gets_no_more_components_than_its_initialisation_reads(init):
    """Both random and K-means initialisations read init_samples rows and need one a
    component: the child count is the largest K the child's own EM accepts (117 rows at 10
    a component would ask 11; init_samples=3 allows 3)."""
    import torch
    from helpers import F64, gen

    from mfa.hierarchical_config import HierarchicalConfig, child_components
    from mfa.model import MixtureOfFactorAnalyzers

    em = EMConfig(max_iter=1, progress=False, patience=0, noise_prior_variance=1e-3,
                  init_samples=3, init=init)
    n = child_components(117, HierarchicalConfig(rows_per_component=10,
                                                 max_child_components=20, min_child_rows=10,
                                                 child_em=em))
    x = torch.randn(117, 3, generator=gen(0), dtype=F64)
    EMTrainer(em).fit(MixtureOfFactorAnalyzers(n, 3, 1, dtype=F64), x)
    with pytest.raises(ValueError, match=rf"initialisation of K={n + 1} components needs"):
        EMTrainer(em).fit(MixtureOfFactorAnalyzers(n + 1, 3, 1, dtype=F64), x)


def test_each_stage_runs_on_its_own_device_else_the_fits():
    """stage_devices: (home, root, child): a stage's device where it sets one, else the
    fit's device, else the data's (the CPU for a dataset). cpu:0 and cpu are told apart
    here to see which setting each stage took, on a machine without CUDA."""
    import torch
    from torch.utils.data import TensorDataset

    from mfa.hierarchical_config import HierarchicalConfig, stage_devices

    cpu, cpu0 = torch.device("cpu"), torch.device("cpu", 0)
    x = torch.zeros(4, 2)

    def devices(device=None, data=x, **stages):
        cfg = HierarchicalConfig(**{name: EMConfig(device=value) for name, value
                                    in stages.items()})
        return stage_devices(cfg, device, data)

    assert devices() == (cpu, cpu, cpu)
    assert devices(root_em="cpu:0") == (cpu, cpu0, cpu)
    assert devices(child_em="cpu:0") == (cpu, cpu, cpu0)
    assert devices(device="cpu:0") == (cpu0, cpu0, cpu0)
    assert devices(device="cpu:0", child_em="cpu") == (cpu0, cpu0, cpu)
    assert devices(data=TensorDataset(x)) == (cpu, cpu, cpu)


def test_only_a_hierarchical_run_is_told_its_em_seeds_are_unused():
    """An EM run uses train.em.seed (and ignores train.hierarchical): no note for it."""
    from mfa.hierarchical_section import ignored_seeds_note

    seeds = ["train.em.seed=3", "train.hierarchical.root_em={seed: 4}"]
    for method in ("em", "sgd"):
        assert ignored_seeds_note(load_config(None, [f"train.method={method}", *seeds])) is None
    note = ignored_seeds_note(load_config(None, ["train.method=hierarchical", *seeds]))
    assert note.startswith("train.em.seed=3, train.hierarchical.root_em.seed=4 are not used")


def test_every_stage_but_the_final_one_must_be_an_em_config():
    from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer

    for stage in ("root_em", "child_em"):
        with pytest.raises(TypeError, match=rf"HierarchicalConfig\.{stage} must be an "
                                            r"EMConfig, got NoneType"):
            HierarchicalTrainer(HierarchicalConfig(**{stage: None}))
    HierarchicalTrainer(HierarchicalConfig(final_em=None))  # None: no final EM


@pytest.mark.parametrize("field, refused, accepted", [
    ("assign_batch_size", 0, 1), ("rows_per_component", 0, 1), ("root_components", 0, 1),
    ("n_factors", -1, 0), ("min_child_components", 0, 1), ("seed", -1, 0),
    ("min_child_rows", 0, 1), ("min_noise", -1e-9, 0.0),
])
def test_each_hierarchical_limit_is_refused_beyond_and_accepted_at(field, refused, accepted):
    from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer

    with pytest.raises(ValueError, match=rf"HierarchicalConfig\.{field} must be"):
        HierarchicalTrainer(HierarchicalConfig(**{field: refused}))
    HierarchicalTrainer(HierarchicalConfig(**{field: accepted}))
