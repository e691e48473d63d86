"""Input checks shared by the public API. Each raises an error that names the problem."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(x: Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of dtype {dtype}, got {x.dtype} "
            f"(convert it first, e.g. {name}.to({dtype}))"
        )
    if x.dtype != dtype:
        # (a model cannot take float16 or bfloat16: name the one conversion that works)
        advice = ("convert one of them with .to()" if x.dtype in (torch.float32, torch.float64)
                  else f"convert the data: {name}.to({dtype})")
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model has dtype {dtype}; {advice}"
        )
    if x.device.type != device.type or (
        device.index is not None and x.device.index is not None and x.device.index != device.index
    ):
        raise ValueError(
            f"{name} is on device {x.device} but the model is on {device}; move one with .to()"
        )


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (no NaN, no ±inf).

    A finite sum proves it (NaN and ±inf propagate through a sum), at the cost of one
    reduction: ``torch.isfinite`` over the whole tensor builds a bool tensor and runs ~30×
    slower on a CPU (50,000 × 784 float32: 150 ms against 5 ms). Only a sum that overflows or
    is NaN falls back to the element-wise test, so the answer is always exact.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def all_not_nan(x: Tensor) -> bool:
    """Whether no entry of ``x`` is NaN (±inf allowed), by the same finite-sum shortcut as
    :func:`all_finite`."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return not bool(torch.isnan(x).any())


def all_not_inf(x: Tensor) -> bool:
    """Whether no entry of ``x`` is ±inf (NaN allowed: missing entries), by the finite-sum
    shortcut of :func:`all_finite` on the NaN-skipping sum."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.nansum())):
        return True
    return not bool(torch.isinf(x).any())


def check_finite(x: Tensor, name: str) -> None:
    if all_finite(x):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = x[index].item()
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"the first is {value} at index {index}"
        )


def check_data(x: object, name: str, n_features: int, dtype: torch.dtype, device,
               what: str = "n_features") -> Tensor:
    """Validate data of shape ``[..., n_features]`` against a model's dtype and device;
    ``what`` names ``n_features`` in the error (e.g. the observed features it counts)."""
    x = check_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] != n_features:
        raise ValueError(
            f"{name} must have shape [..., {n_features}] ({what}={n_features}), "
            f"got {tuple(x.shape)}"
        )
    check_floating(x, name, dtype, device)
    check_finite(x, name)
    return x


def as_real(value: object) -> float | None:
    """``value`` as a float where it is a real number (numpy's scalars and 0-d tensors
    included; not a bool), else ``None``."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_mask(mask: object, name: str, shape: Sequence[int], device) -> Tensor:
    mask = check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    device = torch.device(device)
    if mask.device.type != device.type or (  # (the index too: cuda:1 against cuda:0)
        device.index is not None and mask.device.index is not None
        and mask.device.index != device.index
    ):
        raise ValueError(f"{name} is on device {mask.device} but the model is on {device}")
    return mask


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``: an int or a numpy integer (``D`` read
    from an array's shape or a count), not a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def is_real_number(value: object) -> bool:
    """A real number: Python's or numpy's int or float, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_real(value: object, name: str) -> float:
    """``value`` as a finite float above 0: a real number (numpy's included), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool: Python's, numpy's or a one-element bool tensor's (a string such
    as ``'no'`` acted as ``True`` and ``None`` as ``False``)."""
    if isinstance(value, Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return bool(value)


def check_generator(generator: object, name: str = "generator", optional: bool = True,
                    device: torch.device | None = None) -> None:
    """``generator`` is a ``torch.Generator`` (or ``None`` when ``optional``): an int failed
    inside torch after the work before the draw; ``None`` where one is required drew from
    torch's global generator. With ``device``, the generator must be on it (torch failed at
    the first draw, in ``conditional_sample`` after the first chunk's work)."""
    if not (isinstance(generator, torch.Generator) or (optional and generator is None)):
        raise TypeError(f"{name} must be a torch.Generator{' or None' if optional else ''}, "
                        f"got {type(generator).__name__}")
    if generator is not None and device is not None and not _same_device(generator.device,
                                                                         torch.device(device)):
        raise ValueError(f"{name} is on {generator.device} but the model is on {device}: make "
                         f"it with torch.Generator(device={str(device)!r})")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same type, and the same index where both name one (``cuda`` is ``cuda:0`` there)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**63)`` (torch's generators take int64): not a bool,
    a float (1.5 ran as 1) or a string."""
    seed = check_positive_int(seed, name, minimum=0)
    if seed >= 2**63:
        raise ValueError(f"{name} must be below 2**63, got {seed}")
    return seed


def check_int_fields(config: object, minimum: dict[str, int]) -> None:
    """Every ``config.<name>`` is an integer (numpy's included, stored back as an ``int``;
    not a bool) of at least ``minimum[name]`` and below ``2**63`` (torch's int64: a larger
    seed failed deep inside with an unnamed overflow)."""
    cls = type(config).__name__
    for name, low in minimum.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{cls}.{name} must be an int >= {low}, got {value!r}"
                             + _type_note(value))
        if value >= 2**63:
            raise ValueError(f"{cls}.{name} must be below 2**63, got {value!r}")
        if type(value) is not int:  # (a numpy integer: the config is saved as YAML/JSON)
            object.__setattr__(config, name, int(value))  # (a frozen dataclass too)


def _type_note(value: object) -> str:
    """`` (a Tensor)`` for a value of a type that is no number here, whatever it holds."""
    if isinstance(value, (bool, numbers.Real, str)) or value is None:
        return ""
    return f" (a {type(value).__name__}: pass a Python or numpy number)"


#: The largest finite float32 (a trainer's real setting beyond it overflows in its tensors).
FLOAT32_MAX = 3.4028234663852886e38


def check_real_field(
    config: object, name: str, *, minimum: float, strict: bool = False,
    maximum: float = math.inf, allow_none: bool = False,
) -> None:
    """``config.<name>`` is a finite real number (not a bool) ``>= minimum`` (``> minimum``
    when ``strict``) and ``< maximum``, or ``None`` when ``allow_none``.

    The error names the field as ``<ConfigClass>.<name>`` and shows the bad value. A numpy
    number is stored back as a Python ``int``/``float`` (the config is saved as YAML/JSON).
    """
    value = getattr(config, name)
    if value is None and allow_none:
        return
    try:  # (math.isfinite of an int beyond float's range raises OverflowError)
        ok = (
            is_real_number(value) and math.isfinite(value)
            and (value > minimum if strict else value >= minimum) and value < maximum
        )
    except OverflowError:
        ok = False
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum < math.inf:
            bound += f" and < {maximum}"
        none = " or None" if allow_none else ""
        raise ValueError(
            f"{type(config).__name__}.{name} must be a finite number {bound}{none}, "
            f"got {value!r}" + _type_note(value)
        )
    if abs(float(value)) > FLOAT32_MAX:  # (weight_decay=1e300 failed in Adam after it began)
        raise ValueError(f"{type(config).__name__}.{name} must lie within float32's range "
                         f"(at most {FLOAT32_MAX:.4g} in size): the trainers compute in "
                         f"float32, got {value!r}")
    if type(value) not in (int, float):  # (a numpy number)
        builtin = int(value) if isinstance(value, numbers.Integral) else float(value)
        object.__setattr__(config, name, builtin)  # (a frozen dataclass too)


def check_choice_field(config: object, name: str, choices: Sequence[str]) -> None:
    """``config.<name>`` is one of ``choices``; the error names ``<ConfigClass>.<name>``."""
    value = getattr(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{type(config).__name__}.{name} must be one of {', '.join(map(repr, choices))}, "
            f"got {value!r}"
        )


#: The device types the library runs on (a ``meta`` device was accepted and failed deep
#: inside, naming no setting).
DEVICE_TYPES = ("cpu", "cuda")


def supported_device(value: str | torch.device, name: str = "device") -> torch.device:
    """``torch.device(value)``, refused (ValueError naming ``name``) unless its type is in
    :data:`DEVICE_TYPES`. Checked where a device is used, not where a config is read: a
    saved run's config still loads, to run elsewhere (``--device cpu``)."""
    device = torch.device(value)
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} {str(value)!r}: the device type {device.type!r} is not one "
                         f"this library runs on ({', '.join(DEVICE_TYPES)})")
    return device


def check_device_field(config: object, name: str = "device") -> None:
    """``config.<name>`` is ``None`` or a device string torch can parse (``"cpu"``,
    ``"cuda:0"``...); whether that device is present, and of a type the library runs on
    (:func:`supported_device`), is checked where it is used."""
    value = getattr(config, name)
    if value is None:
        return
    try:
        if not isinstance(value, (str, torch.device)):  # torch.device(5) is cuda:5
            raise TypeError(value)
        torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"{type(config).__name__}.{name} must be None or a device such as 'cpu' or "
            f"'cuda', got {value!r}"
        ) from err


def check_bool_field(config: object, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise ValueError(f"{type(config).__name__}.{name} must be True or False, got {value!r}")


def feature_index(features: object, n_features: int, name: str = "features") -> Tensor:
    """Turn indices or a bool mask over ``n_features`` into a sorted-as-given LongTensor.

    Raises for out-of-range, duplicated or empty selections.
    """
    if isinstance(features, Tensor):
        idx = features
    else:
        try:
            idx = torch.as_tensor(features)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be indices or a bool mask, got {features!r}") from err
    idx = idx.cpu()
    if idx.dim() > 1:
        raise ValueError(f"{name} must be a 1-D sequence of indices or a bool mask of shape "
                         f"({n_features},), got shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError(f"{name} selects no features")
    if idx.dtype == torch.bool:
        if tuple(idx.shape) != (n_features,):
            raise ValueError(
                f"{name} as a bool mask must have shape ({n_features},), got {tuple(idx.shape)}"
            )
        idx = idx.nonzero().flatten()
    elif idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"{name} must be integer indices or a bool mask, got dtype {idx.dtype}")
    elif idx.dtype == torch.uint8:  # torch's old mask dtype: a 0/1 mask read as indices
        raise TypeError(f"{name} is a uint8 tensor, which could be a mask or indices: pass a "
                        "bool mask (.bool()) or int64 indices (.long())")
    idx = idx.long().flatten()
    if idx.numel() == 0:
        raise ValueError(f"{name} selects no features")
    if int(idx.min()) < 0 or int(idx.max()) >= n_features:
        raise ValueError(
            f"{name} must lie in [0, {n_features}), got values from {int(idx.min())} "
            f"to {int(idx.max())}"
        )
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{name} contains duplicated feature indices")
    return idx
