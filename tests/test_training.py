"""mfa.training: what both trainers share — here, the TF32 switch of a fit, and the checks of
a saved trainer state, so a tampered checkpoint fails when it is loaded (as CheckpointError
in the workflow), never inside ``fit`` with a raw error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_data, random_model
from torch.utils.data import DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers, workflow
from mfa.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mfa.config import load_config
from mfa.em import EMConfig, EMTrainer
from mfa.sgd import SGDConfig, SGDTrainer
from mfa.training import restore_state

ROOT = Path(__file__).resolve().parents[1]


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
    EMTrainer(EMConfig(max_iter=2, progress=False)).load_state_dict(em_state)


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


def test_tf32_matmul_sets_and_restores_the_flag():
    from mfa.training import tf32_enabled, tf32_matmul
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        for start in (False, True):
            matmul.allow_tf32 = start
            with tf32_matmul(not start):
                assert tf32_enabled() is (not start)
            assert tf32_enabled() is start
            with pytest.raises(RuntimeError, match="inside"), tf32_matmul(not start):
                raise RuntimeError("inside")
            assert tf32_enabled() is start
            with tf32_matmul(start):  # already so: nothing is touched
                assert tf32_enabled() is start
    finally:
        matmul.allow_tf32 = before


def test_tf32_matmul_under_the_newer_precision_api():
    """After ``fp32_precision`` is set, torch refuses the legacy getter: the switch still
    works and restores. In a child process, since that state cannot be undone."""
    code = (
        "import torch\n"
        "from mfa.training import tf32_enabled, tf32_matmul\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "with tf32_matmul(False):\n"
        "    assert not tf32_enabled()\n"
        "assert tf32_enabled() and torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sgd_fit_runs_under_its_tf32_setting():
    from mfa.training import tf32_enabled
    seen = []
    before = tf32_enabled()
    model = random_model(2, 5, 1, seed=0)
    SGDTrainer(SGDConfig(epochs=1, allow_tf32=not before, progress=False, kmeans_iter=2)).fit(
        model, random_data(200, model, seed=1), callbacks=[lambda *_: seen.append(tf32_enabled())])
    assert seen == [not before] and tf32_enabled() == before
    with pytest.raises(ValueError, match="allow_tf32"):
        SGDConfig(allow_tf32=1).validate()


def test_empty_data_or_validation_is_refused_by_name():
    from mfa import EMConfig, EMTrainer, SGDConfig, SGDTrainer
    from mfa.training import evaluate

    model = random_model(2, 4, 1)
    x = random_data(60, model)
    with pytest.raises(ValueError, match="data is empty"):
        evaluate(model, x[:0])  # (scored 0.0)
    with pytest.raises(ValueError, match="validation is empty"):
        EMTrainer(EMConfig(max_iter=3, progress=False)).fit(model, x, validation=x[:0])
    with pytest.raises(ValueError, match="data is empty"):
        SGDTrainer(SGDConfig(epochs=1, init="none", progress=False)).fit(model, x[:0])
    with pytest.raises(ValueError, match="data is empty"):
        EMTrainer(EMConfig(init="none", progress=False)).fit(model, x[:0])


@pytest.mark.parametrize("trainer", ["em", "adam"])
@pytest.mark.parametrize("form", ["dataset", "loader"])
def test_an_empty_dataset_or_loader_is_refused_by_name(trainer, form):
    """Adam's shuffling loader failed on an empty Dataset with torch's "num_samples should
    be a positive integer value", and both trainers on a DataLoader of one inside
    ``torch.cat``; the same "data is empty" as a tensor of 0 rows now."""
    model = random_model(2, 4, 1)
    x = random_data(60, model)
    empty = TensorDataset(x[:0]) if form == "dataset" else DataLoader(TensorDataset(x[:0]),
                                                                        batch_size=10)
    fitter = (EMTrainer(EMConfig(max_iter=1, progress=False)) if trainer == "em"
              else SGDTrainer(SGDConfig(epochs=1, progress=False)))
    with pytest.raises(ValueError, match=r"^data is empty \(0 rows\)"):
        fitter.fit(model, empty, validation=x[:20])
    with pytest.raises(ValueError, match=r"^validation is empty \(0 rows\)"):
        fitter.fit(model, x, validation=empty)


def test_a_config_or_model_of_another_type_is_refused_by_name():
    """An EMConfig given to SGDTrainer passed (it has a validate() too) and failed later with
    an AttributeError; so did a model of another type in fit."""
    with pytest.raises(TypeError, match="SGDTrainer takes an SGDConfig, got EMConfig"):
        SGDTrainer(EMConfig())
    with pytest.raises(TypeError, match="EMTrainer takes an EMConfig, got SGDConfig"):
        EMTrainer(SGDConfig())
    x = torch.randn(40, 4)
    for fitter in (EMTrainer(EMConfig(progress=False)), SGDTrainer(SGDConfig(progress=False))):
        with pytest.raises(TypeError, match=r"\.fit needs a MixtureOfFactorAnalyzers, got "
                                            r"Linear"):
            fitter.fit(torch.nn.Linear(4, 4), x)


class _Stream(torch.utils.data.IterableDataset):
    """Rows as a stream (no length)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_an_iterable_dataset_trains_as_a_stream():
    # (EM: "object has no len()"; Adam: DataLoader refused shuffle for an IterableDataset)
    from mfa import EMConfig, EMTrainer, SGDConfig, SGDTrainer

    Rows = _Stream
    model = random_model(2, 4, 1)
    x = random_data(80, model)
    em = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64)
    reference = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64)
    config = dict(max_iter=3, progress=False, noise_prior_variance=1e-3, tempered_step=False)
    with pytest.warns(UserWarning):  # no validation: early stopping has nothing to stop on
        EMTrainer(EMConfig(**config)).fit(em, Rows(x))
    with pytest.warns(UserWarning):
        EMTrainer(EMConfig(**config)).fit(reference, DataLoader(TensorDataset(x), 64))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(em.state_dict()[name], value)
    sgd = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64)
    SGDTrainer(SGDConfig(epochs=2, progress=False, patience=0)).fit(sgd, Rows(x),
                                                                     validation=x[:20])
    assert torch.isfinite(sgd.means).all()


def test_hold_out_refuses_a_fraction_that_leaves_nothing_to_train_on():
    from mfa.training import hold_out

    model = random_model(2, 5, 1, seed=0)
    x = random_data(200, model, seed=1)
    with pytest.raises(ValueError, match=r"val_fraction=0.999 holds out all 200 rows"):
        hold_out(x, model, 0.999, seed=0, batch_size=64)
    with pytest.raises(ValueError, match="holds out all 200 rows"):
        EMTrainer(EMConfig(max_iter=1, patience=1, val_fraction=0.999, progress=False)).fit(
            model, x)


def test_hold_out_warns_when_the_fraction_rounds_to_no_row():
    from mfa.training import hold_out

    model = random_model(2, 5, 1, seed=0)
    x = random_data(4, model, seed=1)
    with pytest.warns(UserWarning, match=r"val_fraction=0.1 of 4 rows holds out none"):
        train, val = hold_out(x, model, 0.1, seed=0, batch_size=64)
    assert val is None and train is x
    # fraction 0 asks for no validation: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hold_out(x, model, 0.0, seed=0, batch_size=64) == (x, None)
    # a split that leaves both sides rows is seeded and disjoint
    x = random_data(50, model, seed=2)
    train, val = hold_out(x, model, 0.2, seed=3, batch_size=64)
    assert train.shape == (40, 5) and val.shape == (10, 5)
    again, val_again = hold_out(x, model, 0.2, seed=3, batch_size=64)
    assert torch.equal(train, again) and torch.equal(val, val_again)
    rows = {tuple(r.tolist()) for r in torch.cat([train, val])}
    assert len(rows) == 50


@pytest.mark.parametrize("seed", [4, 7])
def test_evaluate_is_exact_for_a_float32_heywood_component(seed):
    """The validation score of a float32 model with one noise variance at 1e-9 under loadings
    of size 1 equals the float64 copy's mean log-likelihood (the plain Woodbury form it used
    was 3 nats a row off)."""
    from helpers import heywood_float32_models

    from mfa.training import evaluate

    m32, m64, x = heywood_float32_models(seed)
    with torch.no_grad():
        expected = m64.log_prob(x.double()).mean().item()
    assert evaluate(m32, x) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("trainer", ["em", "adam"])
def test_a_dataset_of_batches_is_refused_with_a_hint(trainer):
    """An IterableDataset yielding batches [b, D] instead of rows failed inside torch's
    collation ("stack expects each tensor to be equal size"), naming neither the data nor the
    fix; it is refused, and the same batches through DataLoader(batch_size=None) train."""
    from torch.utils.data import IterableDataset

    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Batches(IterableDataset):
        def __iter__(self):
            yield from (x[:100], x[100:250], x[250:])

    def fit(data):
        config = (EMConfig(progress=False, max_iter=2) if trainer == "em"
                  else SGDConfig(progress=False, epochs=1))
        trainer_cls = EMTrainer if trainer == "em" else SGDTrainer
        return trainer_cls(config).fit(MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64),
                                       data, x[:50])

    with pytest.raises(ValueError, match=r"data: its Dataset yields batches of shape \(100, 4\)"
                                         r", not rows of 4 features; pass DataLoader\(dataset, "
                                         r"batch_size=None\)"):
        fit(Batches())
    fit(DataLoader(Batches(), batch_size=None))


@pytest.mark.parametrize("trainer", ["em", "adam"])
def test_a_map_style_dataset_of_batches_is_refused_with_a_hint(trainer):
    """The same for a map-style Dataset: Adam's shuffling loader and the initialisation's
    rows used torch's collation, and Adam said only "must have 4 features per row, got batch
    0 of shape (10, 30, 4)"."""
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[30 * i : 30 * (i + 1)]

    config = (EMConfig(progress=False, max_iter=2) if trainer == "em"
              else SGDConfig(progress=False, epochs=1))
    fitter = (EMTrainer if trainer == "em" else SGDTrainer)(config)
    with pytest.raises(ValueError, match=r"data: its Dataset yields batches of shape \(30, 4\)"):
        fitter.fit(MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64), Batches(), x[:50])


def test_tqdm_auto_is_imported_only_for_a_progress_bar():
    """``import mfa`` imported tqdm.auto, which in a Jupyter kernel without ipywidgets warns
    "IProgress not found" (the notebook showed it though every fit had progress=False)."""
    code = ("import sys, torch, mfa, mfa.em, mfa.sgd, mfa.workflow\n"
            "assert not any(m.startswith(('tqdm.auto', 'tqdm.notebook')) for m in sys.modules)\n"
            "x = torch.randn(40, 3)\n"
            "def fit(progress):\n"
            "    mfa.EMTrainer(mfa.EMConfig(max_iter=1, progress=progress, patience=0,\n"
            "        noise_prior_variance=1e-2, kmeans_iter=2)).fit(\n"
            "            mfa.MixtureOfFactorAnalyzers(2, 3, 1), x)\n"
            "fit(False)\n"
            "assert 'tqdm.auto' not in sys.modules\n"
            "fit(True)\n"
            "assert 'tqdm.auto' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EM run 1/1" in proc.stderr  # the bar itself


@pytest.mark.parametrize("noise", [1e-5, 1e-6])
def test_evaluate_takes_an_ill_conditioned_component_in_float64_only_near_the_top(
        monkeypatch, noise):
    """Scoring needs each row's log-density only: an ill-conditioned component's float64
    recomputation (mfa.residual_form._ill_conditioned_in_float64) runs on the rows where it
    is near the top, not on every row as for component_log_prob (on a Fashion-MNIST model,
    K = 50, that pass over every row was ~40 % of evaluate's time); the score is still the
    dense float64 reference's."""
    from helpers import DenseMixture, heywood_float32_models

    import mfa.residual_form as residual_form
    from mfa.training import evaluate

    m32, m64, x = heywood_float32_models(4, noise)
    real, seen = residual_form._ill_conditioned_in_float64, []

    def spy(log_joint, *args, rows=None):
        if len(args) == 8:  # (log_scale, xc, means, inv_noise, factors, chol, ill, rows)
            *args, rows = args
        seen.append(log_joint.shape[0] if rows is None else rows.numel())
        return real(log_joint, *args, rows)

    monkeypatch.setattr(residual_form, "_ill_conditioned_in_float64", spy)
    got = evaluate(m32, x)
    dense = DenseMixture.from_model(m64).log_prob(x.double())  # [n]
    assert seen and 0 < sum(seen) < x.shape[0]  # (all 2,000 rows before; 1,932 / 1,994 now)
    assert abs(got - float(dense.mean())) < 1e-3
    # row by row: what it skips moves no row's log p, and each is the reference's
    with torch.no_grad():
        terms = m32.component_terms()
        near = torch.logsumexp(m32._component_log_prob(x, terms, near_rows_only=True), -1)
        every = torch.logsumexp(m32._component_log_prob(x, terms), -1)
    torch.testing.assert_close(near, every, rtol=0, atol=0)
    torch.testing.assert_close(near.double(), dense, rtol=0, atol=2e-3)


def test_fits_on_a_dataset_leave_torchs_global_rng_as_it_was():
    """Iterating a DataLoader without a generator of its own draws its base seed from
    torch's global RNG: a fit on a Dataset (EM or Adam, a map-style one or a stream) moved
    the user's later torch.rand draws, where a fit on a tensor did not."""
    model = random_model(2, 4, 1)
    x = random_data(120, model)
    fits = {
        "EM": lambda model, data: EMTrainer(EMConfig(max_iter=3, progress=False)).fit(
            model, data),
        "Adam": lambda model, data: SGDTrainer(SGDConfig(epochs=2, progress=False)).fit(
            model, data, validation=x[:20]),
    }
    import warnings

    for name, fit in fits.items():
        for data in (TensorDataset(x), _Stream(x)):
            model = MixtureOfFactorAnalyzers(2, 4, 1, dtype=torch.float64)
            torch.manual_seed(7)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit(model, data)
            assert torch.equal(torch.get_rng_state(), torch.manual_seed(7).get_state()), (
                name, type(data).__name__)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_both_trainers_refuse_a_meta_model_naming_its_device(device):
    """A model built on ``meta`` (before ``load_state_dict(assign=True)``) given to a trainer
    failed deep in the data stream (``device=None``) or with torch's "Cannot copy out of meta
    tensor" (a config device): it holds no values to fit."""
    model = MixtureOfFactorAnalyzers(2, 3, 1, device="meta")
    x = torch.randn(50, 3)
    for trainer in (EMTrainer(EMConfig(max_iter=1, progress=False, device=device)),
                    SGDTrainer(SGDConfig(epochs=1, progress=False, device=device))):
        with pytest.raises(ValueError, match=r"\.fit cannot fit the model: its device 'meta'"):
            trainer.fit(model, x)
        assert model.device.type == "meta"
