"""HierarchicalRunTrainer: the hierarchical trainer behind a run's trainer interface."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import gen, random_model

from mfa import EMConfig, MixtureOfFactorAnalyzers, workflow
from mfa.config import load_config
from mfa.data import ImageDataset
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer
from mfa.hierarchical_run import HierarchicalRunTrainer


def test_the_stages_are_fitted_on_the_run_models_device(monkeypatch):
    """A dataset (the form of data above STREAM_ABOVE, e.g. CelebA) is on no device: the
    stages were fitted on the CPU whatever the run's device was. The run's model now says
    where (tests/test_cuda_workflow.py checks a CUDA run end to end)."""
    seen = {}
    real_fit = HierarchicalTrainer.fit

    def spy(self, data, validation=None, **kwargs):
        seen["device"] = kwargs.get("device")
        return real_fit(self, data, validation, **kwargs)

    monkeypatch.setattr(HierarchicalTrainer, "fit", spy)
    pixels = torch.randint(0, 256, (300, 6), generator=gen(0), dtype=torch.uint8)
    model = MixtureOfFactorAnalyzers(2, 6, 1, dtype=torch.float64)
    cfg = HierarchicalConfig(root_components=2, n_factors=1, rows_per_component=60)
    flat = HierarchicalRunTrainer(cfg).fit(model, ImageDataset(pixels, dtype=torch.float64))
    assert seen["device"] == model.device
    assert flat.device == model.device


# ---------------------------------------------------------------------- resume, seeds

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml"
EM = EMConfig(max_iter=6, batch_size=256, progress=False)


def _config(**overrides) -> HierarchicalConfig:
    base = dict(root_components=3, n_factors=2, rows_per_component=60, max_child_components=3,
                root_em=EM, child_em=EM, seed=0)
    return HierarchicalConfig(**{**base, **overrides})


def _rows() -> torch.Tensor:
    """500 rows from a 6-component MFA over 5 features (float64)."""
    return random_model(6, 5, 2, seed=11).sample(500, generator=gen(5))[0]


def _start(seed: int) -> MixtureOfFactorAnalyzers:
    """The model a run builds with its top-level ``seed`` (model.* as in _config)."""
    return MixtureOfFactorAnalyzers(3, 5, 2, dtype=torch.float64, generator=gen(seed))


def _same(a: MixtureOfFactorAnalyzers, b: MixtureOfFactorAnalyzers) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])
                                          for k in sa)


def _values(history: list[dict]) -> list[dict]:
    """Without the wall times."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "em_seconds")}
            for r in history]


class Stop(RuntimeError):
    pass


def _uninterrupted(tmp_path):
    """The rows, an uninterrupted run's trainer and model (its stage files in ``a``), and a
    ``checkpoint_fn`` that keeps the last state it is given in the dict returned with it."""
    x = _rows()
    whole = HierarchicalRunTrainer(_config())
    expected = whole.fit(_start(0), x, checkpoint_dir=tmp_path / "a")
    saved = {}

    def checkpoint(trainer, model):
        saved["state"] = trainer.state_dict()

    return x, whole, expected, saved, checkpoint


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_resumed_runs_history_keeps_the_records_of_the_stages_fitted_before(tmp_path):
    """The resumed trainer restored the saved history, then fit replaced it with the new
    session's records: the stages fitted before the stop read train_log_likelihood None and
    em_seconds 0. Now the history (history.json) is that of an uninterrupted run."""
    x, whole, expected, saved, checkpoint = _uninterrupted(tmp_path)

    def stop(trainer, model, record):
        if record.get("component") == 0:
            raise Stop

    with pytest.raises(Stop):
        HierarchicalRunTrainer(_config()).fit(_start(0), x, callbacks=[stop],
                                              checkpoint_fn=checkpoint,
                                              checkpoint_dir=tmp_path / "b")
    for finished in (False, True):  # the interrupted run, then the finished one, resumed
        resumed = HierarchicalRunTrainer(_config())
        resumed.load_state_dict(saved["state"])
        start = expected if finished else _start(1)  # (a finished run's: its result)
        model = resumed.fit(start, x, checkpoint_fn=checkpoint,  # (root.pt: unused)
                            checkpoint_dir=tmp_path / "b")
        assert _same(model, expected)
        if not finished:
            assert [r["resumed"] for r in resumed.trainer.history][:2] == [True, True]
        assert _values(resumed.history) == _values(whole.history)
        assert resumed.history[0]["train_log_likelihood"] is not None
        assert all(r["em_seconds"] > 0 for r in resumed.history if r["stage"] != "final")
        assert saved["state"]["history"] == resumed.history  # (the last checkpoint's)


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
@pytest.mark.parametrize("killed_after", ["root.pt", "child-00001.pt", "model.pt"])
def test_a_kill_between_a_stage_file_and_the_runs_checkpoint_keeps_its_record(
        tmp_path, monkeypatch, killed_after):
    """Killed after a stage's file was written but before the run's checkpoint held its
    record: the resumed run's history read that stage as resumed, its log-likelihood None.
    The stage file keeps the record now, and history.json is an uninterrupted run's."""
    import mfa.hierarchical as hierarchical

    x, whole, expected, saved, checkpoint = _uninterrupted(tmp_path)
    write = hierarchical.save_checkpoint

    def killed(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if Path(path).name == killed_after:
            raise Stop

    monkeypatch.setattr(hierarchical, "save_checkpoint", killed)
    with pytest.raises(Stop):
        HierarchicalRunTrainer(_config()).fit(_start(0), x, checkpoint_fn=checkpoint,
                                              checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(hierarchical, "save_checkpoint", write)
    resumed = HierarchicalRunTrainer(_config())
    if "state" in saved:  # (killed after root.pt: the run had no checkpoint yet)
        resumed.load_state_dict(saved["state"])
    model = resumed.fit(_start(0), x, checkpoint_dir=tmp_path / "b")
    assert _same(model, expected)
    assert _values(resumed.history) == _values(whole.history)


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_resume_without_its_stage_files_records_the_stages_it_fits_again(tmp_path):
    """Stopped in a child with max_iter 2, its stage files removed, resumed with max_iter 6
    (resume-safe): every stage is fitted again, so the history must hold the new fits'
    records, those of an uninterrupted max_iter-6 run, not the saved root record of the
    max_iter-2 fit that no longer exists."""
    x, whole, expected, saved, checkpoint = _uninterrupted(tmp_path)
    short = replace(EM, max_iter=2)

    def stop(trainer, model, record):
        if record.get("component") == 0:
            raise Stop

    with pytest.raises(Stop):
        HierarchicalRunTrainer(_config(root_em=short, child_em=short)).fit(
            _start(0), x, callbacks=[stop], checkpoint_fn=checkpoint,
            checkpoint_dir=tmp_path / "b")
    old_root = saved["state"]["history"][0]["train_log_likelihood"]
    shutil.rmtree(tmp_path / "b")
    resumed = HierarchicalRunTrainer(_config())
    resumed.load_state_dict(saved["state"])
    model = resumed.fit(_start(0), x, checkpoint_fn=checkpoint,
                        checkpoint_dir=tmp_path / "b", new_model=lambda: _start(0))
    assert _same(model, expected)
    assert whole.history[0]["train_log_likelihood"] != old_root  # (the fits do differ)
    assert _values(resumed.history) == _values(whole.history)


def test_a_finished_run_resumed_without_its_stage_files_fits_nothing(tmp_path):
    """A finished run whose stage files were removed (they duplicate its model) was fitted
    again, stage by stage, on --resume, the log saying "nothing is left to fit" and
    train_seconds unchanged. The trainer now returns the run's model with its history."""
    x = _rows()
    saved = {}

    def checkpoint(trainer, model):
        saved["state"] = trainer.state_dict()

    whole = HierarchicalRunTrainer(_config())
    flat = whole.fit(_start(0), x, checkpoint_fn=checkpoint, checkpoint_dir=tmp_path / "a")
    assert saved["state"]["finished"] and flat.n_components != _start(0).n_components
    resumed = HierarchicalRunTrainer(_config())
    resumed.load_state_dict(saved["state"])

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run was fitted again")

    resumed.trainer.fit = no_fit
    again = resumed.fit(flat, x, checkpoint_fn=checkpoint, checkpoint_dir=tmp_path / "gone")
    assert again is flat and resumed.finished
    assert resumed.history == whole.history and saved["state"]["history"] == whole.history
    assert not (tmp_path / "gone").exists()


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_the_runs_seed_seeds_the_root_it_starts_from():
    """The root was built from train.hierarchical.seed whatever model the run had built with
    its own seed, documented as seeding model construction: with init none, seeds 0 and 1
    gave the same model (flat EM gives two). Now the root's EM starts from (a copy of) the
    run's model; a run model seeded as the library's root gives the library's model."""
    x = _rows()
    still = _config(root_em=replace(EM, init="none"))
    start = _start(0)
    zero = HierarchicalRunTrainer(still).fit(start, x)
    assert _same(start, _start(0))  # (copied, not fitted in place)
    assert not _same(zero, HierarchicalRunTrainer(still).fit(_start(1), x))
    assert _same(zero, HierarchicalTrainer(still).fit(x))  # still.seed == 0
    with pytest.raises(ValueError, match="root's starting model"):
        HierarchicalTrainer(still).fit(x, root=MixtureOfFactorAnalyzers(
            3, 5, 1, dtype=torch.float64))


# ---------------------------------------------------------------------- as a run

RUN = ["model.n_components=2", "model.n_factors=2", "train.method=hierarchical",
       "train.em.max_iter=3", "train.em.kmeans_iter=3", "train.em.progress=false",
       "train.em.variance_floor=1e-3", "train.hierarchical.rows_per_component=60",
       "train.hierarchical.child_em={max_iter: 3, kmeans_iter: 3, progress: false}",
       "data.limit=300", "data.dequantize=false", "output.plot=false", "device=cpu"]


def _run(out_dir, name: str, *overrides: str, callbacks: tuple = ()):
    config = load_config(CONFIG, [*RUN, f"output.dir={out_dir}", f"output.name={name}",
                                  *overrides])
    return workflow.train(config, figures=False, callbacks=callbacks)


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_resumed_runs_history_json_is_the_uninterrupted_runs(tmp_path):
    """history.json of a run stopped after child 0 and resumed (the reviewer's repro)."""

    def stop(trainer, model, record):
        if record.get("component") == 0:
            raise KeyboardInterrupt

    whole = _run(tmp_path, "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "b", callbacks=(stop,))
    resumed = workflow.train(None, resume=tmp_path / "b", figures=False)
    assert _same(resumed.model, whole.model)
    history = [json.loads((tmp_path / name / "history.json").read_text()) for name in "ab"]
    assert _values(history[1]) == _values(history[0])
    assert history[1][0]["train_log_likelihood"] is not None


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_runs_seed_changes_its_hierarchical_model(tmp_path):
    """With train.em.init none (the root starts from the run's model), as for flat EM."""
    seeded = [_run(tmp_path, f"s{seed}", f"seed={seed}", "train.em.init=none").model
              for seed in (0, 1)]
    assert not _same(*seeded)


def test_the_em_seeds_a_hierarchical_run_does_not_use_are_named():
    """train.em.seed and the stages' seeds were ignored without a word (only
    train.hierarchical.seed seeds the stages)."""
    from mfa.hierarchical_section import ignored_seeds_note

    def note(*overrides):
        return ignored_seeds_note(load_config(None, ["train.method=hierarchical", *overrides]))

    assert note() is None and note("train.hierarchical.seed=4") is None
    assert ignored_seeds_note(load_config(None, ["train.em.seed=5"])) is None  # (EM uses it)
    assert note("train.em.seed=5") == (
        "train.em.seed=5 is not used by a hierarchical run: train.hierarchical.seed (here 0) "
        "seeds its stages' EM and every child; set that instead")
    # a stage that inherits train.em's seed is not named again; one that sets its own is
    both = note("train.em.seed=5", "train.hierarchical.child_em={max_iter: 2}",
                "train.hierarchical.final_em={seed: 7}")
    assert both.startswith("train.em.seed=5, train.hierarchical.final_em.seed=7 are not used")


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_hierarchical_run_that_sets_an_em_seed_says_it_is_not_used(tmp_path):
    run = _run(tmp_path, "seeded", "train.em.seed=5")
    assert ("train.em.seed=5 is not used by a hierarchical run: train.hierarchical.seed"
            in (run.run_dir / "train.log").read_text())


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_finished_run_without_its_hierarchy_folder_is_not_trained_again(tmp_path):
    """The reviewer's repro: `mfa train --resume` of a finished run whose hierarchy/ was
    removed refitted every stage (and wrote hierarchy/ again)."""
    import shutil

    whole = _run(tmp_path, "done")
    shutil.rmtree(whole.run_dir / "hierarchy")
    history = (whole.run_dir / "history.json").read_text()
    again = workflow.train(None, resume=whole.run_dir, figures=False)
    assert _same(again.model, whole.model)
    assert again.metrics["train_seconds"] == whole.metrics["train_seconds"]
    assert (whole.run_dir / "history.json").read_text() == history
    assert not (whole.run_dir / "hierarchy").exists()


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_an_unfinished_run_without_its_hierarchy_folder_resumes_to_the_uninterrupted_model(
        tmp_path):
    """hierarchy/ removed after child 0 (or a run copied without it): the resumed root's EM
    started from the checkpoint's model, the fitted root, and with init none gave another
    model (13 components against 12 in the review's repro) without a word. Now it starts from
    the model a new run builds with the run's seed, and the log says the stages are refitted."""
    import shutil

    def stop(trainer, model, record):
        if record.get("component") == 0:
            raise KeyboardInterrupt

    whole = _run(tmp_path, "a", "train.em.init=none")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "b", "train.em.init=none", callbacks=(stop,))
    shutil.rmtree(tmp_path / "b" / "hierarchy")
    resumed = workflow.train(None, resume=tmp_path / "b", figures=False)
    assert _same(resumed.model, whole.model)
    assert "root.pt is missing (removed, or the run was copied without it): every stage is " \
           "fitted again" in (tmp_path / "b" / "train.log").read_text()
    # the trainer alone, resumed without root.pt or the model to start it from, refuses
    trainer = HierarchicalRunTrainer(_config())
    trainer.load_state_dict({"method": "hierarchical", "history": [{"stage": "root"}],
                             "finished": False})
    with pytest.raises(ValueError, match=r"root\.pt is missing\) and fit has no new_model"):
        trainer.fit(_start(0), _rows(), checkpoint_dir=tmp_path / "gone")


@pytest.mark.filterwarnings("ignore::mfa.ConvergenceWarning")
def test_a_restart_with_stage_files_refuses_a_stage_change_before_its_config_is_rewritten(
        tmp_path, monkeypatch):
    """Killed after hierarchy/root.pt but before the first checkpoint.pt, resumed with
    --set train.em.max_iter=4: the restart (no checkpoint) checked the resume-safe keys only,
    rewrote config.yaml, then root.pt refused the other config; a plain --resume then failed
    too. Now refused first, as a resume from a checkpoint is, and the run resumes as it was."""
    import mfa.hierarchical as hierarchical

    write = hierarchical.save_checkpoint

    def killed(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if Path(path).name == "root.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(hierarchical, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "r")
    monkeypatch.setattr(hierarchical, "save_checkpoint", write)
    run_dir = tmp_path / "r"
    assert (run_dir / "hierarchy" / "root.pt").exists()
    assert not (run_dir / "checkpoint.pt").exists()
    text = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"^cannot change train\.em\.max_iter when resuming a "
                                         r"hierarchical run: its finished stages"):
        workflow.train(None, resume=run_dir, overrides=["train.em.max_iter=4"], figures=False)
    assert (run_dir / "config.yaml").read_text() == text
    root = (run_dir / "hierarchy" / "root.pt").read_bytes()
    workflow.train(None, resume=run_dir, overrides=["train.em.progress=true"],
                   figures=False)  # (progress: may change)
    assert (run_dir / "checkpoint.pt").exists()
    assert (run_dir / "hierarchy" / "root.pt").read_bytes() == root  # (reused, not refitted)


@pytest.mark.parametrize("overrides, match", [
    (["model.n_components=301"], r"model\.n_components=301.*the training images the root's "
     r"EM is fitted to, the training split's 300 \(data\.limit=300\): lower "
     r"model\.n_components or raise data\.limit"),
    (["model.n_components=301", "train.em.init=none"], r"training split's 300"),
    (["train.em.init_samples=1"], r"model\.n_components=2.*train\.em\.init_samples=1 of 300: "
     r"lower model\.n_components or raise train\.em\.init_samples$"),
    (["train.hierarchical.root_em={init_samples: 1}"],
     r"train\.hierarchical\.root_em\.init_samples=1 of 300: lower model\.n_components or "
     r"raise train\.hierarchical\.root_em\.init_samples$"),
])
def test_too_few_rows_for_the_root_name_the_run_keys_before_a_folder_is_made(
        tmp_path, overrides, match):
    """The check of K against the training rows read trainer_config.init, which a
    HierarchicalConfig lacks: the root's EM failed after the run folder was made, saying
    "root_components=301" (no config key) or "a larger init_samples" (which one?)."""
    with pytest.raises(ValueError, match=match):
        _run(tmp_path / "runs", "few", *overrides)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
