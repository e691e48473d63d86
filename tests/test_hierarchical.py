"""Tests of mfa.hierarchical: the flattened model against a dense float64 two-level
reference, the child-count rule, kept root components, determinism and resuming."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import F64, DenseMixture, gen, random_model, random_parameters
from torch.distributions import MultivariateNormal

from mfa import ConvergenceWarning, EMConfig, EMTrainer, MixtureOfFactorAnalyzers
from mfa.data import ImageDataset
from mfa.hierarchical import (
    HierarchicalConfig,
    HierarchicalTrainer,
    assign_rows,
    child_components,
    fit_hierarchical,
    flatten_hierarchy,
    total_components,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")]

EM = EMConfig(max_iter=8, batch_size=256, progress=False)


def config(**overrides) -> HierarchicalConfig:
    base = dict(root_components=3, n_factors=2, rows_per_component=60, max_child_components=4,
                root_em=EM, child_em=EM, seed=0)
    base.update(overrides)
    return HierarchicalConfig(**base)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """600 train and 300 held-out rows from a 9-component MFA over 5 features (float64)."""
    truth = random_model(9, 5, 2, seed=11)
    x, _ = truth.sample(900, generator=gen(5))
    return x[:600], x[600:]


@pytest.fixture(scope="module")
def fitted(data):
    trainer = HierarchicalTrainer(config())
    model = trainer.fit(data[0])
    return trainer, model


def two_level_reference(trainer: HierarchicalTrainer, x: torch.Tensor) -> torch.Tensor:
    """``log Σ_k π_k Σ_j π_kj N(x; μ_kj, A_kj A_kjᵀ + diag d_kj)`` from the root's weights and
    each child's parameters, dense float64, without the flattened model."""
    outer = []
    for k, child in enumerate(trainer.children):
        inner = DenseMixture.from_model(child).log_prob(x)  # [n]: log Σ_j π_kj p_kj(x)
        outer.append(trainer.root.weights.detach().to(F64)[k].log() + inner)
    return torch.logsumexp(torch.stack(outer, -1), -1)


# ---------------------------------------------------------------------- exactness


def test_flattened_model_is_the_two_level_mixture(data, fitted):
    trainer, model = fitted
    x = data[1]
    assert model.n_components == sum(c.n_components for c in trainer.children)
    expected = two_level_reference(trainer, x)
    torch.testing.assert_close(model.log_prob(x).detach(), expected, rtol=1e-10, atol=1e-9)
    # and each flat component is the dense Gaussian of its child component
    dense = MultivariateNormal(
        model.means.detach(),
        covariance_matrix=model.factor_loadings.detach() @ model.factor_loadings.detach().mT
        + torch.diag_embed(model.noise_variance.detach()),
    )
    flat_ref = torch.logsumexp(model.weights.detach().log() + dense.log_prob(x[:, None]), -1)
    torch.testing.assert_close(model.log_prob(x).detach(), flat_ref, rtol=1e-10, atol=1e-9)


def test_flat_weights_are_products_and_sum_to_one(fitted):
    trainer, model = fitted
    expected = torch.cat([trainer.root.weights[k] * c.weights
                          for k, c in enumerate(trainer.children)]).detach()
    torch.testing.assert_close(model.weights.detach(), expected, rtol=1e-12, atol=1e-14)
    assert abs(model.weights.sum().item() - 1) < 1e-12
    start = 0
    for child in trainer.children:
        stop = start + child.n_components
        torch.testing.assert_close(model.means[start:stop].detach(), child.means.detach())
        torch.testing.assert_close(model.factor_loadings[start:stop].detach(),
                                   child.factor_loadings.detach())
        torch.testing.assert_close(model.noise_variance[start:stop].detach(),
                                   child.noise_variance.detach(), rtol=1e-12, atol=1e-14)
        start = stop


def test_flatten_isotropic_children_against_dense_reference():
    root = random_model(2, 4, 1, "isotropic", seed=1)
    children = [random_model(3, 4, 1, "isotropic", seed=2),
                random_model(2, 4, 1, "isotropic", seed=3)]
    flat = flatten_hierarchy(root, children)
    assert flat.noise == "isotropic" and flat.n_components == 5
    x = torch.randn(50, 4, generator=gen(0), dtype=F64) * 2
    parts = [root.weights[k].log() + DenseMixture.from_model(c).log_prob(x)
             for k, c in enumerate(children)]
    ref = torch.logsumexp(torch.stack(parts, -1), -1)
    torch.testing.assert_close(flat.log_prob(x).detach(), ref.detach(), rtol=1e-10, atol=1e-10)


def test_flatten_children_at_their_noise_floor_and_with_tiny_weights():
    """A float32 child whose noise variance rounds to its floor (a valid model: Adam's, a
    marginal's) was refused by from_parameters; weights multiplied in linear space underflowed
    to 0 in float32 (a root weight and a child weight of ~1e-30 each). Both are kept now,
    also when the children's floors differ."""
    root = random_model(2, 3, 1, seed=1).float()
    raw = torch.zeros(2, 3)
    raw[0, 1] = -100.0  # d = 1e-6 + 4e-44: the floor itself in float32
    at_floor = MixtureOfFactorAnalyzers.from_raw_parameters(
        torch.tensor([0.3, -0.2]), torch.randn(2, 3, generator=gen(5)),
        torch.randn(2, 3, 1, generator=gen(6)), raw, min_noise=1e-6)
    assert float(at_floor.noise_variance[0, 1].detach()) == torch.tensor(1e-6).item()
    third = random_model(2, 3, 1, seed=3).float()
    other = MixtureOfFactorAnalyzers.from_parameters(
        third.weights.detach(), third.means.detach(), third.factor_loadings.detach(),
        third.noise_variance.detach() + 1e-3, min_noise=1e-3)  # another floor
    flat = flatten_hierarchy(root, [at_floor, other])
    assert flat.min_noise == at_floor.min_noise
    x = torch.randn(40, 3, generator=gen(0))
    parts = [root.log_weights[k].double() + DenseMixture.from_model(c.double()).log_prob(
        x.double()) for k, c in enumerate([at_floor, other])]
    torch.testing.assert_close(flat.log_prob(x).detach().double(),
                               torch.logsumexp(torch.stack(parts, -1), -1).detach(),
                               rtol=1e-5, atol=1e-4)
    tiny_root = MixtureOfFactorAnalyzers.from_raw_parameters(
        torch.tensor([0.0, -69.0]), torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3))
    tiny_child = MixtureOfFactorAnalyzers.from_raw_parameters(
        torch.tensor([0.0, -69.0]), torch.ones(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3))
    flat32 = flatten_hierarchy(tiny_root, [tiny_child, tiny_child])
    assert float(flat32.log_weights[3].detach()) == pytest.approx(-138.0, abs=1e-3)  # e⁻¹³⁸ ≈ 1e-60


# ---------------------------------------------------------------------- the child rule


def test_child_component_rule():
    cfg = config(rows_per_component=100, min_child_components=2, max_child_components=5,
                 min_child_rows=30)
    assert child_components(0, cfg) == 0
    assert child_components(29, cfg) == 0  # too few rows: keep the root component
    assert child_components(30, cfg) == 2  # 30 // 100 = 0, clamped up to 2
    assert child_components(250, cfg) == 2
    assert child_components(399, cfg) == 3
    assert child_components(10_000, cfg) == 5  # clamped down
    assert child_components(1, config(rows_per_component=1, min_child_components=3,
                                      min_child_rows=1)) == 1  # never more than the rows
    # never more than the rows the child's EM trains on: with the default (automatic) noise
    # prior it holds out val_fraction of them (49 rows, 5 held out: 44); without, all 49
    from mfa.em import EMConfig
    holds = config(rows_per_component=1, min_child_components=60, max_child_components=60,
                   min_child_rows=10, child_em=EMConfig(progress=False))
    assert child_components(49, holds) == 44
    keeps = config(rows_per_component=1, min_child_components=60, max_child_components=60,
                   min_child_rows=10, child_em=EMConfig(progress=False, patience=0,
                                                        noise_prior_variance=1e-3))
    assert child_components(49, keeps) == 49
    # a child whose EM would hold out every row (which hold_out refuses) keeps the root
    # component (a child fit of 1 row at val_fraction 0.6 failed)
    tiny = config(rows_per_component=1, min_child_rows=1, max_child_components=2,
                  child_em=EMConfig(progress=False, val_fraction=0.6))
    assert child_components(1, tiny) == 0 and child_components(3, tiny) == 1
    default = config(rows_per_component=100)  # min_child_rows None: rows_per_component
    assert child_components(99, default) == 0 and child_components(100, default) == 1
    # nor more than the rows its K-means initialisation reads (init_samples): 11 components
    # for 3 initialisation rows were refused only once the root had been fitted
    few = config(rows_per_component=10, max_child_components=20, min_child_rows=10,
                 child_em=EMConfig(progress=False, patience=0, noise_prior_variance=1e-3,
                                   init_samples=3))
    assert child_components(117, few) == 3
    assert child_components(117, replace(few, child_em=replace(few.child_em, init="none"))) == 11
    assert total_components([0, 250, 10_000], cfg) == 1 + 2 + 5
    with pytest.raises(ValueError, match="rows must be an int >= 0"):
        child_components(-1, cfg)


def test_counts_follow_the_root_and_children_follow_the_rule(data, fitted):
    trainer, _ = fitted
    x = data[0]
    expected = torch.bincount(trainer.root.predict(x), minlength=3)
    assert torch.equal(trainer.counts, expected)
    assert int(trainer.counts.sum()) == x.shape[0]
    torch.testing.assert_close(assign_rows(trainer.root, x, batch_size=7), trainer.root.predict(x))
    for k, child in enumerate(trainer.children):
        n_k = child_components(int(trainer.counts[k]), trainer.config)
        assert child.n_components == max(n_k, 1)
        assert bool(trainer.kept[k]) == (n_k == 0)
    # the test is informative only if the rule was not trivial here
    assert len({c.n_components for c in trainer.children}) > 1


@pytest.mark.parametrize("seed, small_at", [(0, 0), (1, 2)])
def test_root_component_with_too_few_rows_is_kept_as_it_is(seed, small_at):
    """(Seed 1 puts the small cluster's root component last: at index 0 a child built
    from the root's first component passed whichever component it read.)"""
    g = gen(3)
    centres = torch.tensor([[0.0] * 4, [12.0] * 4, [-12.0, 12.0, -12.0, 12.0]], dtype=F64)
    sizes = (300, 300, 12)
    x = torch.cat([c + torch.randn(n, 4, generator=g, dtype=F64)
                   for c, n in zip(centres, sizes, strict=True)])
    cfg = config(rows_per_component=50, min_child_rows=40, max_child_components=3, seed=seed)
    trainer = HierarchicalTrainer(cfg)
    model = trainer.fit(x)
    small = int(trainer.counts.argmin())
    assert small == small_at, trainer.counts
    assert int(trainer.counts[small]) < 40, trainer.counts  # the scenario is exercised
    assert trainer.kept.tolist() == [k == small for k in range(3)]
    child = trainer.children[small]
    assert child.n_components == 1
    root = trainer.root
    torch.testing.assert_close(child.means[0].detach(), root.means[small].detach())
    torch.testing.assert_close(child.noise_variance[0].detach(),
                               root.noise_variance[small].detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(child.factor_loadings[0].detach(),
                               root.factor_loadings[small].detach())
    start = sum(c.n_components for c in trainer.children[:small])
    torch.testing.assert_close(model.weights[start].detach(), root.weights[small].detach(),
                               rtol=1e-12, atol=1e-14)
    assert model.n_components == sum(c.n_components for c in trainer.children) == 1 + 3 + 3
    torch.testing.assert_close(model.log_prob(x).detach(), two_level_reference(trainer, x),
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("noise, precision", [("diagonal", "float64"), ("isotropic", "float64"),
                                              ("diagonal", "float32")])
def test_component_as_model_is_that_component_alone(noise, precision):
    """_component_as_model(model, k), for every k: one component of weight 1 with component
    k's mean, loadings and noise variances (those the model was built from), whose density
    is that of the dense Gaussian N(μ_k, A_k A_kᵀ + diag d_k)."""
    from mfa.hierarchical import _component_as_model

    dtype = getattr(torch, precision)
    params = random_parameters(4, 5, 2, noise, seed=7, dtype=dtype)
    model = MixtureOfFactorAnalyzers.from_parameters(**params, noise=noise)
    x = torch.randn(20, 5, generator=gen(2), dtype=F64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for k in range(4):
        alone = _component_as_model(model, k)
        assert alone.n_components == 1 and alone.noise == noise and alone.dtype == dtype
        assert alone.min_noise == model.min_noise
        torch.testing.assert_close(alone.weights.detach(), torch.ones(1, dtype=dtype))
        torch.testing.assert_close(alone.means[0].detach(), params["means"][k], **tol)
        torch.testing.assert_close(alone.factor_loadings[0].detach(),
                                   params["factor_loadings"][k], **tol)
        torch.testing.assert_close(alone.noise_variance[0].detach(),
                                   params["noise_variance"][k].expand(5), **tol)
        a = params["factor_loadings"][k].to(F64)
        cov = a @ a.T + torch.diag(params["noise_variance"][k].to(F64).expand(5))
        dense = MultivariateNormal(params["means"][k].to(F64), covariance_matrix=cov)
        torch.testing.assert_close(alone.log_prob(x.to(dtype)).detach().to(F64),
                                   dense.log_prob(x), rtol=1e-10 if dtype == F64 else 1e-5,
                                   atol=1e-10 if dtype == F64 else 1e-4)


# ---------------------------------------------------------------------- determinism, resume


def _same(a: MixtureOfFactorAnalyzers, b: MixtureOfFactorAnalyzers) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_model_other_seed_other_model(data, fitted):
    _, model = fitted
    again = fit_hierarchical(data[0], config())
    assert _same(model, again)
    other = fit_hierarchical(data[0], config(seed=1))
    assert not (other.n_components == model.n_components and _same(model, other))


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("stop_after", [0, 1])
def test_resume_after_a_kill_equals_an_uninterrupted_run(data, fitted, tmp_path, stop_after):
    _, uninterrupted = fitted

    def kill(trainer, record):
        if record["stage"] == "child" and record["component"] == stop_after:
            raise Killed

    with pytest.raises(Killed):
        HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path, callbacks=[kill])
    assert not (tmp_path / "model.pt").exists()
    assert (tmp_path / f"child-{stop_after:05d}.pt").exists()
    assert not (tmp_path / f"child-{stop_after + 1:05d}.pt").exists()

    fresh = HierarchicalTrainer(config())
    resumed = fresh.fit(data[0], checkpoint_dir=tmp_path)
    assert _same(resumed, uninterrupted)
    children = [r for r in fresh.history if r["stage"] == "child"]
    assert [r["resumed"] for r in children] == [k <= stop_after for k in range(3)]
    assert fresh.history[0]["resumed"]

    # a finished folder gives back the same model without training anything
    done = HierarchicalTrainer(config())
    assert _same(done.fit(data[0], checkpoint_dir=tmp_path), uninterrupted)
    assert all(r["resumed"] for r in done.history)
    assert all(r["em_seconds"] == 0 and r["train_log_likelihood"] is None
               for r in done.history)
    trained = [r for r in fresh.history if r["stage"] == "child" and not r["resumed"]]
    assert all(r["em_seconds"] > 0 and r["train_log_likelihood"] is not None for r in trained)


def test_resume_refuses_another_config_or_other_data(data, tmp_path):
    HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different HierarchicalConfig"):
        HierarchicalTrainer(config(rows_per_component=61)).fit(data[0], checkpoint_dir=tmp_path)
    # settings that do not change the fit (progress, device) are not a different config
    quiet = config(child_em=replace(EM, progress=True))
    HierarchicalTrainer(quiet).fit(data[0], checkpoint_dir=tmp_path)
    # nor are the nested seeds (derived from HierarchicalConfig.seed) or the assignment's
    # batch size (the same labels in any): they were refused
    for neutral in (config(root_em=replace(EM, seed=5)), config(assign_batch_size=7)):
        HierarchicalTrainer(neutral).fit(data[0], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="fitted to other data"):
        HierarchicalTrainer(config()).fit(data[0][:500], checkpoint_dir=tmp_path)


def test_resume_refuses_child_files_swapped_between_components(data, tmp_path):
    """Each child file records its component and rows; swapped files were loaded into the
    other components' places and gave another model, silently."""
    HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path)
    (tmp_path / "model.pt").unlink()
    a, b = tmp_path / "child-00000.pt", tmp_path / "child-00001.pt"
    a.rename(tmp_path / "swap.pt")
    b.rename(a)
    (tmp_path / "swap.pt").rename(b)
    with pytest.raises(ValueError, match=r"child-00000.pt holds the child of root component "
                                         r"1 \(\d+ rows, \d+ components\), not that of "
                                         r"component 0"):
        HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path)


def test_resume_refuses_a_child_file_of_other_rows_in_its_own_place(data, tmp_path):
    """root.pt (and model.pt) gone and the data changed: the root is fitted again on the new
    rows, and a child file left from the old fit, in its own component's place, holds the
    child of other rows and another number of components. It was flattened into the model
    (the component index alone was checked); it is refused, naming the rows it holds."""
    HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path)
    (tmp_path / "root.pt").unlink()
    (tmp_path / "model.pt").unlink()
    other = random_model(9, 5, 2, seed=12).sample(600, generator=gen(6))[0]
    with pytest.raises(ValueError, match=r"child-00000.pt holds the child of root component "
                                         r"0 \(\d+ rows, \d+ components\), not that of "
                                         r"component 0 \(\d+ rows"):
        HierarchicalTrainer(config()).fit(other, checkpoint_dir=tmp_path)


def test_resume_with_data_of_another_dtype_is_refused_before_training(data, tmp_path):
    def kill(trainer, record):
        if record["stage"] == "child":
            raise Killed

    with pytest.raises(Killed):
        HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path, callbacks=[kill])
    seen = []
    with pytest.raises(ValueError, match="root.pt holds a float64 root, the data is float32"):
        HierarchicalTrainer(config()).fit(data[0].float(), checkpoint_dir=tmp_path,
                                          callbacks=[lambda t, r: seen.append(r)])
    assert seen == []


def test_min_noise_floors_the_root_and_every_child(data):
    """model.min_noise reaches every model the trainer builds (it was the default 1e-6)."""
    floor = 0.05
    trainer = HierarchicalTrainer(config(min_noise=floor))
    # a noise variance of this data falls far below the floor (and the trainers say so)
    with pytest.warns(RuntimeWarning, match="noise variances' floor"):
        flat = trainer.fit(0.01 * data[0])
    for model in (trainer.root, *trainer.children, flat):
        assert model.min_noise == floor
        assert float(model.noise_variance.min()) >= floor


def test_a_folder_without_min_noise_resumes_at_the_default(data, fitted, tmp_path):
    """Folders written before HierarchicalConfig.min_noise existed fitted with 1e-6: they
    resume under that value and are refused under another."""
    HierarchicalTrainer(config()).fit(data[0], checkpoint_dir=tmp_path)
    done = HierarchicalTrainer(config(min_noise=1e-6))
    assert "min_noise" not in done._fingerprint()
    assert _same(done.fit(data[0], checkpoint_dir=tmp_path), fitted[1])
    with pytest.raises(ValueError, match="different HierarchicalConfig"):
        HierarchicalTrainer(config(min_noise=1e-3)).fit(data[0], checkpoint_dir=tmp_path)


# ---------------------------------------------------------------------- final EM, datasets


def test_final_em_continues_from_the_flattened_model(data, fitted):
    _, flat = fitted
    before = EMTrainer.evaluate(flat, data[0])
    trainer = HierarchicalTrainer(config(final_em=replace(EM, init="none", max_iter=3)))
    model = trainer.fit(data[0])
    after = EMTrainer.evaluate(model, data[0])
    assert after >= before - 1e-9  # EM never lowers the likelihood
    assert model.n_components == flat.n_components
    assert trainer.history[-1]["stage"] == "final"


def test_dataset_input_gives_the_tensor_result():
    pixels = torch.randint(0, 256, (400, 6), generator=gen(2), dtype=torch.uint8)
    dataset = ImageDataset(pixels, dtype=F64)
    rows = pixels.to(F64) / 255
    cfg = config(rows_per_component=40)
    from_dataset = fit_hierarchical(dataset, cfg)
    from_tensor = fit_hierarchical(rows, cfg)
    assert from_dataset.n_components == from_tensor.n_components
    pairs = zip(from_dataset.state_dict().values(), from_tensor.state_dict().values(),
                strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- comparison with flat


def test_two_level_model_is_comparable_to_a_flat_model_of_the_same_size():
    """Held-out nats/row of this setup (seed 0, 12 true components over 6 features):
    two-level K=10: -10.92, flat K=10: -10.85, root alone (K₁=3): -14.23, truth: -10.51.
    Over seeds 0-3 the two-level model stayed within 0.31 of the flat one. Asserted: the
    children add much to the root, and the two-level model is within 0.5 of the flat one."""
    params = random_parameters(12, 6, 2, seed=21)
    params["means"] = 3 * params["means"]  # separated clusters
    truth = MixtureOfFactorAnalyzers.from_parameters(**params)
    x, _ = truth.sample(3000, generator=gen(8))
    train, test = x[:2400], x[2400:]
    em = replace(EM, max_iter=30)
    trainer = HierarchicalTrainer(config(root_components=3, rows_per_component=200,
                                         max_child_components=6, root_em=em, child_em=em))
    two_level = trainer.fit(train)
    k = two_level.n_components
    flat = MixtureOfFactorAnalyzers(k, 6, 2, dtype=F64)
    EMTrainer(em).fit(flat, train)
    ll = {name: m.log_prob(test).mean().item()
          for name, m in [("two_level", two_level), ("flat", flat), ("root", trainer.root)]}
    print(f"K={k}", ll, "truth", truth.log_prob(test).mean().item())
    assert k >= 8
    assert ll["two_level"] > ll["root"] + 1.5
    assert abs(ll["two_level"] - ll["flat"]) < 0.5


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, error, match", [
    ({"root_components": 0}, ValueError, "root_components must be an int >= 1"),
    ({"rows_per_component": 0}, ValueError, "rows_per_component must be an int >= 1"),
    ({"max_child_components": 1.5}, ValueError, "max_child_components must be an int"),
    ({"min_child_components": 5, "max_child_components": 4}, ValueError,
     "min_child_components must be <= max_child_components"),
    ({"min_child_rows": 0}, ValueError, "min_child_rows must be None or an int >= 1"),
    ({"noise": "full"}, ValueError, "noise must be 'diagonal' or 'isotropic'"),
    ({"root_em": {"max_iter": 3}}, TypeError, "root_em must be an EMConfig"),
    ({"child_em": EMConfig(max_iter=-1)}, ValueError, "max_iter"),
    ({"final_em": EMConfig()}, ValueError, "final_em.init must be 'none'"),
    ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    ({"min_noise": -1e-3}, ValueError, "min_noise must be"),
    ({"child_em": replace(EM, missing="allow")}, ValueError,
     "child_em.missing must be 'error': hierarchical training .* needs complete rows"),
])
def test_bad_config(overrides, error, match):
    with pytest.raises(error, match=match):
        HierarchicalTrainer(config(**overrides))


def test_bad_data(data):
    trainer = HierarchicalTrainer(config())
    x = data[0]
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        trainer.fit(x[0])
    with pytest.raises(TypeError, match="floating point"):
        trainer.fit(x.round().long())
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite values.*row 3, feature 1"):
        trainer.fit(bad)
    with pytest.raises(ValueError, match="fewer than root_components=3"):
        trainer.fit(x[:2])
    with pytest.raises(TypeError, match="numpy"):
        trainer.fit(x.numpy())
    with pytest.raises(TypeError, match="torch.Tensor"):
        trainer.fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="n_factors=2 exceeds the 1 features"):
        trainer.fit(x[:, :1])
    with pytest.raises(ValueError, match="validation has 4 features, data 5"):
        trainer.fit(x, validation=x[:, :4])
    # the bad argument is named (a 1-D validation was reported as data)
    with pytest.raises(ValueError, match=r"validation must have shape \[N, D\], got \(5,\)"):
        trainer.fit(x, validation=x[0])
    with pytest.raises(ValueError, match="validation contains non-finite values.*row 3"):
        trainer.fit(x, validation=bad)


def test_flatten_rejects_mismatched_children():
    root = random_model(2, 4, 1, seed=1)
    good = random_model(2, 4, 1, seed=2)
    with pytest.raises(ValueError, match=r"one child per root component \(2\), got 1"):
        flatten_hierarchy(root, [good])
    with pytest.raises(ValueError, match="children must share n_factors"):
        flatten_hierarchy(root, [good, random_model(2, 4, 2, seed=3)])
    with pytest.raises(ValueError, match="children must share noise"):
        flatten_hierarchy(root, [good, random_model(2, 4, 1, "isotropic", seed=3)])
    with pytest.raises(ValueError, match="children have 3 features, the root 4"):
        flatten_hierarchy(root, [random_model(2, 3, 1, seed=2), random_model(2, 3, 1, seed=3)])
    with pytest.raises(TypeError, match="child 1 must be a MixtureOfFactorAnalyzers"):
        flatten_hierarchy(root, [good, "child"])
    with pytest.raises(TypeError, match="root must be a MixtureOfFactorAnalyzers"):
        flatten_hierarchy(None, [good, good])


def test_warnings_from_children_are_convergence_warnings_only(data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_hierarchical(data[0], config())
    assert {type(w.message).__name__ for w in caught} <= {"ConvergenceWarning"}


@pytest.mark.parametrize("stage", ["root_em", "child_em", "final_em"])
def test_a_bad_nested_em_setting_names_its_stage(stage):
    """Every stage's bad max_iter said 'EMConfig.max_iter ...' (which stage?), and run configs
    got a generic 'invalid value in train.hierarchical'."""
    from mfa.config import load_config

    bad = EMConfig(max_iter=-1, **({"init": "none"} if stage == "final_em" else {}))
    with pytest.raises(ValueError, match=rf"HierarchicalConfig\.{stage}\.max_iter must be"):
        HierarchicalTrainer(config(**{stage: bad}))
    with pytest.raises(ValueError, match=rf"train\.hierarchical\.{stage}\.max_iter: must be"):
        load_config(overrides=["train.method=hierarchical",
                               f"train.hierarchical.{stage}={{max_iter: -1}}"])


def test_final_em_takes_one_start_whatever_train_em_n_init_says():
    """train.em.n_init=2 was copied into a final_em section with init none, an error that
    advised final_em.init kmeans or random, which another rule forbids. A final_em section
    now takes n_init 1 (it continues from the flattened model); one set above 1 is refused
    with a reason that does not send the user to a forbidden init."""
    from mfa.config import load_config

    run = ["train.method=hierarchical", "train.em.n_init=2"]
    stages = load_config(overrides=[*run, "train.hierarchical.final_em={max_iter: 1}"]
                         ).trainer_config()
    assert (stages.final_em.n_init, stages.final_em.init, stages.final_em.max_iter) == (
        1, "none", 1)
    assert stages.root_em.n_init == 2  # (the other stages keep train.em's)
    for bad in (["train.hierarchical.final_em={n_init: 2}"],
                ["train.hierarchical.final_em={n_init: 2, init: kmeans}"]):
        with pytest.raises(ValueError, match=r"train\.hierarchical\.final_em\.(n_init: must "
                           r"be 1|init: must be 'none')") as caught:
            load_config(overrides=[*run, *bad])
        assert "'kmeans' or 'random'" not in str(caught.value)
    with pytest.raises(ValueError, match=r"HierarchicalConfig\.final_em\.n_init must be 1 "
                                         r"\(the final EM continues"):
        HierarchicalTrainer(config(final_em=replace(EM, init="none", n_init=2)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("stage", ["root_em", "child_em", "final_em"])
def test_a_stage_device_this_machine_lacks_is_refused_before_any_work(stage):
    """child_em.device or final_em.device = "cuda" on a CPU was accepted, and failed with
    torch's own error once that stage began: after the root (and for final_em every child)
    had been fitted. Now refused first, naming the field."""
    x = torch.randn(600, 6, generator=gen(0))
    em = EMConfig(max_iter=3, progress=False)
    stages = {"root_em": em, "child_em": em, "final_em": None}
    stages[stage] = EMConfig(max_iter=3, progress=False, device="cuda",
                             **({"init": "none"} if stage == "final_em" else {}))
    done = []
    trainer = HierarchicalTrainer(HierarchicalConfig(root_components=2, n_factors=1,
                                                     rows_per_component=100, **stages))
    with pytest.raises(ValueError, match=rf"HierarchicalConfig\.{stage}\.device: device "
                                         r"'cuda' asks for CUDA"):
        trainer.fit(x, callbacks=[lambda t, record: done.append(record["stage"])])
    assert done == []
    with pytest.raises(ValueError, match=r"^device: device 'cuda' asks for CUDA"):
        HierarchicalTrainer(HierarchicalConfig(root_components=2, n_factors=1)).fit(
            x, device="cuda")


# ---------------------------------------------------------------------- what the log says


def test_a_stage_of_one_component_is_logged_in_the_singular(data, caplog):
    """("root: 600 rows, 1 components" read wrong.) A single-component root and final stage."""
    stage_em = replace(EM, max_iter=2, noise_prior_variance=1e-3, tempered_step=False)
    trainer = HierarchicalTrainer(config(root_components=1, max_child_components=1,
                                         root_em=stage_em, child_em=stage_em))
    with caplog.at_level(logging.INFO, logger="mfa.hierarchical"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(data[0])
    stages = [r.getMessage() for r in caplog.records if r.name == "mfa.hierarchical"]
    assert "root: 600 rows, 1 component" in stages, stages
    assert not any(line.endswith(" 1 components") for line in stages), stages

def test_each_stage_is_logged_before_its_fit_and_names_its_warnings(data, caplog):
    """Each stage's line ("root: 600 rows, 2 components") comes before the EM lines of its own
    fit (they came after it, so a child's lines read as the next child's), and the EM
    warnings of each stage name it."""
    stage_em = replace(EM, max_iter=2, tol=1e-12, noise_prior_variance=1e-3,
                       tempered_step=False)  # (2 iterations: no stage converges)
    trainer = HierarchicalTrainer(config(root_components=2, root_em=stage_em, child_em=stage_em,
                                         final_em=replace(stage_em, init="none")))
    done = []

    def callback(trainer_, record):  # (called once a stage is fitted)
        done.append(record)
        logging.getLogger("mfa.test").info("fitted %s %s", record["stage"],
                                           record.get("component"))

    with (caplog.at_level(logging.DEBUG, logger="mfa"),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        trainer.fit(data[0], callbacks=[callback])
    events = []  # the log, EM's iteration lines merged into one "EM"
    for record in caplog.records:
        text = "EM" if record.name == "mfa.em" else record.getMessage()
        if not (events and text == "EM" == events[-1]) and record.name != "mfa.prior_search":
            events.append(text)
    root, child_0, child_1 = done[0], done[1], done[2]
    assert [child_0["kept"], child_1["kept"]] == [False, False]
    assert events == [
        "root: 600 rows, 2 components", "EM", "fitted root None",
        f"child 1/2: {child_0['rows']} rows, {child_0['n_components']} components", "EM",
        "fitted child 0",
        f"child 2/2: {child_1['rows']} rows, {child_1['n_components']} components", "EM",
        "fitted child 1",
        f"final: 600 rows, {child_0['n_components'] + child_1['n_components']} components",
        "EM", "fitted final None"]
    assert root["rows"] == 600
    stopped = [(str(w.message).split(" before ")[0], str(w.message).rsplit(" [", 1)[1])
               for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert stopped == [("EM run 1/1: stopped at max_iter=2", f"{stage}]")
                       for stage in ("root", "child 1/2", "child 2/2", "final")]
    # A user's filter by module or by the message's start silences them, as it did the
    # warnings themselves before they named their stage (re-issued from the file's path
    # and behind the stage's name, neither matched)
    for ignore in ({"module": "mfa"}, {"message": "EM run"}, {"category": ConvergenceWarning}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", **ignore)
            HierarchicalTrainer(trainer.config).fit(data[0])
        assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)], ignore
