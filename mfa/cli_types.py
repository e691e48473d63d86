"""The ``mfa`` command's argparse value types: each parses one option's text or raises
``argparse.ArgumentTypeError`` naming the problem (argparse adds the option's name)."""

from __future__ import annotations

import argparse
import math
import os

from mfa.data.names import normalise_name

__all__ = ["dataset_name", "finite", "fraction", "non_empty", "non_negative_int",
           "one_of_several", "positive_int"]


def _count_type(minimum: int):
    """An argparse type: an int of at least ``minimum`` (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value >= 2**63:  # torch takes int64 (seeds, sizes)
            raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
        return value

    return parse


positive_int = _count_type(1)
non_negative_int = _count_type(0)


def fraction(text: str) -> float:
    """An argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def dataset_name(text: str) -> str:
    """An argparse type: a dataset name or an alias that ``mfa.data.load_dataset`` takes."""
    try:
        return normalise_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def finite(text: str) -> float:
    """An argparse type: a finite float (nan or inf would draw a blank or saturated image)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_empty(what: str):
    """An argparse type: any text but an empty one (``--device ""`` and ``--mask-image ""``
    were taken for the option not given: the run's device, a centre mask), which is refused
    asking for ``what``."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty: give {what}")
        return text

    return parse


def one_of_several(option: str, choices: tuple[str, ...] | None = None, parse=None):
    """An argparse type for a value of ``option``, an option of several values (``nargs="+"``,
    which takes every word after it): one of ``choices``, or ``parse(text)``. A word that
    is not one but is a path that exists is told to come before ``option``: `mfa evaluate
    --split val RUN` took the run folder for a split (and `mfa visualize --components 0 1
    RUN` for a component) and said only "invalid choice"."""

    def convert(text: str):
        try:
            if choices is not None:
                if text not in choices:
                    raise argparse.ArgumentTypeError(
                        f"invalid choice: {text!r} (choose from {', '.join(choices)})")
                return text
            try:
                return parse(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        except argparse.ArgumentTypeError as error:
            if text and os.path.exists(text):
                raise argparse.ArgumentTypeError(
                    f"{error}; {text} is a path: give the run folder before {option}, whose "
                    "values take every word after it") from None
            raise

    return convert
