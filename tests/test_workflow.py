"""End to end: :func:`mfa.workflow.train` on the embedded MNIST digits with a tiny model —
its result, its checkpoints, interrupting and resuming (EM and SGD), determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mfa import workflow
from mfa.checkpoint import load_checkpoint
from mfa.config import apply_overrides, load_config
from mfa.data import load_dataset
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
                     "history.json", "curve.png"}


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
