"""Argument checks shared by the data modules; each error names the argument and the value."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_fraction",
    "check_nonnegative_int",
    "check_positive_int",
    "check_uint8",
]


def check_uint8(x: object, name: str) -> None:
    """``x`` must be a uint8 tensor of pixel levels (``TypeError`` otherwise)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor of pixel levels 0..255, got {x.dtype}")


def check_positive_int(v: object, name: str) -> None:
    """``v`` must be an int ≥ 1 (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_nonnegative_int(v: object, name: str) -> None:
    """``v`` must be an int ≥ 0 (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def check_fraction(v: object, name: str) -> None:
    """``v`` must be a number in ``[0, 1)`` (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")


def check_bool(v: object, name: str) -> None:
    """``v`` must be ``True`` or ``False`` (the string ``"false"`` would count as true)."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
