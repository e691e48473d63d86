"""Checks of a loaded checkpoint's contents, made before anything is built from them.

A checkpoint is untrusted input: its ``model_config`` could ask for a model of any size and
its tensors could hold anything. So the sizes in the config are checked as plain values, the
stored tensors' shapes and dtypes are compared with what those sizes imply, and the values
are checked to be finite, all before a model is constructed; the model is then built without
allocating its parameters and takes the stored tensors as they are (see
:func:`build_model`). Each check raises ``ValueError`` or ``TypeError`` with a message that
names the tensor or key; :mod:`mfa.checkpoint` turns it into a ``CheckpointError`` naming the
file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mfa._validation import check_finite, check_positive_int
from mfa.model import NOISE_TYPES, MixtureOfFactorAnalyzers

__all__ = [
    "build_model",
    "check_generator_state",
    "check_model_config",
    "check_model_state",
    "check_parameters_finite",
    "check_run_metrics",
    "check_trainer_state",
    "expected_shapes",
]

_CONFIG_KEYS = ("n_components", "n_features", "n_factors", "noise", "min_noise")
_REQUIRED_CONFIG_KEYS = ("n_components", "n_features", "n_factors")
# Keys a trainer state may hold that load_checkpoint can check whatever the trainer:
_GENERATOR_KEYS = ("generator",)  # a CPU torch.Generator state (uint8 tensor)
_CONTAINER_KEYS = {"history": list, "config": dict}


def check_model_config(config: dict) -> None:
    """The stored ``model_config`` names known arguments and holds sizes of the right types.

    Only the values that the expected shapes depend on are checked here (without allocating
    anything); the model's constructor checks the rest when it is built.
    """
    unknown = sorted(set(map(str, config)) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a model config holds {list(_CONFIG_KEYS)}")
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"missing keys {missing}")
    check_positive_int(config["n_components"], "n_components")
    d = check_positive_int(config["n_features"], "n_features")
    lat = check_positive_int(config["n_factors"], "n_factors", minimum=0)
    if lat > d:
        raise ValueError(f"n_factors must be <= n_features ({d}), got {lat}")
    noise = config.get("noise", "diagonal")
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The parameter shapes a (checked) model config implies: ``logits`` [K], ``loc`` [K, D],
    ``loadings`` [K, D, L], ``raw_noise`` [K, D] (diagonal) or [K, 1] (isotropic)."""
    k, d, lat = config["n_components"], config["n_features"], config["n_factors"]
    width = d if config.get("noise", "diagonal") == "diagonal" else 1
    return {"logits": (k,), "loc": (k, d), "loadings": (k, d, lat), "raw_noise": (k, width)}


def check_model_state(config: dict, state: dict[str, Tensor]) -> None:
    """The stored tensors are exactly the parameters the config implies: same names, the
    implied shapes, one floating-point dtype and one device."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"missing parameters {missing}, unexpected parameters {unexpected}")
    for name, shape in expected.items():
        actual = tuple(state[name].shape)
        if actual != shape:
            raise ValueError(f"size mismatch for {name}: stored shape {list(actual)}, "
                             f"expected {list(shape)} from the config")
    for name, tensor in state.items():  # (torch's weights_only load lets these through)
        if tensor.layout != torch.strided or tensor.is_meta:
            raise ValueError(f"'{name}' is a {'meta' if tensor.is_meta else tensor.layout} "
                             "tensor without dense data; parameters are dense tensors")
    for name, tensor in state.items():  # a stride-0 tensor can have any shape in a tiny file
        stored = tensor.untyped_storage().nbytes() // max(1, tensor.element_size())
        if tensor.numel() > stored:
            raise ValueError(f"'{name}' has {tensor.numel()} elements but its stored data "
                             f"holds {stored}; the file is crafted or damaged")
    first = "logits"
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise TypeError(f"'{name}' has dtype {tensor.dtype}; parameters must be floating "
                            "point")
        if tensor.dtype != state[first].dtype:
            raise TypeError(f"'{name}' has dtype {tensor.dtype} but '{first}' has "
                            f"{state[first].dtype}; all parameters must share one dtype")
        if tensor.device != state[first].device:
            raise ValueError(f"'{name}' is on {tensor.device} but '{first}' is on "
                             f"{state[first].device}")


def check_parameters_finite(state: dict[str, Tensor]) -> None:
    """No stored parameter holds NaN or inf (the model would give NaN metrics)."""
    for name, tensor in state.items():
        check_finite(tensor, f"'{name}'")


def build_model(config: dict, state: dict[str, Tensor]) -> MixtureOfFactorAnalyzers:
    """The model of ``config`` holding the (checked) tensors of ``state``.

    It is constructed on the ``meta`` device, so its parameters take no memory (the
    constructor's random initial loadings are drawn on the CPU and dropped: one transient
    tensor of the checked loadings' size), then the stored tensors are assigned in their
    place, so the model ends on their device and dtype. A tensor that does not own its
    storage (shared with another parameter, overlapping strides, a larger storage) is copied
    first, so no two parameters alias. Call :func:`check_model_state` first.
    """
    owned, seen = {}, set()
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        if pointer in seen or not whole or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(pointer)
        owned[name] = tensor
    reference = owned["logits"]
    model = MixtureOfFactorAnalyzers(**config, dtype=reference.dtype, device="meta")
    model.load_state_dict(owned, strict=True, assign=True)
    return model


def check_generator_state(value: Any, where: str) -> None:
    """``value`` is a state that ``torch.Generator().set_state`` accepts."""
    problem = None
    if not isinstance(value, Tensor):
        problem = f"a {type(value).__name__}"
    elif value.dtype != torch.uint8 or value.dim() != 1:
        problem = f"a {value.dtype} tensor of shape {list(value.shape)}"
    else:
        try:
            torch.Generator().set_state(value.detach().cpu().clone())
        except (RuntimeError, TypeError, ValueError) as error:
            problem = f"rejected by torch.Generator.set_state ({' '.join(str(error).split())})"
    if problem is not None:
        raise ValueError(f"{where} is not a valid generator state: it is {problem}; expected "
                         "the uint8 tensor that torch.Generator().get_state() returns")


def check_trainer_state(state: Any) -> None:
    """What can be checked of a trainer state whatever the trainer: a dict (or None), its
    ``history`` a list, its ``config`` a dict, every ``generator`` in it (at any depth) a
    valid generator state. The trainer's ``load_state_dict`` checks its own keys."""
    if state is None:
        return
    if not isinstance(state, dict):
        raise TypeError(f"it is a {type(state).__name__}, not a dict")
    for key, kind in _CONTAINER_KEYS.items():
        if key in state and not isinstance(state[key], kind):
            raise TypeError(f"trainer_state[{key!r}] is a {type(state[key]).__name__}, not a "
                            f"{kind.__name__}")
    _check_generators(state, "trainer_state")


def check_run_metrics(metrics: Any) -> None:
    """The values of a run's ``metrics`` that resuming and the per-run commands read back:
    ``pools`` (``{pool: [images, digest or None]}``), ``image_shape`` (2 or 3 sizes ≥ 1) and
    ``train_seconds`` (finite, ≥ 0), each when present."""
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise TypeError(f"it is a {type(metrics).__name__}, not a dict")
    pools = metrics.get("pools")
    if pools is not None and not (isinstance(pools, dict) and all(
            isinstance(name, str) and isinstance(value, (list, tuple)) and len(value) == 2
            and _count(value[0]) and (value[1] is None or isinstance(value[1], str))
            for name, value in pools.items())):
        raise ValueError(f"metrics['pools'] must map pool names to [images, digest], got "
                         f"{pools!r}")
    shape = metrics.get("image_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) in (2, 3)
                                  and all(_count(size) and size > 0 for size in shape)):
        raise ValueError(f"metrics['image_shape'] must be 2 or 3 sizes >= 1, got {shape!r}")
    seconds = metrics.get("train_seconds")
    if seconds is not None and not (
            isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"metrics['train_seconds'] must be a finite number >= 0, got "
                         f"{seconds!r}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_generators(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}[{key!r}]"
            if key in _GENERATOR_KEYS:
                check_generator_state(item, inner)
            else:
                _check_generators(item, inner)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_generators(item, f"{where}[{i}]")
