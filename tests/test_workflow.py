"""End to end: :func:`mfa.workflow.train` on the embedded MNIST digits with a tiny model —
its result, its checkpoints, interrupting and resuming (EM and SGD; kill -9 of the ``mfa``
command), what a resume may change, checks before the run folder is made, run folders."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import drawn_lines, saved_figures

from mfa import run_folder, workflow
from mfa.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mfa.config import apply_overrides, load_config, save_config
from mfa.data import DatasetNotFoundError, load_dataset
from mfa.model import MixtureOfFactorAnalyzers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml"
EM_ITERATIONS = 4
SGD_EPOCHS = 3

TINY = [
    "model.n_components=3",
    "model.n_factors=2",
    f"train.em.max_iter={EM_ITERATIONS}",
    "train.em.kmeans_iter=3",
    "train.em.checkpoint_every=1",
    "train.em.progress=false",
    f"train.sgd.epochs={SGD_EPOCHS}",
    "train.sgd.kmeans_iter=3",
    "train.sgd.checkpoint_every=1",
    "train.sgd.progress=false",
    "data.limit=300",
    "data.dequantize=false",  # the `data` fixture below holds pixel/255 floats
    "output.n_samples=16",
    "output.n_inpaint=4",
    "output.inpaint_samples=2",
    "output.n_factor_components=2",
    "device=cpu",
]


def make_config(out_dir: Path, name: str, *overrides: str):
    return load_config(CONFIG, [*TINY, f"output.dir={out_dir}", f"output.name={name}",
                                *overrides])


def assert_same_parameters(a: MixtureOfFactorAnalyzers, b: MixtureOfFactorAnalyzers) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), (
            f"{name} differs by {(sa[name] - sb[name]).abs().max().item():.3g}"
        )


class Interrupt:
    """A callback that raises KeyboardInterrupt (Ctrl-C) when ``record[key] == at``."""

    def __init__(self, key: str, at: int) -> None:
        self.key, self.at, self.seen = key, at, []

    def __call__(self, trainer, model, record) -> None:
        self.seen.append(record[self.key])
        if record[self.key] == self.at:
            raise KeyboardInterrupt


def interrupted_then_resumed(config, key: str, at: int, total: int):
    """Train ``config`` until the callback interrupts it at ``record[key] == at``, then
    resume the run folder; returns (run folder, checkpoint after the interrupt, result).
    The checkpoint of record ``at`` is written before the callbacks run, so the resumed run
    continues after ``at`` rather than starting over: its callbacks see only the records
    from ``at + 1`` to ``total``."""
    run_dir = Path(config.output.dir) / config.output.name
    stop = Interrupt(key, at)
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(stop,))
    assert stop.seen == list(range(1, at + 1))
    assert not (run_dir / "metrics.json").exists()  # the run did not finish
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    after = Interrupt(key, at=-1)  # never interrupts; records what it sees
    result = workflow.train(None, resume=run_dir, figures=False, callbacks=(after,))
    assert result.run_dir == run_dir
    assert after.seen == list(range(at + 1, total + 1))
    return run_dir, saved, result


def history_values(history: list[dict]) -> list[dict]:
    """History records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workflow")


@pytest.fixture(scope="module")
def em_run(out_dir):
    """EM, uninterrupted, 4 iterations, a checkpoint after every one."""
    return workflow.train(make_config(out_dir, "em-a"), figures=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded-mnist", limit=300)


# ---------------------------------------------------------------------------- train


def test_train_returns_the_run_folder_model_and_metrics(em_run, out_dir):
    assert isinstance(em_run, workflow.TrainResult)
    assert em_run.run_dir == out_dir / "em-a"
    assert isinstance(em_run.model, MixtureOfFactorAnalyzers)
    assert (em_run.model.n_components, em_run.model.n_factors) == (3, 2)
    assert em_run.model.n_features == 28 * 28
    metrics = em_run.metrics
    assert metrics == json.loads((em_run.run_dir / "metrics.json").read_text())
    assert metrics["iterations"] == EM_ITERATIONS
    assert metrics["method"] == "em" and metrics["dataset"] == "embedded-mnist"
    for split in ("train", "val", "test"):
        assert math.isfinite(metrics[f"{split}_log_likelihood"])
    history = json.loads((em_run.run_dir / "history.json").read_text())
    assert [r["iteration"] for r in history] == list(range(1, EM_ITERATIONS + 1))
    # figures=False: the training curve only.
    names = {p.name for p in em_run.run_dir.iterdir()}
    assert names == {"config.yaml", "train.log", "checkpoint.pt", "metrics.json",
                     "history.json", "curve.png", ".lock"}


@pytest.mark.parametrize("method", ["em", "sgd"])
def test_the_curve_draws_em_train_points_one_m_step_left(out_dir, monkeypatch, method):
    """curve.png drew an EM record's train LL (the parameters before its M-step) at the x of
    its val LL (after it); Adam's records, per epoch, stay where they were."""
    saved = saved_figures(monkeypatch)
    result = workflow.train(make_config(out_dir, f"curve-{method}", f"train.method={method}"),
                            figures=False)
    history = json.loads((result.run_dir / "history.json").read_text())
    lines = drawn_lines(saved[-1])
    train, val = lines["train_log_likelihood"], lines["val_log_likelihood"]
    assert train[1] == [r["train_log_likelihood"] for r in history]
    assert val[1] == [r["val_log_likelihood"] for r in history]
    if method == "em":
        assert not any(r["final"] for r in history)  # (max_iter: no record without M-step)
        assert train[0] == list(range(EM_ITERATIONS))
        assert val[0] == list(range(1, EM_ITERATIONS + 1))
        assert saved[-1].axes[0].get_xlabel() == "EM iterations (M-steps applied)"
    else:
        assert train[0] == val[0] == list(range(1, SGD_EPOCHS + 1))
        assert saved[-1].axes[0].get_xlabel() == "epoch"


@pytest.mark.parametrize("method", ["em", "sgd"])
def test_the_curve_labels_ems_re_seeding_rounds(out_dir, monkeypatch, method):
    """curve.png was drawn without train.em.n_init, so EM's re-seeding rounds (runs from
    n_init on) were labelled as restarts ("run 2") instead of "re-seed 1"."""
    real, given = workflow.training_curve, {}

    def spy(history, path, **kwargs):
        given.update(kwargs)
        return real(history, path, **kwargs)

    monkeypatch.setattr(workflow, "training_curve", spy)
    workflow.train(make_config(out_dir, f"curve-n-init-{method}", f"train.method={method}",
                               "train.em.n_init=2"), figures=False)
    assert given["n_init"] == (2 if method == "em" else None)


def test_train_log_names_the_run_folder(em_run):
    log = (em_run.run_dir / "train.log").read_text()
    assert f"run folder {em_run.run_dir}; device cpu" in log
    assert "metrics: " in log


def test_train_metrics_are_the_models_held_out_log_likelihoods(em_run, data):
    with torch.no_grad():
        for split in ("train", "val", "test"):
            expected = em_run.model.log_prob(data.as_float(split)).double().mean().item()
            assert em_run.metrics[f"{split}_log_likelihood"] == pytest.approx(expected,
                                                                               rel=1e-5)


def test_checkpoint_reproduces_the_model(em_run, out_dir, data):
    ckpt = load_checkpoint(em_run.run_dir / "checkpoint.pt")
    assert ckpt.run_config == make_config(out_dir, "em-a")
    assert ckpt.run_config == load_config(em_run.run_dir / "config.yaml")
    assert ckpt.metrics == em_run.metrics
    assert len(ckpt.trainer_state["history"]) == EM_ITERATIONS
    assert_same_parameters(ckpt.model, em_run.model)
    x = data.test
    with torch.no_grad():
        assert torch.equal(ckpt.model.log_prob(x), em_run.model.log_prob(x))


def test_train_needs_a_config_or_a_run():
    with pytest.raises(ValueError, match="needs a config"):
        workflow.train(None)


def test_the_same_config_and_seed_give_the_same_model(em_run, out_dir):
    again = workflow.train(make_config(out_dir, "em-again"), figures=False)
    assert_same_parameters(again.model, em_run.model)
    for key in ("train_log_likelihood", "val_log_likelihood", "test_log_likelihood"):
        assert again.metrics[key] == em_run.metrics[key]


def test_draw_figures_writes_every_figure(em_run, data, tmp_path):
    config = load_checkpoint(em_run.run_dir / "checkpoint.pt").run_config
    paths = workflow.draw_figures(em_run.model, data, config, tmp_path)
    expected = {"samples.png", "inpaint-center.png", "inpaint-bottom.png", "inpaint-right.png",
                "outliers.png", "outliers.csv", "factors.png"}
    assert {p.name for p in paths} == expected
    assert all(p.is_file() for p in paths)


def test_no_inpainting_figures_still_ranks_outliers(em_run, data, tmp_path):
    config = apply_overrides(load_checkpoint(em_run.run_dir / "checkpoint.pt").run_config,
                             ["output.n_inpaint=0"])
    paths = workflow.draw_figures(em_run.model, data, config, tmp_path)
    names = {p.name for p in paths}
    assert not any(name.startswith("inpaint-") for name in names)
    assert {"samples.png", "outliers.png", "outliers.csv", "factors.png"} <= names


def test_no_samples_draws_no_outlier_grid_either(em_run, data, tmp_path):
    """output.n_samples: 0 ("sample grid (0: none)") still drew an outlier grid of 32."""
    config = apply_overrides(load_checkpoint(em_run.run_dir / "checkpoint.pt").run_config,
                             ["output.n_samples=0"])
    paths = workflow.draw_figures(em_run.model, data, config, tmp_path)
    assert {p.name for p in paths} == {"inpaint-center.png", "inpaint-bottom.png",
                                       "inpaint-right.png", "factors.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


# ---------------------------------------------------------------------------- resume


def test_em_resume_after_an_interrupt_gives_the_uninterrupted_model(em_run, out_dir, data):
    run_dir, saved, resumed = interrupted_then_resumed(make_config(out_dir, "em-b"),
                                                       "iteration", 2, EM_ITERATIONS)
    # The interrupt came in iteration 2's callback, after iteration 2's checkpoint.
    assert [r["iteration"] for r in saved.trainer_state["history"]] == [1, 2]
    assert_same_parameters(resumed.model, em_run.model)
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["iteration"] for r in history] == list(range(1, EM_ITERATIONS + 1))
    expected = json.loads((em_run.run_dir / "history.json").read_text())
    assert history_values(history) == history_values(expected)
    assert resumed.metrics["iterations"] == EM_ITERATIONS
    for key in ("train_log_likelihood", "val_log_likelihood", "test_log_likelihood"):
        assert resumed.metrics[key] == em_run.metrics[key]
    final = load_checkpoint(run_dir / "checkpoint.pt")
    with torch.no_grad():
        assert torch.equal(final.model.log_prob(data.test), em_run.model.log_prob(data.test))
    assert (run_dir / "train.log").read_text().count(f"run folder {run_dir}") == 2
    # the interrupt is in the log, with the way on (it was on stderr only, naming no folder)
    assert (f"interrupted: {run_dir} keeps its last checkpoint; continue with `mfa train "
            f"--resume {run_dir}`") in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("method, key", [("em", "iteration"), ("em", "run"),
                                         ("sgd", "epoch")])
def test_a_tampered_count_in_the_trainer_state_is_named_on_resume(out_dir, method, key):
    """The resume checks read the saved counts with int() before the trainer checked them:
    'invalid literal for int() with base 10' named neither the key nor the file's state."""
    config = make_config(out_dir, f"tampered-{method}-{key}", f"train.method={method}")
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(
            Interrupt("iteration" if method == "em" else "epoch", 1),))
    path = Path(config.output.dir) / config.output.name / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    payload["trainer_state"][key] = "x"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=rf"state key '{key}' must be (an )?int, got (str )?'x'"):
        workflow.train(None, resume=path.parent, figures=False,
                       overrides=[f"train.{method}.progress=false"])


@pytest.mark.parametrize("method", ["em", "sgd"])
def test_resume_of_a_finished_run_leaves_its_results_as_they_were(out_dir, method):
    """Nothing is left to fit: metrics.json (train_seconds included: it grew by the resumed
    fit's call), history.json and the checkpoint's model and metrics stay the same; its
    curve.png is kept, the curve drawn again going to curve-2.png as samples-2.png and the
    other figures do (it was replaced)."""
    done = workflow.train(make_config(out_dir, f"{method}-resumed-when-done",
                                      f"train.method={method}"),
                          figures=False)
    run_dir = done.run_dir
    before = {name: (run_dir / name).read_text() for name in ("metrics.json", "history.json")}
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    (run_dir / "curve.png").write_bytes(b"the curve, annotated")
    again = workflow.train(None, resume=run_dir, figures=False)
    assert again.metrics == done.metrics
    assert {name: (run_dir / name).read_text() for name in before} == before
    assert (run_dir / "curve.png").read_bytes() == b"the curve, annotated"
    assert (run_dir / "curve-2.png").read_bytes().startswith(b"\x89PNG")
    final = load_checkpoint(run_dir / "checkpoint.pt")
    assert final.metrics == saved.metrics
    assert_same_parameters(final.model, saved.model)


def test_resume_of_a_finished_run_of_an_older_mfa_fits_nothing_again(tmp_path):
    """A finished run saved before the re-seeding rounds and the tempered step (its trainer
    state without ``best_run_val`` and ``tempered``, its configs without ``reseed_rounds``,
    ``tempered_step`` and ``min_delta``): the resume logged "nothing is left to fit" but its
    EM ran the rounds and the tempered step and overwrote the saved model (val log-lik -2912
    -> 797 on the reviewer's run), and warned that min_delta might stop it elsewhere."""
    import yaml

    done = workflow.train(make_config(tmp_path, "old", "train.em.reseed_rounds=0",
                                      "train.em.tempered_step=false"), figures=False)
    path = done.run_dir / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    for key in ("best_run_val", "tempered", "selected_noise_prior_variance"):
        payload["trainer_state"].pop(key, None)
    config = yaml.safe_load((done.run_dir / "config.yaml").read_text())
    for em in (payload["trainer_state"]["config"], payload["run_config"]["train"]["em"],
               config["train"]["em"]):
        for key in ("reseed_rounds", "tempered_step", "min_delta"):
            del em[key]
    torch.save(payload, path)
    (done.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    saved = load_checkpoint(path)
    assert saved.run_config.train.em.reseed_rounds > 0  # (the defaults: rounds to run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = workflow.train(None, resume=done.run_dir, figures=False)
    assert not [w for w in caught if "min_delta" in str(w.message)]
    final = load_checkpoint(path)
    assert_same_parameters(final.model, saved.model)
    assert_same_parameters(again.model, saved.model)
    assert final.trainer_state.keys() == saved.trainer_state.keys()
    assert final.trainer_state["history"] == saved.trainer_state["history"]
    assert again.metrics == done.metrics


def test_sgd_resume_after_an_interrupt_gives_the_uninterrupted_model(out_dir):
    uninterrupted = workflow.train(make_config(out_dir, "sgd-a", "train.method=sgd"),
                                   figures=False)
    history_a = json.loads((uninterrupted.run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history_a] == list(range(1, SGD_EPOCHS + 1))

    run_dir, saved, resumed = interrupted_then_resumed(
        make_config(out_dir, "sgd-b", "train.method=sgd"), "epoch", 2, SGD_EPOCHS)
    assert saved.trainer_state["epoch"] == 2  # interrupted after epoch 2's checkpoint
    assert_same_parameters(resumed.model, uninterrupted.model)
    history_b = json.loads((run_dir / "history.json").read_text())
    assert history_values(history_b) == history_values(history_a)
    assert resumed.metrics["method"] == "sgd"
    assert resumed.metrics["iterations"] == SGD_EPOCHS
    assert resumed.metrics["test_log_likelihood"] == uninterrupted.metrics["test_log_likelihood"]


HIERARCHICAL = [
    "train.method=hierarchical",
    "model.n_components=2",  # the root's K₁
    "train.hierarchical.rows_per_component=60",
    "train.em.variance_floor=1e-3",  # the root's EM: train.em
    "train.hierarchical.child_em={max_iter: 3, kmeans_iter: 3, progress: false, "
    "variance_floor: 1.0e-3}",
]


class StageInterrupt:
    """Ctrl-C in the callback of child ``at``'s stage record; records the stages seen."""

    def __init__(self, at: int | None) -> None:
        self.at, self.seen = at, []

    def __call__(self, trainer, model, record) -> None:
        self.seen.append((record["stage"], record.get("component"), record["resumed"]))
        if self.at is not None and record.get("component") == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def hierarchical_run(out_dir):
    return workflow.train(make_config(out_dir, "hier-a", *HIERARCHICAL), figures=False)


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
def test_hierarchical_run_is_the_library_fit(hierarchical_run, data):
    """The run's model is HierarchicalTrainer's flattened model of the same data and config,
    whose children take their sizes from the rows of each root component."""
    from mfa.hierarchical import HierarchicalTrainer, total_components

    config = load_config(hierarchical_run.run_dir / "config.yaml")
    hier = config.trainer_config()
    assert (hier.root_components, hier.n_factors, hier.noise) == (2, 2, "diagonal")
    assert hier.root_em == config.train.em and hier.child_em.max_iter == 3
    trainer = HierarchicalTrainer(hier)
    expected = trainer.fit(data.train, data.val)
    assert_same_parameters(hierarchical_run.model, expected)
    saved = load_checkpoint(hierarchical_run.run_dir / "checkpoint.pt")
    assert_same_parameters(saved.model, expected)
    k = total_components(trainer.counts, hier)
    assert saved.model.n_components == k == hierarchical_run.metrics["n_components"] > 2
    assert saved.trainer_state["finished"] is True
    history = json.loads((hierarchical_run.run_dir / "history.json").read_text())
    assert [(r["stage"], r.get("component")) for r in history] == [
        ("root", None), ("child", 0), ("child", 1), ("final", None)]
    assert hierarchical_run.metrics["method"] == "hierarchical"
    assert sorted(p.name for p in (hierarchical_run.run_dir / "hierarchy").iterdir()) == [
        "child-00000.pt", "child-00001.pt", "model.pt", "root.pt"]
    with torch.no_grad():
        test_ll = expected.log_prob(data.test).double().mean().item()
    assert hierarchical_run.metrics["test_log_likelihood"] == pytest.approx(test_ll, rel=1e-6)


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_a_hierarchical_run_failing_at_its_first_checkpoint_keeps_its_stages_and_config(
        hierarchical_run, out_dir, monkeypatch, failure):
    """The root stage saved hierarchy/root.pt, then writing checkpoint.pt failed (a full
    disk, Ctrl-C): the clean-up deleted config.yaml and train.log and left the folder with
    only the stage (and a FAILED that pointed at both), so --resume was refused. Now the
    folder stays whole and --resume starts it over, reusing the finished root stage."""
    real = workflow.save_checkpoint

    def failing(path, *args, **kwargs):
        if path.name == "checkpoint.pt":
            raise failure(28, "No space left on device") if failure is OSError else failure()
        return real(path, *args, **kwargs)

    name = f"hier-full-disk-{failure.__name__}"
    monkeypatch.setattr(workflow, "save_checkpoint", failing)
    with pytest.raises(failure):
        workflow.train(make_config(out_dir, name, *HIERARCHICAL), figures=False)
    monkeypatch.undo()
    run_dir = out_dir / name
    kept = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "train.log", "hierarchy"} <= kept
    assert ("FAILED" in kept) == (failure is OSError)
    after = StageInterrupt(at=None)
    resumed = workflow.train(None, resume=run_dir, figures=False, callbacks=(after,))
    assert after.seen[0] == ("root", None, True)  # the finished root stage, reused
    assert_same_parameters(resumed.model, hierarchical_run.model)


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
def test_a_hierarchical_runs_checkpoint_follows_every_finished_child(out_dir):
    """The checkpoint was written after the root only, so a resume's train_seconds lost the
    time of every child an interrupted session had fitted; now it follows each child."""
    config = make_config(out_dir, "hier-each-child", *HIERARCHICAL)
    with pytest.raises(KeyboardInterrupt):  # in the last child's callback (K₁ = 2)
        workflow.train(config, figures=False, callbacks=(StageInterrupt(at=1),))
    saved = load_checkpoint(out_dir / "hier-each-child" / "checkpoint.pt")
    stages = [r["stage"] for r in saved.trainer_state["history"]]
    assert stages == ["root", "child", "child"] and saved.trainer_state["finished"] is False
    fitted = sum(r["seconds"] for r in saved.trainer_state["history"])
    assert saved.metrics["train_seconds"] >= fitted


@pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")
def test_hierarchical_resume_after_an_interrupt_gives_the_uninterrupted_model(
        hierarchical_run, out_dir):
    config = make_config(out_dir, "hier-b", *HIERARCHICAL)
    run_dir = out_dir / "hier-b"
    stop = StageInterrupt(at=0)
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(stop,))
    assert stop.seen == [("root", None, False), ("child", 0, False)]
    saved = load_checkpoint(run_dir / "checkpoint.pt")  # written once the root was fitted
    assert saved.model.n_components == 2 and saved.trainer_state["finished"] is False
    assert not (run_dir / "metrics.json").exists()
    after = StageInterrupt(at=None)
    resumed = workflow.train(None, resume=run_dir, figures=False, callbacks=(after,))
    assert after.seen == [("root", None, True), ("child", 0, True), ("child", 1, False),
                          ("final", None, False)]
    assert_same_parameters(resumed.model, hierarchical_run.model)
    assert resumed.metrics["test_log_likelihood"] == (
        hierarchical_run.metrics["test_log_likelihood"])
    # A resume may change the progress bars, not what the stages compute.
    workflow.train(None, resume=run_dir, figures=False,
                   overrides=["train.hierarchical.child_em.progress=true"])
    with pytest.raises(ValueError, match="cannot change train.hierarchical.rows_per_component"):
        workflow.train(None, resume=run_dir, overrides=[
            "train.hierarchical.rows_per_component=30"])
    # safe for an EM run, not for the finished stages of a hierarchical one
    with pytest.raises(ValueError, match="cannot change train.em.max_iter when resuming a "
                                         "hierarchical run"):
        workflow.train(None, resume=run_dir, overrides=["train.em.max_iter=9"])


@pytest.mark.slow
def test_em_resume_may_run_longer_and_records_the_change(out_dir):
    """A safe change on resume is applied (not ignored): interrupted at 2 of 4 iterations and
    resumed with max_iter=5 gives the model of an uninterrupted 5-iteration run."""
    longer = workflow.train(make_config(out_dir, "em-5", "train.em.max_iter=5"), figures=False)
    config = make_config(out_dir, "em-2-then-5")
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(Interrupt("iteration", 2),))
    run_dir = Path(config.output.dir) / config.output.name
    resumed = workflow.train(None, resume=run_dir, figures=False,
                             overrides=["train.em.max_iter=5", "output.n_samples=4"])
    assert resumed.metrics["iterations"] == 5
    assert_same_parameters(resumed.model, longer.model)
    saved = load_config(run_dir / "config.yaml")
    assert (saved.train.em.max_iter, saved.output.n_samples) == (5, 4)
    assert load_checkpoint(run_dir / "checkpoint.pt").run_config == saved
    assert "train.em.max_iter, output.n_samples" in (run_dir / "train.log").read_text()


def test_a_resume_stopped_at_its_first_save_keeps_its_change(out_dir, monkeypatch):
    """A resume with new values wrote config.yaml before training; stopped before its first
    checkpoint, the run then finished under the checkpoint's values while config.yaml named
    others. Then config.yaml came after the checkpoint, and a kill between the two left a
    config.yaml that a plain --resume (which reads it) took as an edit undoing the change.
    Now config.yaml is written first, with the first checkpoint that uses it: the change
    survives, and the two agree at the end. train_seconds adds up the run's sessions (it
    held the last session's time alone)."""
    config = make_config(out_dir, "config-sync")
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(Interrupt("iteration", 2),))
    run_dir = Path(config.output.dir) / config.output.name
    first = load_checkpoint(run_dir / "checkpoint.pt").metrics["train_seconds"]
    assert first > 0

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(workflow, "save_checkpoint", stopped)  # killed at the first save
        with pytest.raises(KeyboardInterrupt):
            workflow.train(None, resume=run_dir, figures=False,
                           overrides=[f"train.em.max_iter={EM_ITERATIONS + 2}"])
    assert load_checkpoint(run_dir / "checkpoint.pt").run_config.train.em.max_iter == (
        EM_ITERATIONS)
    assert load_config(run_dir / "config.yaml").train.em.max_iter == EM_ITERATIONS + 2
    finished = workflow.train(None, resume=run_dir, figures=False)
    assert finished.metrics["iterations"] == EM_ITERATIONS + 2
    assert load_config(run_dir / "config.yaml") == load_checkpoint(
        run_dir / "checkpoint.pt").run_config
    assert finished.metrics["train_seconds"] > first


def test_sgd_epochs_change_on_resume_only_where_it_continues_the_same_run(out_dir):
    # A finished run returned its best epoch; cosine (the config's schedule) is laid out over
    # the saved epochs: both would give another model than an uninterrupted longer run.
    finished = workflow.train(make_config(out_dir, "sgd-done", "train.method=sgd"),
                              figures=False)
    before = (finished.run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="train.sgd.epochs when resuming: this run's Adam has"):
        workflow.train(None, resume=finished.run_dir, figures=False,
                       overrides=[f"train.sgd.epochs={SGD_EPOCHS + 2}"])
    assert (finished.run_dir / "checkpoint.pt").read_bytes() == before
    config = make_config(out_dir, "sgd-cut", "train.method=sgd")
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(Interrupt("epoch", 1),))
    run_dir = Path(config.output.dir) / config.output.name
    with pytest.raises(ValueError, match="train.sgd.schedule='cosine'"):
        workflow.train(None, resume=run_dir, figures=False,
                       overrides=[f"train.sgd.epochs={SGD_EPOCHS + 2}"])
    # a constant learning rate: the longer resumed run is the uninterrupted longer run
    constant = ["train.method=sgd", "train.sgd.schedule=constant"]
    longer = workflow.train(make_config(out_dir, "sgd-long", *constant,
                                        f"train.sgd.epochs={SGD_EPOCHS + 2}"), figures=False)
    config = make_config(out_dir, "sgd-cut-constant", *constant)
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(Interrupt("epoch", 1),))
    resumed = workflow.train(None, resume=Path(config.output.dir) / config.output.name,
                             figures=False, overrides=[f"train.sgd.epochs={SGD_EPOCHS + 2}"])
    assert_same_parameters(resumed.model, longer.model)


@pytest.mark.parametrize("override, key", [
    ("model.n_components=4", "model.n_components"),
    ("train.em.tol=0.5", "train.em.tol"),
    ("train.em.init=random", "train.em.init"),  # (train.sgd.lr: refused as unused, below)
    ("data.limit=200", "data.limit"),
    # the seeded split: rows would move between train, val and test (val and test would
    # hold images the first part of the fit trained on)
    ("data.val_fraction=0.3", "data.val_fraction"),
    ("data.test_fraction=0.2", "data.test_fraction"),
    ("data.seed=5", "data.seed"),
    ("seed=3", "seed"),
])
def test_resume_refuses_changes_to_what_the_run_computes(em_run, override, key):
    before = (em_run.run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=rf"cannot change {re.escape(key)} when resuming.*"
                                         "would change what the run computes"):
        workflow.train(None, resume=em_run.run_dir, overrides=[override], figures=False)
    assert (em_run.run_dir / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("override", ["output.name=elsewhere", "output.dir=/elsewhere"])
def test_resume_refuses_another_folder_for_the_right_reason(em_run, override):
    """It said a new folder name "would change what the run computes", which is false."""
    before = (em_run.run_dir / "checkpoint.pt").read_bytes()
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"cannot change {re.escape(key)} when resuming.*"
                                         "continues in the folder given to --resume") as error:
        workflow.train(None, resume=em_run.run_dir, overrides=[override], figures=False)
    assert "computes" not in str(error.value)
    assert (em_run.run_dir / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("override", ["train.sgd.epochs=50", "train.sgd.progress=true",
                                      "train.hierarchical.root_em.progress=true",
                                      "train.sgd.lr=0.3", "train.hierarchical.seed=3"])
def test_resume_refuses_settings_of_a_trainer_the_run_does_not_use(em_run, override):
    """They were accepted, logged as new values and saved in config.yaml, and did nothing.
    Those that are not resume-safe were refused as "it would change what the run computes",
    which EM never reading train.sgd.* contradicts."""
    before = (em_run.run_dir / "checkpoint.pt").read_bytes()
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"cannot change {re.escape(key)} when resuming: this "
                                         r"run trains with train.method=em, which reads "
                                         r"train.em.\* only"):
        workflow.train(None, resume=em_run.run_dir, overrides=[override], figures=False)
    assert (em_run.run_dir / "checkpoint.pt").read_bytes() == before


def test_resume_of_a_checkpoint_without_trainer_state_or_of_another_model_is_refused(
        em_run, tmp_path):
    """A checkpoint holding a model and its run config but no trainer state was 'resumed' by
    a fresh K-means start that overwrote it, silently; one whose model disagrees with its
    run config (K, L, noise) trained the model the config did not describe."""
    saved = load_checkpoint(em_run.run_dir / "checkpoint.pt")
    run_dir = tmp_path / "model-only"
    run_dir.mkdir()
    save_config(saved.run_config, run_dir / "config.yaml")
    save_checkpoint(run_dir / "checkpoint.pt", saved.model, run_config=saved.run_config)
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="holds no trainer state .* nothing to resume"):
        workflow.train(None, resume=run_dir, figures=False)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    other = MixtureOfFactorAnalyzers(5, saved.model.n_features, 2)
    save_checkpoint(run_dir / "checkpoint.pt", other, run_config=saved.run_config,
                    trainer_state=saved.trainer_state, metrics=saved.metrics)
    with pytest.raises(CheckpointError, match=r"holds a model with \(K, L, noise\) = \(5, 2, "
                                              r"'diagonal'\), but its run config says"):
        workflow.train(None, resume=run_dir, figures=False)


def test_resume_of_a_checkpoint_file_outside_its_run_folder_is_refused(em_run, tmp_path):
    # it would write checkpoint.pt, metrics.json, ... beside it, over another run's files
    (tmp_path / "mine.pt").write_bytes((em_run.run_dir / "checkpoint.pt").read_bytes())
    (tmp_path / "metrics.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="--resume takes a run folder"):
        workflow.train(None, resume=tmp_path / "mine.pt", figures=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "mine.pt"]
    assert (tmp_path / "metrics.json").read_text() == '{"mine": 1}'


def test_resume_with_a_config_checks_it_against_the_saved_one(em_run, out_dir):
    other = make_config(out_dir, "em-a", "model.n_factors=1")
    with pytest.raises(ValueError, match=r"cannot change model\.n_factors when resuming.*"
                                         r"saved 2, given 1"):
        workflow.train(other, resume=em_run.run_dir, figures=False)
    same = make_config(out_dir, "em-a", "output.plot=false")  # a safe difference
    assert run_folder.check_resume_changes(load_checkpoint(em_run.run_dir / "checkpoint.pt")
                                         .run_config, same) == ["output.plot"]
    # a stage given on one side and null (train.em) on the other: compared as train.em
    saved = make_config(out_dir, "h", "train.method=hierarchical",
                        "train.hierarchical.child_em={max_iter: 1}")
    reset = apply_overrides(saved, ["train.hierarchical.child_em=null"])
    run_em = saved.train.em.max_iter
    for a, b, given in ((saved, reset, run_em), (reset, saved, 1)):
        with pytest.raises(ValueError, match=r"cannot change train\.hierarchical\.child_em\."
                                             rf"max_iter when resuming .*given {given}\)"):
            run_folder.check_resume_changes(a, b)
    # a stage that sets only a resume-safe key over a null one changes only that key (it was
    # refused, naming max_iter: the stage took EMConfig's class defaults)
    quiet = apply_overrides(reset, ["train.hierarchical.child_em.progress=true"])
    assert quiet.train.hierarchical.child_em == dataclasses.replace(reset.train.em,
                                                                    progress=True)
    assert run_folder.check_resume_changes(reset, quiet) == ["train.hierarchical.child_em.progress"]


def test_a_resume_may_change_the_device_and_reads_its_spellings_alike():
    """A run trained on CUDA could not be resumed without CUDA: the error advised
    device=cpu, which a resume then refused ("cannot change device"), and cuda:0 was a
    change from cuda. The trainers' own resume checks allow a device change too."""
    from types import SimpleNamespace

    from mfa.em_state import RESUMABLE as EM_RESUMABLE
    from mfa.resume_rules import device_change_note
    from mfa.run_folder import check_can_extend
    from mfa.sgd_config import RESUMABLE as SGD_RESUMABLE

    assert "device" in EM_RESUMABLE and "device" in SGD_RESUMABLE
    saved = load_config(overrides=["device=cuda", "train.em.device=cuda:1"])
    alike = apply_overrides(saved, ["device=cuda:0", "train.em.device=cuda:1"])
    assert run_folder.check_resume_changes(saved, alike) == []
    assert device_change_note(saved, alike, []) is None
    moved = apply_overrides(saved, ["device=cpu", "train.em.device=null"])
    changed = run_folder.check_resume_changes(saved, moved)
    assert sorted(changed) == ["device", "train.em.device"]
    note = device_change_note(saved, moved, changed)
    assert "device='cpu' (saved 'cuda')" in note and "differ" in note and "rounding" in note
    for method in ("em", "sgd", "hierarchical"):  # and no trainer's rule refuses it
        base = apply_overrides(saved, [f"train.method={method}"])
        keys = ["device", f"train.{'sgd' if method == 'sgd' else 'em'}.device"]
        if method == "hierarchical":
            keys.append("train.hierarchical.final_em.device")
        check_can_extend(SimpleNamespace(run_config=base, trainer_state={}),
                         apply_overrides(base, ["device=cpu"]), keys)


def test_max_iter_below_the_iterations_done_is_refused_on_resume():
    from types import SimpleNamespace

    from mfa.run_folder import check_can_extend

    saved = load_config(overrides=["train.em.n_init=1"])
    ckpt = SimpleNamespace(run_config=saved, trainer_state={"run": 0, "iteration": 7})
    with pytest.raises(ValueError, match=r"cannot lower train\.em\.max_iter to 2 .* already "
                                         r"done 7 iterations"):
        check_can_extend(ckpt, apply_overrides(saved, ["train.em.max_iter=2"]),
                         ["train.em.max_iter"])
    check_can_extend(ckpt, apply_overrides(saved, ["train.em.max_iter=7"]),
                     ["train.em.max_iter"])


@pytest.mark.parametrize("run,iteration,refusal", [
    (0, 2, None),  # mid first run
    # mid a re-seeding round (n_init = 1) or the last one (reseed_rounds = 3): the first
    # restart ran under the saved max_iter, so the saved config would no longer describe
    # the fit (allowed before 2026-12)
    (1, 3, "earlier ones ran with max_iter=100"),
    (3, 1, "earlier ones ran with max_iter=100"),
    (1, 0, "EM has finished"),  # done without rounds (no early stopping)
    (4, 0, "EM has finished"),  # done after every round
    (4, 2, "EM has finished"),  # done: a round did not pay (the fit stopped mid-count)
])
def test_max_iter_may_change_on_resume_only_in_the_first_restart(run, iteration, refusal):
    from types import SimpleNamespace

    from mfa.run_folder import check_can_extend

    saved = load_config(overrides=["train.em.n_init=1", "train.em.reseed_rounds=3",
                                   "train.em.max_iter=100"])
    ckpt = SimpleNamespace(run_config=saved,
                           trainer_state={"run": run, "iteration": iteration})
    config = apply_overrides(saved, ["train.em.max_iter=60"])
    if refusal:
        with pytest.raises(ValueError, match=rf"train\.em\.max_iter.*{refusal}"):
            check_can_extend(ckpt, config, ["train.em.max_iter"])
    else:
        check_can_extend(ckpt, config, ["train.em.max_iter"])


@pytest.mark.parametrize("method, key, state", [
    ("em", "train.em.max_iter", {"run": 1, "iteration": 0}),
    ("sgd", "train.sgd.epochs", {"epoch": 5, "stopped": True}),
])
@pytest.mark.parametrize("name", [None, "named"])
def test_the_new_run_advice_of_a_finished_run_works_for_a_named_run(method, key, state, name):
    """A finished run refuses more iterations/epochs and advises a new run from its config;
    the saved config keeps output.name, whose folder exists, so the advice names another
    (following it was refused again)."""
    from types import SimpleNamespace

    from mfa.run_folder import check_can_extend

    saved = load_config(overrides=[f"train.method={method}", "train.em.n_init=1",
                                   "train.em.reseed_rounds=0", "train.sgd.epochs=5",
                                   *([f"output.name={name}"] if name else [])])
    ckpt = SimpleNamespace(run_config=saved, trainer_state=state)
    with pytest.raises(ValueError, match=r"start a new run \(e\.g\. --config RUN/config\.yaml "
                                         rf"--set {key}=\.\.\.") as error:
        check_can_extend(ckpt, apply_overrides(saved, [f"{key}=9"]), [key])
    assert ("--set output.name=named-2" in str(error.value)) == (name is not None)


def test_lowering_adam_epochs_below_those_done_is_refused_on_resume():
    from types import SimpleNamespace

    from mfa.run_folder import check_can_extend

    saved = load_config(overrides=["train.method=sgd", "train.sgd.epochs=5",
                                   "train.sgd.schedule=constant"])
    ckpt = SimpleNamespace(run_config=saved, trainer_state={"epoch": 3, "stopped": False})
    with pytest.raises(ValueError, match=r"cannot lower train\.sgd\.epochs to 2 .* already "
                                         r"done 3 epochs"):
        check_can_extend(ckpt, apply_overrides(saved, ["train.sgd.epochs=2"]),
                         ["train.sgd.epochs"])
    check_can_extend(ckpt, apply_overrides(saved, ["train.sgd.epochs=4"]), ["train.sgd.epochs"])


def test_a_finished_em_run_refuses_more_iterations(em_run):
    with pytest.raises(ValueError, match=r"train\.em\.max_iter.*EM has finished"):
        workflow.train(None, resume=em_run.run_dir, overrides=["train.em.max_iter=40"],
                       figures=False)


# ---------------------------------------------------------------------------- before the folder


@pytest.mark.parametrize("overrides, error, match", [
    (["model.n_factors=1000"], ValueError,
     r"model\.n_factors=1000\) does not fit the data embedded-mnist with 784 features"),
    # (K-means failed after the folder was announced, then made and removed)
    # (it said "its initialisation gets 300 training images", not what to change)
    (["model.n_components=500", "data.limit=300"], ValueError,
     r"model\.n_components=500, .* K must be at most the training images its initialisation "
     r"reads, the training split's 300 \(data\.limit=300\): lower model\.n_components or "
     r"raise data\.limit"),
    (["model.n_components=50", "train.em.init_samples=40"], ValueError,
     r"initialisation reads, train\.em\.init_samples=40 of 300: lower model\.n_components "
     r"or raise train\.em\.init_samples"),
    (["model.n_components=50", "train.method=sgd", "train.sgd.init_samples=40"], ValueError,
     r"train\.sgd\.init_samples=40 of 300: .* raise train\.sgd\.init_samples"),
    # raising init_samples cannot help above the training images, nor data.limit where it
    # does not bind (the embedded digits' train split has 4,000)
    (["model.n_components=500", "data.limit=300", "train.em.init_samples=40"], ValueError,
     r"the training split's 300 \(data\.limit=300\): lower model\.n_components or raise "
     r"data\.limit$"),
    (["model.n_components=4200", "data.limit=4500"], ValueError,
     r"the training split's 4000 \(data\.limit=4500\): lower model\.n_components or train "
     r"on more images$"),
    (["data.name=folder", "data.root=/nonexistent/images"], OSError, r"/nonexistent/images"),
    (["device=cuda"], ValueError, r"device 'cuda' asks for CUDA"),
    (["train.em.device=cuda:0"], ValueError, r"train\.em\.device: device 'cuda:0' asks for"),
    # (its advice was device=auto, which a trainer's device refuses)
    (["train.em.device=cuda"], ValueError, r"train\.em\.device: .* no CUDA device; use "
     r"train\.em\.device=null \(the run's device\) or train\.em\.device=cpu$"),
    # a hierarchical run's stages: the child's failed after the root's fit, leaving a folder
    # whose resume refused the corrected device
    (["train.method=hierarchical", "train.hierarchical.child_em={device: cuda}"], ValueError,
     r"train\.hierarchical\.child_em\.device: device 'cuda' asks for .*; use "
     r"train\.hierarchical\.child_em\.device=null \(the run's device\) or"),
    (["train.method=hierarchical", "train.em.device=cuda"], ValueError,
     r"train\.hierarchical\.root_em\.device: device 'cuda' asks for"),
    (["train.method=hierarchical", "train.hierarchical.final_em={device: cuda}"], ValueError,
     r"train\.hierarchical\.final_em\.device: device 'cuda' asks for"),
])
def test_values_that_fail_with_the_data_fail_before_the_run_folder(
        tmp_path, monkeypatch, overrides, error, match):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(error, match=match):
        workflow.train(make_config(tmp_path / "runs", "x", *overrides), figures=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


class Fail:
    """A callback that raises RuntimeError at iteration ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, trainer, model, record) -> None:
        if record["iteration"] == self.at:
            raise RuntimeError("simulated failure")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    config = make_config(tmp_path, "early", "train.em.checkpoint_every=0")
    with pytest.raises(RuntimeError, match="simulated failure"):
        workflow.train(config, figures=False, callbacks=(Fail(1),))
    assert not (tmp_path / "early").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_after_a_checkpoint_is_marked_failed_until_resumed(em_run, tmp_path):
    config = make_config(tmp_path, "late")
    with pytest.raises(RuntimeError, match="simulated failure"):
        workflow.train(config, figures=False, callbacks=(Fail(2),))
    run_dir = tmp_path / "late"
    assert "RuntimeError: simulated failure" in (run_dir / "FAILED").read_text()
    assert "--resume" in (run_dir / "FAILED").read_text()
    resumed = workflow.train(None, resume=run_dir, figures=False)
    assert not (run_dir / "FAILED").exists()
    assert_same_parameters(resumed.model, em_run.model)


def test_a_failed_run_that_cannot_be_marked_reports_its_own_error(tmp_path, monkeypatch,
                                                                   caplog):
    """A run whose FAILED marker could not be written (a read-only folder, a full disk)
    ended with that write's PermissionError, and its train.log held nothing of the error
    that FAILED would have said to look up there."""
    real_write_text = Path.write_text

    def read_only(self, *args, **kwargs):
        if "FAILED" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with caplog.at_level("WARNING", logger="mfa"), pytest.raises(
            RuntimeError, match="simulated failure"):
        workflow.train(make_config(tmp_path, "ro"), figures=False, callbacks=(Fail(2),))
    run_dir = tmp_path / "ro"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt",
                                                         "config.yaml", "train.log"]
    assert re.search(rf"cannot clean up or mark the failed run {re.escape(str(run_dir))}: "
                     r".*FAILED.*Permission denied", caplog.text)
    log = (run_dir / "train.log").read_text()
    assert "ERROR mfa: the run failed: RuntimeError: simulated failure" in log
    assert "Traceback" in log  # (the console gets the message only)
    assert "simulated failure" not in caplog.text  # (the CLI prints it: not twice)


# ---------------------------------------------------------------------------- kill -9


def _mfa(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mfa", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_of_mfa_train_with_the_default_config_then_resume(tmp_path):
    """`mfa train` with the default config (no --config: its checkpoint settings), killed with
    SIGKILL mid-run, resumes to exactly the model of an uninterrupted run."""
    iterations = 40
    short = ["model.n_components=4", "model.n_factors=2", f"train.em.max_iter={iterations}",
             "train.em.tol=0", "train.em.kmeans_iter=3", "train.em.progress=false",
             "data.limit=1000", "device=cpu", f"output.dir={tmp_path}"]
    sets = [arg for o in short for arg in ("--set", o)]
    whole = _mfa(*sets, "--set", "output.name=whole", "--no-figures")
    killed = _mfa(*sets, "--set", "output.name=killed", "--no-figures")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert killed.poll() is None, killed.communicate()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "metrics.json").exists()  # killed mid-run
    done = load_checkpoint(checkpoint).trainer_state["history"]
    resume = _mfa("--resume", str(tmp_path / "killed"), "--no-figures")
    for process in (whole, resume):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert_same_parameters(b.model, a.model)
    assert history_values(b.trainer_state["history"]) == history_values(
        a.trainer_state["history"])
    # The kill came mid-run: the uninterrupted run (which may stop early on validation, as
    # the default config does) went further than the killed one had.
    assert 1 <= len(done) < len(a.trainer_state["history"]) <= iterations


def test_resume_reads_the_run_folders_config_yaml(out_dir):
    """An edited config.yaml was ignored by --resume without a word and left disagreeing
    with the checkpoint: its edits now count as a --config's (a safe one is applied and
    saved with the checkpoint, another refused naming the file and the key)."""
    run_dir = out_dir / "yaml-edit"
    with pytest.raises(KeyboardInterrupt):
        workflow.train(make_config(out_dir, "yaml-edit"), figures=False,
                       callbacks=(Interrupt("iteration", 2),))
    text = (run_dir / "config.yaml").read_text()
    assert "n_components: 3" in text and f"max_iter: {EM_ITERATIONS}" in text
    (run_dir / "config.yaml").write_text(text.replace("n_components: 3", "n_components: 5"))
    with pytest.raises(ValueError, match=r"yaml-edit/config\.yaml: cannot change "
                                         r"model\.n_components .*saved 3, given 5.*differs from "
                                         r"the checkpoint's config"):
        workflow.train(None, resume=run_dir, figures=False)
    (run_dir / "config.yaml").write_text(text.replace(f"max_iter: {EM_ITERATIONS}",
                                                      f"max_iter: {EM_ITERATIONS + 2}"))
    resumed = workflow.train(None, resume=run_dir, figures=False)
    assert resumed.metrics["iterations"] == EM_ITERATIONS + 2
    saved = load_checkpoint(run_dir / "checkpoint.pt").run_config
    assert saved.train.em.max_iter == EM_ITERATIONS + 2
    assert load_config(run_dir / "config.yaml") == saved


def test_a_resume_names_the_folders_config_yaml_as_the_cause_with_a_set_too(out_dir):
    """With any --set (a safe one) an unsafe edit of config.yaml was blamed on a key the
    user never passed ("cannot change model.n_components ... (saved 3, given 5)"), without
    naming the file: only a config equal to the file's was taken for the file's."""
    run_dir = out_dir / "yaml-edit-set"
    with pytest.raises(KeyboardInterrupt):
        workflow.train(make_config(out_dir, "yaml-edit-set"), figures=False,
                       callbacks=(Interrupt("iteration", 2),))
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("n_components: 3", "n_components: 5"))
    with pytest.raises(ValueError, match=r"yaml-edit-set/config\.yaml: cannot change "
                                         r"model\.n_components .*saved 3, given 5.*differs from "
                                         r"the checkpoint's config"):
        workflow.train(None, resume=run_dir, figures=False,
                       overrides=[f"train.em.max_iter={EM_ITERATIONS + 1}"])
    # a --set that undoes the file's edit and makes one of its own: the --set's is refused
    # (the file was blamed for the key the --set had put back)
    with pytest.raises(ValueError, match=r"^cannot change model\.n_factors .*saved 2, "
                                         r"given 3\)"):
        workflow.train(None, resume=run_dir, figures=False,
                       overrides=["model.n_components=3", "model.n_factors=3"])
    (run_dir / "config.yaml").write_text(text)  # the file agrees: a --set is the cause
    with pytest.raises(ValueError, match=r"^cannot change model\.n_factors .*saved 2, "
                                         r"given 3\)"):
        workflow.train(None, resume=run_dir, figures=False, overrides=["model.n_factors=3"])


def test_an_empty_config_yaml_resumes_with_the_checkpoints_config(out_dir, caplog):
    """An empty config.yaml (cut off by a crash) was read as all defaults and refused as a
    change of every key ("cannot change model.n_components (saved 3, given 20)"). The
    checkpoint holds the config: the resume takes it, as where the file is gone, and writes
    the file again. Without a checkpoint nothing holds it: refused, not started over from
    the defaults."""
    run_dir = out_dir / "yaml-empty"
    with pytest.raises(KeyboardInterrupt):
        workflow.train(make_config(out_dir, "yaml-empty"), figures=False,
                       callbacks=(Interrupt("iteration", 2),))
    (run_dir / "config.yaml").write_text("")
    with caplog.at_level("WARNING", logger="mfa"):
        resumed = workflow.train(None, resume=run_dir, figures=False)
    assert re.search(rf"{re.escape(str(run_dir / 'config.yaml'))} is empty \(damaged.*"
                     r"resuming with the run's config that .*checkpoint\.pt holds", caplog.text)
    assert resumed.metrics["iterations"] == EM_ITERATIONS
    saved = load_checkpoint(run_dir / "checkpoint.pt").run_config
    assert load_config(run_dir / "config.yaml") == saved
    # A file of comments is the user's, not damaged: read as written (defaults here, so
    # refused, naming it) and kept (it was overwritten, the notes lost)
    (run_dir / "config.yaml").write_text("# notes: try L=8 next\n")
    with pytest.raises(ValueError, match=r"config\.yaml: cannot change"):
        workflow.train(None, resume=run_dir, figures=False,
                       overrides=["train.em.max_iter=" + str(EM_ITERATIONS + 1)])
    assert (run_dir / "config.yaml").read_text() == "# notes: try L=8 next\n"
    unstarted = out_dir / "yaml-empty-unstarted"
    unstarted.mkdir()
    (unstarted / ".lock").write_text("")  # (taken before config.yaml is written)
    (unstarted / "config.yaml").write_text("\n")
    with pytest.raises(ValueError, match=r"yaml-empty-unstarted/config\.yaml is empty "
                                         r"\(damaged.*holds no checkpoint\.pt: nothing holds"):
        workflow.train(None, resume=unstarted, figures=False,
                       overrides=["train.em.max_iter=1"])
    assert sorted(p.name for p in unstarted.iterdir()) == [".lock", "config.yaml"]


def test_a_run_folder_in_use_is_refused(em_run, out_dir):
    """Two `mfa train` of one folder (a --resume of a run still training) wrote its
    checkpoint, metrics and config.yaml in turn and left them disagreeing."""
    run_dir = out_dir / "in-use"
    with pytest.raises(KeyboardInterrupt):
        workflow.train(make_config(out_dir, "in-use"), figures=False,
                       callbacks=(Interrupt("iteration", 2),))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with run_folder.hold_run_folder(run_dir):  # as the training process holds it
        with pytest.raises(run_folder.RunFolderInUse,
                           match=rf"{re.escape(str(run_dir))} is in use by `mfa "
                                 rf"train` \(pid {os.getpid()}\)"):
            workflow.train(None, resume=run_dir, figures=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # no FAILED either
    resumed = workflow.train(None, resume=run_dir, figures=False)  # released: it runs
    assert_same_parameters(resumed.model, em_run.model)


def test_a_held_run_folder_is_refused_before_it_is_read(em_run, out_dir):
    """The lock was taken after the resume had read the checkpoint and loaded the data: a
    run that finished meanwhile was continued from its stale checkpoint. Now a held folder
    is refused first, whatever its checkpoint would say (a finished run's own refusal)."""
    with run_folder.hold_run_folder(em_run.run_dir):
        with pytest.raises(run_folder.RunFolderInUse):
            workflow.train(None, resume=em_run.run_dir, figures=False,
                           overrides=["train.em.max_iter=9"])
    with pytest.raises(ValueError, match=r"this run's EM has finished"):
        workflow.train(None, resume=em_run.run_dir, figures=False,
                       overrides=["train.em.max_iter=9"])


def test_resuming_a_folder_that_is_no_run_leaves_it_as_it_was(tmp_path):
    """It was refused, but only after a .lock file had been made in the user's folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt does not exist"):
        workflow.train(None, resume=folder, figures=False)
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(out_dir, monkeypatch,
                                                                     caplog):
    """flock's ENOLCK (some network mounts) aborted `mfa train` and left a stray folder."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="mfa.folder_lock"):
        run = workflow.train(make_config(out_dir, "no-locks"), figures=False)
    assert (run.run_dir / "metrics.json").exists()
    assert "cannot lock" in caplog.text and "would not be refused" in caplog.text


def test_a_new_runs_figures_keep_files_written_into_its_folder_during_training(out_dir):
    """`mfa sample RUN` during training wrote samples.png; the new run's own figures then
    replaced it (only a resumed run kept such files)."""
    config = make_config(out_dir, "figures-meanwhile", "output.n_samples=4",
                         "output.n_inpaint=0")
    theirs = b"what mfa sample wrote"

    def sample_meanwhile(trainer, model, record):
        target = out_dir / "figures-meanwhile" / "samples.png"
        if not target.exists():
            target.write_bytes(theirs)

    result = workflow.train(config, callbacks=(sample_meanwhile,))
    assert (result.run_dir / "samples.png").read_bytes() == theirs
    assert (result.run_dir / "samples-2.png").stat().st_size > 0


def test_a_run_killed_while_writing_its_first_checkpoint_starts_over(em_run, out_dir):
    """kill -9 during the first checkpoint's write leaves its temporary beside config.yaml:
    that counted as a result, and --resume refused to start the run over as documented."""
    run_dir = out_dir / "killed-mid-save"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("")  # (taken before config.yaml is written)
    save_config(make_config(out_dir, "killed-mid-save"), run_dir / "config.yaml")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has exited: the writer is gone
    temporary = run_dir / f".checkpoint.pt.{gone.pid}.deadbeef.tmp"
    temporary.write_bytes(b"")
    resumed = workflow.train(None, resume=run_dir, figures=False)
    assert_same_parameters(resumed.model, em_run.model)
    assert not temporary.exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(em_run, out_dir):
    """A run folder holding only config.yaml and train.log (its process was killed before the
    first checkpoint, so nothing was cleaned up): --resume starts the run over there from the
    saved config, to the uninterrupted run's model (it used to fail with "checkpoint ...
    does not exist", and a new run of that name with "File exists")."""
    run_dir = out_dir / "killed-early"
    run_dir.mkdir()
    save_config(make_config(out_dir, "killed-early"), run_dir / "config.yaml")
    (run_dir / "train.log").write_text("started\n")
    resumed = workflow.train(None, resume=run_dir, figures=False)
    assert resumed.run_dir == run_dir
    assert_same_parameters(resumed.model, em_run.model)
    assert resumed.metrics["test_log_likelihood"] == em_run.metrics["test_log_likelihood"]
    log = (run_dir / "train.log").read_text()
    assert log.startswith("started") and "starting the run over from its config" in log
    # a finished run whose checkpoint was moved away is not started over (it replaced its
    # metrics, history and figures)
    (run_dir / "checkpoint.pt").rename(out_dir / "moved.pt")
    metrics = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"holds no checkpoint.pt but holds results \(.*"
                                         r"metrics.json.*\): resuming would start the run over"):
        workflow.train(None, resume=run_dir, figures=False)
    assert (run_dir / "metrics.json").read_bytes() == metrics
    (out_dir / "moved.pt").rename(run_dir / "checkpoint.pt")
    # the same rules as any resume: a change to what the run computes, or to where it
    # lives, is refused
    other = out_dir / "killed-early-2"
    other.mkdir()
    (other / ".lock").write_text("")
    save_config(make_config(out_dir, "killed-early-2"), other / "config.yaml")
    for change in ("model.n_components=4", f"output.dir={out_dir / 'elsewhere'}"):
        with pytest.raises(ValueError, match=change.split("=")[0].replace(".", r"\.")):
            workflow.train(None, resume=other, overrides=[change], figures=False)
    # a new run under that name is refused with a message that says what to do
    with pytest.raises(FileExistsError, match=r"already exists: choose another output\.name, "
                                              r"remove it, or continue it with `mfa train "
                                              r"--resume"):
        workflow.train(make_config(out_dir, "killed-early"), figures=False)


# ---------------------------------------------------------------------------- run folders


def test_run_folders_are_numbered(tmp_path):
    config = load_config(overrides=[f"output.dir={tmp_path / 'runs'}"])
    first = workflow.make_run_dir(config)
    second = workflow.make_run_dir(config)
    assert first.name == "001-embedded-mnist" and first.is_dir()
    assert second.name == "002-embedded-mnist"
    (tmp_path / "runs" / "017-mnist").mkdir()
    assert workflow.make_run_dir(config).name == "018-embedded-mnist"


def test_output_dir_expands_the_home_folder(tmp_path, monkeypatch):
    """``output.dir=~/runs`` made a folder literally named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run_dir = workflow.make_run_dir(load_config(overrides=["output.dir=~/runs"]))
    assert run_dir == tmp_path / "home" / "runs" / "001-embedded-mnist" and run_dir.is_dir()
    assert not (tmp_path / "~").exists()


def test_named_run_folder(tmp_path):
    config = load_config(overrides=[f"output.dir={tmp_path}", "output.name=exp"])
    assert workflow.make_run_dir(config) == tmp_path / "exp"
    with pytest.raises(FileExistsError):
        workflow.make_run_dir(config)
    assert workflow.make_run_dir(config, exist_ok=True) == tmp_path / "exp"




def test_large_sets_train_adam_on_uint8_rows_with_the_same_result(out_dir, monkeypatch):
    """Above STREAM_ABOVE values Adam gets the uint8 pixels as QuantizedRows (no float copy
    of the set); with pixel/255 values its batches, and so its model, are the float path's."""
    from mfa.data import ImageData
    reference = workflow.train(make_config(out_dir, "sgd-float", "train.method=sgd"),
                               figures=False)
    calls = []
    quantized = ImageData.quantized

    def spy(self, split, **kwargs):
        calls.append(split)
        return quantized(self, split, **kwargs)

    monkeypatch.setattr(ImageData, "quantized", spy)
    monkeypatch.setattr(workflow, "STREAM_ABOVE", 0)
    run = workflow.train(make_config(out_dir, "sgd-uint8", "train.method=sgd"), figures=False)
    assert calls == ["val", "train"]
    assert_same_parameters(run.model, reference.model)


def test_ndb_reference_is_held_out_even_when_train_is_listed_first(em_run):
    """``splits=("train", "test")`` used the training images as NDB's "real held-out"
    reference (ndb_real 0 trivially, as they made the bins); it is the test split."""
    both = workflow.evaluate(em_run.run_dir, splits=("train", "test"), ndb_bins=5)
    test = workflow.evaluate(em_run.run_dir, splits=("test",), ndb_bins=5)
    assert both["ndb_reference"] == test["ndb_reference"] == "test"
    for key in ("ndb", "ndb_real", "ndb_js_real"):
        assert both[key] == test[key], key


@pytest.fixture(scope="module")
def dequantized_run(out_dir):
    """EM on dequantised pixels, 1,000 training images and 500 each in val and test."""
    return workflow.train(make_config(out_dir, "em-deq", "data.dequantize=true",
                                      "data.limit=1000"), figures=False)


@pytest.mark.parametrize("run", ["em_run", "dequantized_run"])
def test_ndb_of_evaluate_follows_the_documented_protocol(run, request):
    """Model samples clamped to the pixel range [0, 1] (docs/results.md's protocol), as many
    as the held-out images, against bins fitted once on the training images: evaluate binned
    them unclamped. (dequantized_run: 500 test images, 1,000 training ones; em_run's splits
    are of one size, so drawing as many samples as training images passed there.)"""
    from mfa.ndb import NDB

    run = request.getfixturevalue(run)
    got = workflow.evaluate(run.run_dir, ndb_bins=5, seed=3)
    data = workflow.load_data(load_checkpoint(run.run_dir / "checkpoint.pt").run_config)
    reference = data.as_float("test")
    samples, _ = run.model.sample(reference.shape[0],
                                  generator=torch.Generator().manual_seed(3))
    assert bool(((samples < 0) | (samples > 1)).any())  # the clamp has work to do
    bins = NDB.fit(data.train, 5, seed=3)
    want, real = bins.evaluate(samples.detach().clamp(0, 1)), bins.evaluate(reference)
    assert (got["ndb"], got["ndb_js"]) == (want.ndb, pytest.approx(want.js_divergence))
    assert (got["ndb_real"], got["ndb_js_real"]) == (real.ndb,
                                                      pytest.approx(real.js_divergence))


def test_evaluate_bits_per_dim_is_the_log_likelihood_per_pixel_in_bits(dequantized_run):
    """bits/dim = −log p(x)/(D ln 2) + log₂ 256 with D = 784 pixels (docs/results.md), from
    the mean log-likelihood evaluate returns beside it, for every split it scores."""
    got = workflow.evaluate(dequantized_run.run_dir, splits=("val", "test"))
    for split in ("val", "test"):
        ll = got[f"{split}_log_likelihood"]
        assert got[f"{split}_bits_per_dim"] == pytest.approx(-ll / (784 * math.log(2)) + 8,
                                                             rel=1e-12), split


def test_evaluate_checks_its_inputs_before_computing(em_run, monkeypatch):
    """--ndb-bins above the training images, or a dataset for --outliers-against that is not
    there, were found only after the held-out pass and two K-means fits."""
    def too_late(*args, **kwargs):
        raise AssertionError("computed before the inputs were checked")

    monkeypatch.setattr(workflow, "evaluate_model", too_late)
    with pytest.raises(ValueError, match=r"--ndb-bins 100000 must be between 1 and the \d+ "
                                         r"training images"):
        workflow.evaluate(em_run.run_dir, ndb_bins=100_000)
    with pytest.raises(DatasetNotFoundError, match=r"--against-set data\."):
        workflow.evaluate(em_run.run_dir, outliers_against="svhn",
                          against_overrides=["data.root=/nonexistent"])


def test_ndb_reference_falls_back_to_a_split_with_images(out_dir):
    """With an empty test split, --split train took "test" as the reference and failed
    after the held-out pass: "samples must have shape [N, D] with N >= 1, got (0, 784)"."""
    run = workflow.train(make_config(out_dir, "no-test", "data.test_fraction=0"),
                         figures=False)
    result = workflow.evaluate(run.run_dir, splits=("train",), ndb_bins=5)
    assert result["ndb_reference"] == "val" and 0 <= result["ndb"] <= 5
    run2 = workflow.train(make_config(out_dir, "no-held", "data.test_fraction=0",
                                      "data.val_fraction=0", "train.em.patience=0",
                                      "train.em.noise_prior_variance=0.001"), figures=False)
    with pytest.raises(ValueError, match=r"NDB needs real held-out images, but .* val and "
                                         r"test splits are empty"):
        workflow.evaluate(run2.run_dir, splits=("train",), ndb_bins=5)


def test_a_run_without_dequantisation_says_why_it_reports_no_bits_per_dim(em_run, caplog):
    """data.dequantize false: the bits/dim keys were left out of the metrics silently."""
    why = "no bits/dim: data.dequantize is false"
    assert "test_bits_per_dim" not in em_run.metrics
    assert why in (em_run.run_dir / "train.log").read_text()
    with caplog.at_level(logging.INFO, logger="mfa"):
        result = workflow.evaluate(em_run.run_dir)
    assert "test_bits_per_dim" not in result and why in caplog.text


def test_evaluate_refuses_a_config_that_re_splits_the_runs_data(em_run):
    """The CLI refused --set data.seed on a trained run; the library's evaluate(config=...)
    used it, and its "test" split then held training images, silently."""
    saved = load_checkpoint(em_run.run_dir / "checkpoint.pt").run_config
    for override in ("data.seed=1", "data.test_fraction=0.5"):
        with pytest.raises(ValueError, match=rf"data\.{override[5:].split('=')[0]} would "
                                             "change which images the run's splits hold"):
            workflow.evaluate(em_run.run_dir, config=apply_overrides(saved, [override]))
    same = workflow.evaluate(em_run.run_dir, config=apply_overrides(saved, ["data.limit=100"]))
    assert math.isfinite(same["test_log_likelihood"])


def test_a_relative_data_root_is_saved_resolved(tmp_path, monkeypatch):
    """A relative data.root was saved as typed: from another directory the run's config found
    nothing (or other files at that path)."""
    from mfa.run_folder import absolute_data_root

    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=["data.root=data/here"])
    assert absolute_data_root(config).data.root == str(tmp_path / "data" / "here")
    assert config.data.root == "data/here"  # a copy
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_data_root(load_config(overrides=["data.root=~/d"])).data.root == str(
        tmp_path / "home" / "d")
    unset = load_config()
    assert absolute_data_root(unset) is unset
    # output.mask_image likewise (a resume from another directory failed to find it)
    masked = load_config(overrides=["output.mask_image=masks/m.png"])
    assert absolute_data_root(masked).output.mask_image == str(tmp_path / "masks" / "m.png")


def test_a_new_run_trains_and_saves_with_its_data_root_resolved(tmp_path, monkeypatch):
    """workflow.train hands the resolved config on (it is the one saved in the folder)."""
    monkeypatch.chdir(tmp_path)
    seen = []

    def prepare(config, ckpt):
        seen.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(workflow, "_prepare", prepare)
    with pytest.raises(RuntimeError, match="stop after the config"):
        workflow.train(load_config(overrides=["data.root=rel", f"output.dir={tmp_path}"]))
    assert seen[0].data.root == str(tmp_path / "rel")


def test_figure_counts_below_one_and_a_string_of_scores_are_refused(em_run, data, tmp_path):
    """rank_outliers(n=-3) drew the N-3 most outlying images (order[:-3]); n=0 or nrow=0
    divided by zero; figures.inpaint(n=0) said the split was empty; outlier_metrics(scores=
    "complexity") took each character for a score name."""
    from mfa import figures
    from mfa.run_outliers import outlier_metrics, rank_outliers

    for bad in ({"n": -3}, {"n": 0}, {"nrow": 0}):
        with pytest.raises(ValueError, match=rf"{next(iter(bad))} must be >= 1"):
            rank_outliers(em_run.model, data, tmp_path, **bad)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match="n must be >= 1"):
        figures.inpaint(em_run.model, data, tmp_path / "i.png", n=0)
    with pytest.raises(TypeError, match=r"scores must be a sequence of score names, got the "
                                        r"string 'complexity'; pass \['complexity'\]"):
        outlier_metrics(em_run.model, data, data, scores="complexity")
