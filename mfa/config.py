"""Typed run configuration: dataclasses, YAML files and command-line overrides.

A run is described by one :class:`RunConfig`::

    RunConfig
    ├── model:  ModelConfig   K, L, noise type, noise floor (D comes from the data)
    ├── data:   DataConfig    the arguments of ``mfa.data.load_dataset``
    ├── train:  TrainConfig   method "em" | "sgd" | "hierarchical" and the trainer settings
    │   ├── em:  mfa.em.EMConfig
    │   ├── sgd: mfa.sgd.SGDConfig
    │   └── hierarchical: HierarchicalSection (mfa.hierarchical.HierarchicalConfig; the
    │                     root's K₁, L and noise are the model's, its EM is train.em's)
    ├── output: OutputConfig  run folder, checkpoints, sample/inpainting figures
    ├── seed, device

Files in ``configs/*.yaml`` hold the same tree; missing keys take the defaults, which are
the values of the default config ``configs/embedded-mnist.yaml`` (a test keeps the two equal,
so a partial file means that config with the keys it writes changed; the trainers' own
``EMConfig``/``SGDConfig`` class defaults differ, e.g. ``max_iter`` 100, and stay the
library's)::

    config = load_config("configs/mnist.yaml", overrides=["train.em.max_iter=5",
                                                          "model.n_components=10"])

Every value is checked when a config is built from a mapping (:func:`config_from_dict`,
:func:`load_config`, :func:`apply_overrides`, :func:`validate_config`): an unknown key at
any level, a value of the wrong type or a value out of range raises :class:`ValueError`
naming the dotted key path, the value and what is allowed. Type checks follow the
dataclass annotations (so a field the trainers add later is checked too); range checks are
listed in ``_CONSTRAINTS``, except the trainers' settings, which the trainers check themselves
(``EMTrainer(config)``, ``SGDTrainer(config)``; their errors are reported under the YAML key).

Override values are parsed with ``yaml.safe_load``: ``5`` is an int, ``0.5`` a float,
``true`` a bool, ``null`` None, ``[center, top]`` a list. PyYAML reads ``1e-3`` (no dot)
as a string; float fields accept such strings, so ``train.em.tol=1e-3`` works.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import torch
import yaml

from mfa._temporaries import write_text_atomically
from mfa._typed import bad as _bad
from mfa._typed import coerce, over_section_defaults
from mfa._validation import supported_device
from mfa.config_text import apply_override_strings, read_yaml_mapping
from mfa.data.names import DATASET_NAMES, DatasetName, canonical_name
from mfa.em import EMConfig, EMTrainer
from mfa.hierarchical_config import check_final_em
from mfa.hierarchical_section import (
    MOVED_KEYS,
    HierarchicalSection,
    check_hierarchical,
    fill_stages,
    hierarchical_config,
)
from mfa.masks import MaskKind, MissingKind
from mfa.sgd import SGDConfig, SGDTrainer

__all__ = [
    "DATASET_NAMES",
    "DataConfig",
    "HierarchicalSection",
    "MissingConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_trainer_devices",
    "config_from_dict",
    "config_to_dict",
    "hierarchical_config",
    "load_config",
    "resolve_device",
    "save_config",
    "validate_config",
]


# ---------------------------------------------------------------------------- dataclasses


@dataclass
class ModelConfig:
    """The :class:`~mfa.model.MixtureOfFactorAnalyzers` to build (``n_features`` = data's D)."""

    n_components: int = 20  # K, mixture components
    n_factors: int = 6  # L, latent factors per component (0 <= L <= D)
    noise: Literal["diagonal", "isotropic"] = "diagonal"  # factor analysis | probabilistic PCA
    min_noise: float = 1e-6  # floor added to every noise variance


@dataclass
class MissingConfig:
    """Pixels removed from the training and validation images after loading (seeded), to
    train on incomplete data (EM or Adam on the observed entries, :mod:`mfa.missing`; the
    trainer's ``missing`` setting is then ``"allow"``)."""

    kind: MissingKind = "none"  # none | random (a rate of the pixels) | block (one square each)
    rate: float = 0.25  # share of each image's pixels hidden (kind "random")
    block_size: int = 14  # side of the hidden square (kind "block")
    seed: int = 0  # seeds the masks (validation rows use seed + 1)


@dataclass
class DataConfig:
    """The arguments of ``mfa.data.load_dataset`` (see :meth:`load_kwargs`)."""

    name: DatasetName = "embedded-mnist"  # which dataset
    root: str | None = None  # folder of the files; None: $MFA_DATA_DIR or ~/.cache/mfa/datasets
    download: bool = False  # let torchvision fetch a missing dataset into root
    image_size: int | list[int] | None = None  # side s (shorter side → s, centre crop) or [H, W]
    # 1 (greyscale) or 3 (RGB), for folder and celeba; None: the images' own (folder: the
    # first image's)
    channels: Literal[1, 3] | None = None
    val_fraction: float = 0.1  # share held out for validation (where there is no official split)
    test_fraction: float = 0.1  # share held out for testing (where there is no official split)
    seed: int = 0  # seeds the split, the limit subsets and the dequantization noise
    limit: int | None = None  # at most this many images in each split; None: all
    # float views are (pixel + uniform noise) / 256, a density on the 8-bit grid: bits/dim
    # (False: pixel / 255, no bits/dim)
    dequantize: bool = True
    num_workers: int = 0  # worker processes for decoding image files
    missing: MissingConfig = field(default_factory=MissingConfig)  # train on incomplete images

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``mfa.data.load_dataset(**kwargs)``."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("missing")  # applied after loading (mfa.workflow)
        if isinstance(self.image_size, list):
            kwargs["image_size"] = tuple(self.image_size)
        return kwargs


@dataclass
class TrainConfig:
    """The training method and the settings of the trainers (only ``method``'s is used)."""

    # EMTrainer, SGDTrainer or HierarchicalTrainer (root of model.n_components, then children)
    method: Literal["em", "sgd", "hierarchical"] = "em"
    # A run saves every iteration/epoch by default (a checkpoint is small next to a pass over
    # the data), so a killed run can be resumed. The other values that differ from the
    # trainers' class defaults are configs/embedded-mnist.yaml's (see the module docstring).
    em: EMConfig = field(default_factory=lambda: EMConfig(checkpoint_every=1, max_iter=30))
    sgd: SGDConfig = field(default_factory=lambda: SGDConfig(
        checkpoint_every=1, epochs=10, schedule="cosine"))
    hierarchical: HierarchicalSection = field(default_factory=HierarchicalSection)


@dataclass
class OutputConfig:
    """Where a run writes and what it draws."""

    dir: str = "runs"  # parent folder of the run folders
    name: str | None = None  # run folder name; None: numbered, e.g. runs/001-embedded-mnist
    checkpoint_every: int | None = None  # iterations/epochs; None: the trainer's own setting
    n_samples: int = 64  # images in the sample and outlier grids (0: neither)
    grid_nrow: int = 8  # images per row of the sample grid
    image_scale: int = 3  # nearest-neighbour upscaling of saved figures
    n_inpaint: int = 8  # test images per inpainting figure (0: no inpainting figures)
    inpaint_samples: int = 3  # conditional samples per image in the inpainting figures
    inpaint_masks: list[MaskKind] = field(default_factory=lambda: ["center", "bottom", "right"])
    mask_image: str | None = None  # PNG mask for the "image" kind (black = hidden)
    n_factor_components: int = 4  # components drawn in the factor figure (0: none)
    plot: bool = True  # save the training curve as curve.png (EM and Adam runs; not hierarchical)


@dataclass
class RunConfig:
    """Everything one training run needs; stored inside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0  # seeds model construction and sampling
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...

    def trainer_config(self) -> Any:
        """A copy of the selected trainer's config: an ``EMConfig`` or ``SGDConfig`` with
        ``output.checkpoint_every`` applied, or for ``hierarchical`` the
        ``mfa.hierarchical.HierarchicalConfig`` of ``train.hierarchical`` and the model."""
        if self.train.method == "hierarchical":
            return hierarchical_config(self)
        config = copy.deepcopy(self.train.em if self.train.method == "em" else self.train.sgd)
        if self.output.checkpoint_every is not None:
            config.checkpoint_every = self.output.checkpoint_every
        return config


def check_trainer_devices(method: str, trainer_config: Any) -> None:
    """Resolve every device ``trainer_config`` (:meth:`RunConfig.trainer_config`) names, so
    that a run stops before its folder exists (a hierarchical run's stages failed after the
    root's fit, leaving a folder whose resume refused the corrected device).

    Raises:
        ValueError: naming the key, e.g. ``train.hierarchical.child_em.device``.
    """
    stages = {f"train.{method}": trainer_config}
    if method == "hierarchical":
        stages = {f"train.hierarchical.{stage}": getattr(trainer_config, stage)
                  for stage in ("root_em", "child_em", "final_em")}
    for prefix, stage in stages.items():
        if getattr(stage, "device", None) is not None:
            try:
                resolve_device(stage.device, key=f"{prefix}.device")
            except ValueError as error:
                raise ValueError(f"invalid value for {prefix}.device: {error}") from None


def resolve_device(device: str | torch.device, *, key: str = "device") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else → ``torch.device``.
    ``key``: the setting that gave ``device``, for the advice of the error (a trainer's
    ``train.em.device`` takes ``null``, the run's device, but not ``auto``).

    Raises:
        ValueError: a CUDA device is asked for where there is none (or not that many).
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = supported_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            advice = (f"{key}=cpu or {key}=auto" if key == "device"
                      else f"{key}=null (the run's device) or {key}=cpu")
            raise ValueError(f"device {str(device)!r} asks for CUDA, but this PyTorch has no "
                             f"CUDA device; use {advice}")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} "
                             f"CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved


# ---------------------------------------------------------------------------- value checks


def _at_least(minimum: float):
    def check(value: Any, path: str) -> None:
        if value is not None and value < minimum:
            raise _bad(path, value, f"must be >= {minimum}")

    return check


def _fraction(value: Any, path: str) -> None:
    if value is not None and not 0 <= value < 1:
        raise _bad(path, value, "must be a fraction in [0, 1)")


def _image_size(value: Any, path: str) -> None:
    sizes = value if isinstance(value, list) else [value]
    if value is not None and any(size < 1 for size in sizes):
        raise _bad(path, value, "sizes must be >= 1")


def _device(value: Any, path: str) -> None:
    if value is None or value == "auto":
        return
    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(path, value, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def _stage_device(value: Any, path: str) -> None:
    """A trainer's ``device``: ``null`` (the run's device) or a device torch can parse; not
    ``'auto'``, which only the run's own ``device`` takes (the message offered it here, and
    the trainer then refused it)."""
    if value is None:
        return
    try:
        if value == "auto":
            raise ValueError(value)
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(path, value, "must be null (the run's device), 'cpu', 'cuda' or 'cuda:N'"
                   + ("; 'auto' is the top-level device's" if value == "auto" else "")) from None


def _folder_name(value: Any, path: str) -> None:
    if value is not None and (value in ("", ".", "..") or Path(value).name != value):
        raise _bad(path, value, "must be a plain folder name (no path separators)")


def _non_empty(value: Any, path: str) -> None:
    if value == "":
        raise _bad(path, value, "must not be empty")


_count, _one_or_more = _at_least(0), _at_least(1)


def _seed(value: Any, path: str) -> None:
    _count(value, path)
    if value is not None and value >= 2**63:  # torch's generators take int64 seeds
        raise _bad(path, value, "must be below 2**63")


#: Range checks per dataclass and field (type checks come from the annotations).
_CONSTRAINTS: dict[type, dict[str, Any]] = {
    ModelConfig: {"n_components": _one_or_more, "n_factors": _count, "min_noise": _count},
    DataConfig: {
        "root": _non_empty, "image_size": _image_size, "val_fraction": _fraction,
        "test_fraction": _fraction, "seed": _seed, "limit": _one_or_more, "num_workers": _count,
    },
    OutputConfig: {
        "dir": _non_empty, "name": _folder_name, "mask_image": _non_empty,
        "grid_nrow": _one_or_more, "image_scale": _one_or_more,
        **dict.fromkeys(("checkpoint_every", "n_samples", "n_inpaint", "inpaint_samples",
                         "n_factor_components"), _count),
    },
    MissingConfig: {"rate": _fraction, "block_size": _one_or_more, "seed": _seed},
    RunConfig: {"seed": _seed, "device": _device},
    # The trainers check their own settings (see _check_trainer); only device strings here.
    EMConfig: {"device": _stage_device},
    SGDConfig: {"device": _stage_device},
}


def _check_trainer(config: EMConfig | SGDConfig, path: str) -> None:
    """The trainer's own validation (one source of truth), its message naming the YAML key."""
    trainer = EMTrainer if isinstance(config, EMConfig) else SGDTrainer
    try:
        if path == "train.hierarchical.final_em":  # its own rules first: EMConfig's asks
            check_final_em(config, "EMConfig")  # n_init > 1 for a random init, refused here
        trainer(config)
    except ValueError as error:
        name = type(config).__name__
        text = yaml_words(str(error))
        match = re.match(rf"{name}\.(\w+)(=\S+)? (.*)", text, re.DOTALL)
        if match is None:
            raise ValueError(f"invalid value in {path}: {text}") from None
        key, value, problem = match.groups()
        problem = problem.replace(f"{name}.", f"{path}.")
        if value:  # (the message states the value before its problem: keep it)
            problem = f"{path}.{key}{value} {problem}"
        raise ValueError(f"invalid value for {path}.{key}: {problem}") from None


def yaml_words(text: str) -> str:
    """A library message as a config's reader writes it: Python's ``None`` is YAML's ``null``
    (the trainers' checks said "a number > 0 or None" of train.sgd.grad_clip)."""
    return re.sub(r"\bNone\b", "null", text)


def _cross_check(config: Any, path: str) -> None:
    """Checks that involve several fields of one section."""
    prefix = f"{path}." if path else ""
    if isinstance(config, (EMConfig, SGDConfig)):
        _check_trainer(config, path)
    if isinstance(config, DataConfig):
        if isinstance(config.image_size, list) and len(config.image_size) != 2:
            raise _bad(f"{prefix}image_size", config.image_size,
                       "expected a side or [height, width]")
        if config.val_fraction + config.test_fraction >= 1:
            raise ValueError(
                f"invalid values for {prefix}val_fraction and {prefix}test_fraction: their sum "
                f"must be < 1, got {config.val_fraction} + {config.test_fraction}"
            )
        if config.name == "folder" and config.root is None:
            raise ValueError(f"invalid value for {prefix}root: required when "
                             f"{prefix}name is 'folder', got None")
    if isinstance(config, RunConfig):
        check_hierarchical(config)
    if isinstance(config, OutputConfig):
        if "image" in config.inpaint_masks and config.mask_image is None:
            raise ValueError(f"invalid value for {prefix}mask_image: required when "
                             f"{prefix}inpaint_masks contains 'image', got None")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    """Build the dataclass ``cls`` from a mapping, checking every key and value."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    where = f"'{path}'" if path else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"invalid value for {path or 'the config'}: expected a mapping with keys "
            f"{', '.join(names)}, got {data!r}"
        )
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if full in MOVED_KEYS:
                hint = f" (it is {MOVED_KEYS[full]}: the root of a hierarchical run is the model)"
            raise ValueError(
                f"unknown config key '{full}'{hint}; valid keys under {where}: {', '.join(names)}"
            )
    data = over_section_defaults(cls, data)  # a partial section keeps its field's defaults
    if cls is TrainConfig:
        data = fill_stages(data, TrainConfig().em)
    hints = get_type_hints(cls)
    checks = _CONSTRAINTS.get(cls, {})
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        if cls is DataConfig and name == "name":  # aliases as load_dataset takes them
            value = canonical_name(value)
        value = coerce(value, hints.get(name, Any), key_path, _from_dict)
        if name in checks:
            checks[name](value, key_path)
        kwargs[name] = value
    config = cls(**kwargs)
    _cross_check(config, path)
    return config


# ---------------------------------------------------------------------------- public API


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A nested dict of plain values (YAML- and checkpoint-safe)."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    return dataclasses.asdict(config)


def config_from_dict(data: Mapping[str, Any] | None) -> RunConfig:
    """Build and validate a :class:`RunConfig`; missing keys take their defaults.

    Raises:
        ValueError: an unknown key (naming its dotted path and the valid keys), a value of
            the wrong type or out of range (naming the key and the value).
    """
    return _from_dict(RunConfig, data, "")


def validate_config(config: RunConfig) -> RunConfig:
    """Check a config built or edited in Python; returns a validated copy."""
    return config_from_dict(config_to_dict(config))


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """A validated copy of ``config`` with ``"dotted.key=value"`` overrides applied."""
    return config_from_dict(apply_override_strings(config_to_dict(config), overrides))


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Read a YAML config (``None``: all defaults), apply overrides and validate.

    Args:
        path: a YAML file holding (part of) the :class:`RunConfig` tree.
        overrides: ``"dotted.key=value"`` strings, applied in order; values are parsed with
            ``yaml.safe_load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: invalid YAML, an unknown key or an invalid value (naming the key path).
    """
    data: Any = {} if path is None else read_yaml_mapping(Path(path))
    merged = apply_override_strings(data, overrides)
    try:
        return config_from_dict(merged)
    except ValueError as error:
        where = f"config file {path}" if path is not None else "config"
        if overrides and path is not None:
            with contextlib.suppress(ValueError):  # the file alone is valid: the overrides
                config_from_dict(data)
                where = f"the overrides (--set) of config file {path}"
        raise ValueError(f"{where}: {error}") from None


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as YAML, atomically and fsynced
    (:func:`mfa._temporaries.write_text_atomically`: not renamed before its data reached the
    disk, which a power cut could leave an empty file)."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, text)
