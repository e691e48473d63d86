"""mfa.training: what both trainers share — here, the checks of a saved trainer state, so a
tampered checkpoint fails when it is loaded (as CheckpointError in the workflow), never
inside ``fit`` with a raw error."""

import pytest
import torch
from helpers import random_data, random_model

from mfa import workflow
from mfa.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mfa.config import load_config
from mfa.em import EMConfig, EMTrainer
from mfa.sgd import SGDConfig, SGDTrainer
from mfa.training import restore_state


@pytest.fixture(scope="module")
def em_state():
    model = random_model(3, 6, 2, seed=0)
    x = random_data(60, model, seed=1)
    trainer = EMTrainer(EMConfig(max_iter=2, progress=False, seed=0))
    with pytest.warns(Warning):
        trainer.fit(model, x)
    return trainer.state_dict()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("iteration", "7", r"'iteration' must be int, got str"),
        ("run", True, r"'run' must be int, got bool"),
        ("best_log_likelihood", "high", r"'best_log_likelihood' must be float or int"),
        ("best_params", [1, 2], r"'best_params' must be dict or None, got list"),
        ("converged", 1, r"'converged' must be bool, got int"),
        ("history", {"a": 1}, r"'history' must be a list of dicts"),
    ],
)
def test_em_state_with_a_wrong_type_is_refused_on_load(em_state, key, value, match):
    state = dict(em_state, **{key: value})
    with pytest.raises(TypeError, match=match):
        EMTrainer(EMConfig(progress=False)).load_state_dict(state)


def test_em_state_with_a_cut_generator_is_refused_on_load(em_state):
    state = dict(em_state, generator=torch.Generator().get_state()[:100])
    with pytest.raises(ValueError, match=r"'generator' is not a valid generator state"):
        EMTrainer(EMConfig(progress=False)).load_state_dict(state)


def test_a_valid_em_state_loads(em_state):
    EMTrainer(EMConfig(progress=False)).load_state_dict(em_state)


def test_sgd_state_with_a_wrong_type_is_refused_on_load():
    state = {"epoch": 1.5, "optimizer": {}, "scheduler": {}, "generator": None,
             "best_params": None, "best_val": None}
    with pytest.raises(TypeError, match=r"SGDTrainer state key 'epoch' must be int, got float"):
        SGDTrainer(SGDConfig(progress=False)).load_state_dict(state)
    state["epoch"], state["optimizer"] = 1, "adam"
    with pytest.raises(TypeError, match=r"'optimizer' must be dict, got str"):
        SGDTrainer(SGDConfig(progress=False)).load_state_dict(state)


def test_restore_state_names_missing_keys_and_non_dicts():
    with pytest.raises(ValueError, match=r"missing keys \['b'\]"):
        restore_state({"a": 1}, {"a", "b"}, "T")
    with pytest.raises(TypeError, match=r"T state must be a dict, got list"):
        restore_state([], set(), "T")


def test_resume_from_a_tampered_trainer_state_is_a_checkpoint_error(tmp_path):
    config = load_config(None, [
        "data.limit=200", "model.n_components=2", "model.n_factors=1", "train.em.max_iter=2",
        "train.em.progress=false", "train.em.init_samples=100", f"output.dir={tmp_path}",
        "output.name=run", "output.n_samples=0", "output.n_inpaint=0",
    ])
    result = workflow.train(config, figures=False)
    path = result.run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    state = dict(ckpt.trainer_state, iteration="1")
    save_checkpoint(path, ckpt.model, run_config=ckpt.run_config, trainer_state=state,
                    metrics=None)
    with pytest.raises(CheckpointError, match=r"trainer state that EMTrainer cannot resume "
                                              r"from: .*'iteration' must be int"):
        workflow.train(None, resume=result.run_dir, figures=False)
