"""Tests of mfa.config: YAML files, overrides, validation, round trips, devices."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

from mfa.config import (
    DATASET_NAMES,
    DataConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_device,
    save_config,
    validate_config,
)
from mfa.em import EMConfig
from mfa.sgd import SGDConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- shipped configs


def test_the_shipped_configs_exist():
    names = {p.stem for p in CONFIG_FILES}
    assert {"embedded-mnist", "mnist", "fashion-mnist", "svhn", "celeba"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.data.name == path.stem
    assert validate_config(config) == config
    assert config.model.n_factors >= 1


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_key_of_the_shipped_configs_is_commented(path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert "#" in line, f"{path.name}:{number} has a key without a comment: {line!r}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_the_shipped_configs_set_every_key(path):
    """The files document every setting: nothing is left to a hidden default."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))

    def missing(cls, data, prefix):
        out = []
        for f in dataclasses.fields(cls):
            if f.name not in data:
                out.append(prefix + f.name)
            elif dataclasses.is_dataclass(f.default_factory if f.default_factory is not
                                          dataclasses.MISSING else None):
                out += missing(f.default_factory, data[f.name], f"{prefix}{f.name}.")
        return out

    assert missing(RunConfig, raw, "") == []


def test_the_default_config_is_the_small_embedded_model():
    config = load_config(CONFIG_DIR / "embedded-mnist.yaml")
    assert config.data.name == "embedded-mnist"
    assert config.train.method == "em"
    assert config.model.n_components <= 20 and config.model.n_factors <= 10
    assert config.train.em.max_iter <= 30


def test_celeba_config_follows_the_paper():
    config = load_config(CONFIG_DIR / "celeba.yaml")
    assert (config.model.n_components, config.model.n_factors) == (300, 10)
    assert config.data.image_size == 64
    assert config.device == "cuda"


def test_dataset_names_match_the_loader():
    data = pytest.importorskip("mfa.data")
    assert tuple(DATASET_NAMES) == tuple(data.DATASET_NAMES)
    parameters = inspect.signature(data.load_dataset).parameters
    for key in DataConfig().load_kwargs():
        assert key in parameters, f"load_dataset has no parameter {key!r}"


@pytest.mark.parametrize("typed,name", [("fmnist", "fashion-mnist"), ("Fashion_MNIST",
                                         "fashion-mnist"), ("mnist5k", "embedded-mnist"),
                                         ("ImageFolder", "folder"), ("CelebA", "celeba")])
def test_data_name_takes_the_aliases_the_loader_takes(typed, name, tmp_path):
    """The config refused names load_dataset accepts (``fmnist``, any case, ``_``); it
    stores the canonical name, so the saved config and run folder name agree."""
    from mfa.data.names import normalise_name

    extra = [f"data.root={tmp_path}"] if name == "folder" else []
    config = load_config(overrides=[f"data.name={typed}", *extra])
    assert config.data.name == name == normalise_name(typed)
    assert config_from_dict(config_to_dict(config)).data.name == name


# ---------------------------------------------------------------------------- defaults, round trip


def test_defaults_and_nested_trainer_configs():
    config = load_config()
    assert config == RunConfig()
    assert isinstance(config.train.em, EMConfig)
    assert isinstance(config.train.sgd, SGDConfig)
    assert config.model == ModelConfig()


def test_missing_keys_take_defaults(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"n_components": 3}})
    config = load_config(path)
    assert config.model.n_components == 3
    assert config.model.n_factors == ModelConfig().n_factors
    # The default config's values (a run checkpoints every iteration/epoch, EM stops at 30
    # iterations, Adam anneals its rate over 10 epochs), not the trainers' class defaults.
    assert config.train.em == EMConfig(checkpoint_every=1, max_iter=30)
    assert config.train.sgd == SGDConfig(checkpoint_every=1, epochs=10, schedule="cosine")
    assert config.data.dequantize  # (False: the run reported no bits/dim, and said nothing)


def test_the_defaults_are_the_default_configs_values():
    """A partial config means the default config with the keys it writes changed: the
    dataclass defaults fell back to other values (no dequantisation, so no bits/dim; a
    constant Adam rate; K=10, 100 EM iterations, image_scale 2), and a resume with a partial
    --config was refused over values the user never wrote. One test keeps them equal."""
    default = load_config(CONFIG_DIR / "embedded-mnist.yaml")
    assert config_to_dict(RunConfig()) == config_to_dict(default)


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_dict_round_trip(path):
    config = load_config(path)
    data = config_to_dict(config)
    assert isinstance(data["train"]["em"], dict)
    assert config_from_dict(data) == config


def test_yaml_round_trip(tmp_path):
    config = load_config(overrides=["model.n_components=7", "train.method=sgd",
                                    "data.image_size=[20, 24]", "output.name=my-run"])
    path = save_config(config, tmp_path / "sub" / "saved.yaml")
    assert path.is_file()
    assert load_config(path) == config
    assert not list(path.parent.glob(".*tmp"))


def test_save_config_fsyncs_the_file_before_its_rename(tmp_path, monkeypatch):
    """save_config renamed its temporary without an fsync: after a power cut the run
    folder's config.yaml could be empty (which a resume then read as all defaults)."""
    import os

    from mfa import _temporaries

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_temporaries.os, "fsync", lambda fd: (
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("replace", str(b))), real_replace(a, b))[1])
    path = save_config(load_config(), tmp_path / "config.yaml")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".config.yaml."))
    assert events[1][1] == str(path) and load_config(path) == load_config()


def test_load_kwargs_match_the_loader_signature():
    config = load_config(overrides=["data.image_size=[20, 24]"])
    kwargs = config.data.load_kwargs()
    assert kwargs["image_size"] == (20, 24)
    assert kwargs["name"] == "embedded-mnist"


def test_trainer_config_applies_output_checkpoint_every():
    config = load_config(overrides=["train.em.checkpoint_every=3"])
    assert config.trainer_config().checkpoint_every == 3
    config = apply_overrides(config, ["output.checkpoint_every=5"])
    trainer = config.trainer_config()
    assert isinstance(trainer, EMConfig) and trainer.checkpoint_every == 5
    assert config.train.em.checkpoint_every == 3  # a copy, not the stored config
    config = apply_overrides(config, ["train.method=sgd"])
    assert isinstance(config.trainer_config(), SGDConfig)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_a_device_type_the_library_does_not_run_on_is_refused_where_it_is_used():
    """device=meta was accepted, and training failed with "Tensor.item() cannot be called on
    meta tensors", naming no setting. The config itself still reads (a saved run's config
    must load, to run elsewhere with --device)."""
    config = load_config(CONFIG_DIR / "embedded-mnist.yaml", ["device=meta"])
    with pytest.raises(ValueError, match=r"device 'meta': the device type 'meta' is not one "
                                         r"this library runs on \(cpu, cuda\)"):
        resolve_device(config.device)


def test_an_int_too_large_for_a_float_field_names_the_key():
    """It raised "OverflowError: int too large to convert to float", naming no key."""
    huge = "1" + "0" * 400
    with pytest.raises(ValueError, match=r"invalid value for model\.min_noise: expected a "
                                         r"finite float"):
        load_config(CONFIG_DIR / "embedded-mnist.yaml", [f"model.min_noise={huge}"])


# ---------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_values():
    config = load_config(
        CONFIG_DIR / "embedded-mnist.yaml",
        overrides=[
            "train.em.max_iter=5",
            "model.n_components=10",
            "train.em.tol=1e-3",  # PyYAML reads this as a string; float fields accept it
            "train.sgd.lr=0.01",
            "train.sgd.grad_clip=null",
            "train.em.progress=false",
            "model.min_noise=0",  # an int for a float field becomes a float
            "output.inpaint_masks=[top, random]",
            "device=cpu",
        ],
    )
    assert config.train.em.max_iter == 5
    assert config.model.n_components == 10
    assert config.train.em.tol == pytest.approx(1e-3)
    assert config.train.sgd.lr == pytest.approx(0.01)
    assert config.train.sgd.grad_clip is None
    assert config.train.em.progress is False
    assert config.model.min_noise == 0.0 and isinstance(config.model.min_noise, float)
    assert config.output.inpaint_masks == ["top", "random"]
    assert config.device == "cpu"


def test_later_overrides_win_and_whole_sections_can_be_set():
    config = load_config(overrides=["model.n_factors=2", "model.n_factors=4",
                                    "train.em={max_iter: 2}"])
    assert config.model.n_factors == 4
    assert config.train.em.max_iter == 2
    assert config.train.em.tol == EMConfig().tol


def test_apply_overrides_returns_a_validated_copy():
    base = RunConfig()
    changed = apply_overrides(base, ["seed=3"])
    assert changed.seed == 3 and base.seed == 0
    with pytest.raises(ValueError, match=r"unknown config key 'sed'.*did you mean 'seed'"):
        apply_overrides(base, ["sed=3"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.em.max_iter", r"invalid override 'train\.em\.max_iter'.*dotted\.key=value"),
        ("=5", r"invalid override '=5': empty key"),
        ("model..n_factors=2", r"empty key"),
        ("model.n_components=[1", r"not valid YAML"),
        ("model.noise.width=3", r"'model\.noise' is a value \('diagonal'\), not a section"),
        ("seed.value=3", r"'seed' is a value \(0\), not a section"),
    ],
)
def test_malformed_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(RunConfig(), [override])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, match",
    [
        # unknown keys, at every level, name the path and list the valid keys
        ("modle.n_components=3", r"unknown config key 'modle'.*did you mean 'model'.*"
                                 r"valid keys under the top level: model, data, train"),
        ("model.n_component=3", r"unknown config key 'model\.n_component'.*"
                                r"valid keys under 'model': n_components, n_factors"),
        ("train.em.max_iters=3", r"unknown config key 'train\.em\.max_iters'.*did you mean "
                                 r"'max_iter'.*valid keys under 'train\.em': max_iter"),
        ("train.sgd.learning_rate=1", r"unknown config key 'train\.sgd\.learning_rate'.*lr"),
        ("output.folder=x", r"unknown config key 'output\.folder'.*valid keys under 'output'"),
        # wrong types
        ("model.n_components=ten", r"model\.n_components: expected an int, got 'ten'"),
        ("model.n_components=2.5", r"model\.n_components: expected an int, got 2\.5"),
        ("model.n_components=true", r"model\.n_components: expected an int, got True"),
        ("train.em.tol=abc", r"train\.em\.tol: expected a float, got 'abc'"),
        ("train.em.tol=.nan", r"train\.em\.tol: expected a finite float, got nan"),
        ("train.em.progress=1", r"train\.em\.progress: expected a bool.*got 1"),
        ("data.root=5", r"data\.root: expected a string or null \(YAML reads.*got 5"),
        ("model=3", r"invalid value for model: expected a mapping.*got 3"),
        # bad values
        ("model.n_components=0", r"model\.n_components: must be >= 1, got 0"),
        ("model.n_factors=-2", r"model\.n_factors: must be >= 0, got -2"),
        ("model.min_noise=-1.0", r"model\.min_noise: must be >= 0, got -1\.0"),
        ("train.em.max_iter=-5", r"train\.em\.max_iter: must be an int >= 0, got -5"),
        ("train.em.batch_size=0", r"train\.em\.batch_size: must be an int >= 1, got 0"),
        ("train.sgd.lr=0", r"train\.sgd\.lr: must be a finite number > 0, got 0\.0"),
        ("train.sgd.epochs=0", r"train\.sgd\.epochs: must be an int >= 1, got 0"),
        ("data.limit=0", r"data\.limit: must be >= 1, got 0"),
        ("data.num_workers=-1", r"data\.num_workers: must be >= 0, got -1"),
        ("data.image_size=[0, 4]", r"data\.image_size: sizes must be >= 1, got \[0, 4\]"),
        ("data.image_size=[4, 4, 4]", r"data\.image_size: expected a side or \[height, width\]"),
        ("seed=-1", r"invalid value for seed: must be >= 0, got -1"),
        # unknown enum strings
        ("model.noise=full", r"model\.noise: expected one of 'diagonal', 'isotropic', got 'full'"),
        ("train.method=adam",
         r"train\.method: expected one of 'em', 'sgd', 'hierarchical', got 'adam'"),
        ("train.em.init=pca", r"train\.em\.init: expected one of 'kmeans'.*got 'pca'"),
        ("train.sgd.schedule=linear", r"train\.sgd\.schedule: expected one of.*got 'linear'"),
        ("data.name=cifar10", r"data\.name: expected one of 'embedded-mnist'.*got 'cifar10'"),
        ("output.inpaint_masks=[center, blob]", r"output\.inpaint_masks\[1\].*got 'blob'"),
        ("device=gpu", r"invalid value for device: must be 'auto'.*got 'gpu'"),
        ("train.em.device=tpu0", r"train\.em\.device: must be null \(the run's device\), "
                                 r"'cpu'.*got 'tpu0'"),
        # 'auto' was offered for a stage's device, which the trainer then refused
        ("train.em.device=auto", r"train\.em\.device: must be null.*'auto' is the top-level"),
        ("train.sgd.device=auto", r"train\.sgd\.device: must be null"),
        ("train.hierarchical.root_em.device=auto", r"root_em\.device: must be null"),
        # fractions outside [0, 1)
        ("data.val_fraction=1.0", r"data\.val_fraction: must be a fraction in \[0, 1\), got 1\.0"),
        ("data.test_fraction=-0.1", r"data\.test_fraction: must be a fraction.*got -0\.1"),
        ("train.sgd.val_fraction=1.5", r"train\.sgd\.val_fraction: must be .*>= 0 and < 1.*1\.5"),
        # values that depend on each other
        ("data.test_fraction=0.95", r"data\.val_fraction and data\.test_fraction.*< 1.*0\.95"),
        ("data.name=folder", r"data\.root: required when data\.name is 'folder'"),
        ("output.inpaint_masks=[image]", r"output\.mask_image: required when.*'image'"),
        ("output.name=a/b", r"output\.name: must be a plain folder name.*'a/b'"),
    ],
)
def test_validation_errors_name_the_key_and_value(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=[override])


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"model": {"n_components": -3}})
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.n_components: must be >= 1, got -3"):
        load_config(path)
    path = write_yaml(tmp_path / "deep.yaml", {"train": {"em": {"bogus": 1}}})
    with pytest.raises(ValueError, match=r"unknown config key 'train\.em\.bogus'"):
        load_config(path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    # a folder was reported as missing
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a YAML file"):
        load_config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml must hold a mapping.*got list"):
        load_config(listing)


def test_config_from_dict_validates():
    with pytest.raises(ValueError, match=r"unknown config key 'data\.nam'"):
        config_from_dict({"data": {"nam": "mnist"}})
    with pytest.raises(ValueError, match=r"train\.em\.n_init: must be an int >= 1, got 0"):
        config_from_dict({"train": {"em": {"n_init": 0}}})
    assert config_from_dict(None) == RunConfig()


def test_validate_config_catches_edits_in_python():
    config = RunConfig()
    config.model.n_components = -1
    with pytest.raises(ValueError, match=r"model\.n_components: must be >= 1, got -1"):
        validate_config(config)
    with pytest.raises(TypeError, match="RunConfig"):
        config_to_dict({"model": {}})


def test_output_defaults_are_valid():
    assert validate_config(RunConfig(output=OutputConfig(n_samples=0))).output.n_samples == 0


# ---------------------------------------------------------------------------- trainer settings


@pytest.mark.parametrize(
    "override, match",
    [
        # accepted by the old copy of the limits in the config loader, refused by the trainers
        ("train.em.variance_floor=0",
         r"train\.em\.variance_floor: must be a finite number > 0, got 0\.0"),
        ("train.em.kmeans_iter=0", r"train\.em\.kmeans_iter: must be an int >= 1, got 0"),
        ("train.sgd.kmeans_iter=0", r"train\.sgd\.kmeans_iter: must be an int >= 1, got 0"),
        ("train.sgd.variance_floor=0",
         r"train\.sgd\.variance_floor: must be a finite number > 0, got 0\.0"),
        # a rule over two fields, in the trainer's words with the YAML keys
        ("train.em={init: none, n_init: 2}",
         r"train\.em\.n_init: train\.em\.n_init=2 > 1 needs a random train\.em\.init"),
    ],
)
def test_trainer_settings_are_checked_by_the_trainers(override, match):
    with pytest.raises(ValueError, match=match) as caught:
        load_config(overrides=[override])
    assert "EMConfig" not in str(caught.value) and "SGDConfig" not in str(caught.value)


def test_trainer_limits_are_the_trainers():
    """One source of truth: what EMTrainer accepts, the config accepts (max_iter=0 included)."""
    assert load_config(overrides=["train.em.max_iter=0"]).train.em.max_iter == 0
    assert load_config(overrides=["train.em.complete_iter=0"]).train.em.complete_iter == 0


# ---------------------------------------------------------------------------- devices, files


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"device 'cuda' asks for CUDA.*no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_a_cuda_index_past_the_devices_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist.*1 CUDA device"):
        resolve_device("cuda:3")


def test_a_binary_config_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # a pickle's first bytes
    with pytest.raises(ValueError, match=r"weights\.yaml is not UTF-8 YAML text.*byte 0"):
        load_config(path)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_configs_checkpoint_every_iteration(path):
    """A killed run of any shipped config can be resumed from its last iteration/epoch."""
    config = load_config(path)
    assert config.train.em.checkpoint_every == 1
    assert config.train.sgd.checkpoint_every == 1
    assert config.output.checkpoint_every in (None, 1)
    assert RunConfig().trainer_config().checkpoint_every == 1  # no --config: the defaults


# ---------------------------------------------------------------------------- hierarchical


def test_the_hierarchical_section_is_the_trainers_config_less_the_models_values():
    """One home for the defaults: train.hierarchical has HierarchicalConfig's fields and
    defaults, less the root's K₁, L and noise (the model's); its stages' EM defaults to
    train.em."""
    from mfa.hierarchical import HierarchicalConfig
    from mfa.hierarchical_section import HIERARCHY_FROM_MODEL, HierarchicalSection

    trainer_fields = {f.name: f for f in dataclasses.fields(HierarchicalConfig)}
    section_fields = {f.name: f for f in dataclasses.fields(HierarchicalSection)}
    assert list(section_fields) == [n for n in trainer_fields if n not in HIERARCHY_FROM_MODEL]
    defaults = HierarchicalConfig()
    for name in section_fields:
        if name in ("root_em", "child_em"):
            assert getattr(HierarchicalSection(), name) is None
        else:
            assert getattr(HierarchicalSection(), name) == getattr(defaults, name), name


def test_a_partial_trainer_section_keeps_the_runs_defaults(tmp_path):
    """train.em / train.sgd given in part were built from the class defaults: a run then
    saved no checkpoint until the end (checkpoint_every 0), and a killed run lost it all."""
    run = RunConfig().train
    assert run.em.checkpoint_every == run.sgd.checkpoint_every == 1
    em = load_config(None, ["train.em.max_iter=8"]).train.em
    assert em == dataclasses.replace(run.em, max_iter=8)
    sgd = load_config(None, ["train.sgd.epochs=8"]).train.sgd
    assert sgd == dataclasses.replace(run.sgd, epochs=8)
    path = tmp_path / "partial.yaml"
    path.write_text("train:\n  em: {max_iter: 5, tol: 0.0}\n  sgd: {lr: 0.01}\n")
    config = load_config(path)
    assert config.train.em.checkpoint_every == 1 and config.train.em.max_iter == 5
    assert config.train.sgd.checkpoint_every == 1 and config.train.sgd.lr == 0.01
    # an explicit value still wins, and the round trip keeps it
    explicit = load_config(None, ["train.em.checkpoint_every=0"])
    assert explicit.train.em.checkpoint_every == 0
    assert config_from_dict(config_to_dict(explicit)) == explicit


def test_an_empty_trainer_section_keeps_the_runs_defaults(tmp_path):
    """`em:` with every key commented out (YAML null), `em: null` or `--set train.em=null`:
    the run's section, as an omitted one gives (they took the class defaults: no checkpoint
    until the end, so a killed run could not be resumed)."""
    run = RunConfig().train
    for i, text in enumerate(["train:\n  em:\n    # max_iter: 5\n  sgd:\n",
                              "train: {em: null, sgd: null}\n"]):
        path = tmp_path / f"empty-{i}.yaml"
        path.write_text(text)
        config = load_config(path)
        assert config.train.em == run.em and config.train.sgd == run.sgd, text
    config = load_config(None, ["train.em=null", "train.sgd=null"])
    assert config.train.em == run.em and config.train.sgd == run.sgd


def test_a_partial_hierarchical_stage_takes_the_runs_em_for_the_keys_it_leaves_out():
    config = load_config(None, ["train.method=hierarchical", "train.em.max_iter=7",
                                "train.hierarchical.root_em={tol: 0.01}"])
    hier = config.trainer_config()
    assert hier.root_em == dataclasses.replace(config.train.em, tol=0.01)
    assert hier.root_em.max_iter == 7 and hier.root_em.checkpoint_every == 1
    assert hier.child_em == config.train.em  # null: train.em itself
    with pytest.raises(ValueError, match=r"unknown config key 'train\.em\.max_iterr'"):
        load_config(None, ["train.method=hierarchical", "train.em.max_iterr=7",
                           "train.hierarchical.root_em={tol: 0.01}"])


def test_hierarchical_trainer_config_takes_the_model_and_train_em():
    config = load_config(CONFIG_DIR / "embedded-mnist.yaml", [
        "train.method=hierarchical", "model.n_components=7", "model.n_factors=3",
        "model.noise=isotropic", "model.min_noise=0.002",
        "train.hierarchical.rows_per_component=50",
        "train.hierarchical.child_em={max_iter: 2}", "train.em.max_iter=11",
    ])
    hier = config.trainer_config()
    assert (hier.root_components, hier.n_factors, hier.noise, hier.min_noise) == (
        7, 3, "isotropic", 0.002)
    assert hier.rows_per_component == 50
    assert hier.root_em == config.train.em and hier.root_em.max_iter == 11
    assert hier.child_em == dataclasses.replace(config.train.em, max_iter=2)  # the rest: train.em
    assert hier.final_em is None
    # the YAML round trip keeps it
    assert config_from_dict(config_to_dict(config)) == config


def test_em_on_incomplete_rows_is_not_refused_by_the_unused_hierarchical_stages():
    """The README's `--set train.em.missing=allow` was refused for an EM run: the hierarchical
    stages copy train.em and were checked as if hierarchical training would run."""
    assert load_config(overrides=["train.em.missing=allow"]).train.em.missing == "allow"
    # (the null stages copy train.em: the value is named where it came from, not as
    # train.hierarchical.root_em.missing, a key the config leaves null)
    with pytest.raises(ValueError, match=r"invalid value for train\.em\.missing: must be "
                                         "'error'"):
        load_config(overrides=["train.em.missing=allow", "train.method=hierarchical"])
    with pytest.raises(ValueError, match=r"child_em\.missing: must be 'error'"):
        load_config(overrides=["train.hierarchical.child_em={missing: allow}"])


def test_a_trainers_check_says_null_for_none():
    """A config's reader writes null: "must be a finite number > 0 or None" named Python's."""
    with pytest.raises(ValueError, match=r"train\.sgd\.grad_clip: must be a finite number > 0 "
                                         r"or null, got -1\.0$"):
        load_config(overrides=["train.sgd.grad_clip=-1"])


@pytest.mark.parametrize("override, match", [
    ("train.hierarchical.n_factors=3",
     r"unknown config key 'train\.hierarchical\.n_factors' \(it is model\.n_factors"),
    ("train.hierarchical.root_components=3",
     r"'train\.hierarchical\.root_components' \(it is model\.n_components"),
    ("train.hierarchical.rows_per_component=0",
     r"train\.hierarchical\.rows_per_component: must be an int >= 1, got 0"),
    ("train.hierarchical={min_child_components: 5, max_child_components: 2}",
     r"train\.hierarchical\.min_child_components: must be <= max_child_components, got 5 > 2"),
    ("train.hierarchical.final_em={init: kmeans}",
     r"train\.hierarchical\.final_em\.init: must be 'none'"),
    ("train.hierarchical.child_em={kmeans_iter: 0}",
     r"train\.hierarchical\.child_em\.kmeans_iter: must be an int >= 1, got 0"),
    ("train.hierarchical.min_child_rows=0",
     r"train\.hierarchical\.min_child_rows: must be null or an int >= 1, got 0"),
    ("train.method=tree", r"train\.method: expected one of 'em', 'sgd', 'hierarchical'"),
])
def test_hierarchical_errors_name_the_key(override, match):
    with pytest.raises(ValueError, match=match) as caught:
        load_config(overrides=[override])
    assert "HierarchicalConfig" not in str(caught.value)


def test_a_key_given_twice_is_refused_and_override_errors_name_the_overrides(tmp_path):
    """PyYAML keeps a repeated key's last value: a second `model:` section silently dropped
    the first's n_components. And an unknown --set key was blamed on the config file."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  n_components: 3\ntrain:\n  method: em\nmodel:\n  n_factors: 2\n")
    with pytest.raises(ValueError, match=r"found the key 'model' twice \(first on line 1\)"):
        load_config(path)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  n_components: 3\n")
    with pytest.raises(ValueError, match=r"^the overrides \(--set\) of config file .*good\.yaml: "
                                         r"unknown config key 'model\.n_component'"):
        load_config(good, ["model.n_component=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_component: 3\n")
    with pytest.raises(ValueError, match=r"^config file .*bad\.yaml: unknown config key"):
        load_config(bad, ["model.n_factors=2"])



def test_em_on_incomplete_rows_is_not_refused_for_a_partial_unused_hierarchical_stage():
    """A partial stage copied train.em.missing=allow, which a stage refuses, although the
    run trains by EM (the null stages were already exempt)."""
    for stage in ("root_em", "child_em"):
        config = load_config(None, ["train.em.missing=allow",
                                    f"train.hierarchical.{stage}={{max_iter: 2}}"])
        assert config.train.em.missing == "allow"
        assert getattr(config.train.hierarchical, stage).missing == "error"


def test_a_partial_final_em_takes_the_runs_em_and_continues_from_the_flattened_model():
    """A partial final_em took EMConfig's class defaults (init 'kmeans', which it refuses;
    progress on), unlike root_em and child_em."""
    config = load_config(None, ["train.method=hierarchical", "train.em.max_iter=7",
                                "train.em.progress=false",
                                "train.hierarchical.final_em={tol: 0.01}"])
    final = config.trainer_config().final_em
    assert final == dataclasses.replace(config.train.em, tol=0.01, init="none")
    assert (final.max_iter, final.progress) == (7, False)


def test_a_trainer_refusal_keeps_the_value_it_names():
    """'invalid value for train.em.n_init: > 1 needs …' dropped the 3 it refused."""
    with pytest.raises(ValueError, match=r"invalid value for train\.em\.n_init: "
                                         r"train\.em\.n_init=3 > 1 needs a random train\.em"):
        load_config(None, ["train.em.n_init=3", "train.em.init=none"])


@pytest.mark.parametrize("override", ["train.sgd.weight_decay=1e300",
                                      "train.em.noise_prior_variance=1e300",
                                      "train.em.quantization_variance=1e39"])
def test_a_real_setting_beyond_float32_is_refused_at_load(override):
    """weight_decay=1e300 failed in Adam with a raw overflow RuntimeError after the run folder
    was made; noise_prior_variance=1e300 gave a non-finite M-step."""
    key = override.split("=")[0]
    with pytest.raises(ValueError,
                       match=rf"invalid value for {re.escape(key)}: must lie within float32's"):
        load_config(None, [override])
