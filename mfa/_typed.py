"""Checking YAML values against type annotations, for :mod:`mfa.config`: ``None``, unions,
``Literal`` choices, bools/ints/strings (a bool is not an int), finite floats (PyYAML's
``1e-3`` strings included), lists and nested dataclass sections. Errors name the key path."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["bad", "coerce", "describe", "over_section_defaults"]


def bad(path: str, value: Any, problem: str) -> ValueError:
    """The error for a bad ``value`` at ``path``."""
    return ValueError(f"invalid value for {path}: {problem}, got {value!r}")


def describe(hint: Any) -> str:
    origin = get_origin(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(hint))
    if origin in (list, tuple, Sequence):
        args = get_args(hint)
        return f"a list of ({describe(args[0])})" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    names = {int: "an int", float: "a float", bool: "a bool", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _quote_hint(value: Any, hint: Any, path: str) -> str:
    """For a string field given a number or bool (YAML reads ``2024`` or ``yes`` unquoted as
    one): how to pass the string."""
    allowed = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if str in allowed and isinstance(value, (bool, numbers.Number)):
        kind = "a bool" if isinstance(value, bool) else "a number"
        return (f" (YAML reads the text unquoted as {kind}: quote it in the file, or on a "
                f"command line --set '{path}=\"...\"')")
    return ""


_FLOAT_STRING = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def coerce(value: Any, hint: Any, path: str, build: Callable[[type, Any, str], Any]) -> Any:
    """Check ``value`` against the annotation ``hint``; return it (ints become floats). A
    mapping for a dataclass annotation is handed to ``build(cls, mapping, path)``."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path, build)
            except ValueError:
                if isinstance(value, Mapping) and dataclasses.is_dataclass(arg):
                    raise  # a section (e.g. `EMConfig | None`): its own error names the key
                continue
        raise bad(path, value, f"expected {describe(hint)}{_quote_hint(value, hint, path)}")
    if origin is Literal:
        options = get_args(hint)
        if any(value == option and type(value) is type(option) for option in options):
            return value
        raise bad(path, value, f"expected {describe(hint)}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            value = dataclasses.asdict(value)
        return build(hint, value, path)
    if hint in (bool, int, str):  # bool is an int subclass: an int field refuses True
        if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
            return value
        if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # a numpy integer
        expected = {bool: "a bool (true or false)", int: "an int", str: "a string"}[hint]
        raise bad(path, value, f"expected {expected}{_quote_hint(value, hint, path)}")
    if hint is float:
        if isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, numbers.Real) and not isinstance(value, bool):  # (numpy's too)
            try:  # (an int beyond float's range overflows)
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise bad(path, value, "expected a finite float")
            return number
        raise bad(path, value, "expected a float")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad(path, value, f"expected {describe(hint)}")
        args = get_args(hint)
        item_hint = args[0] if args else Any
        items = [coerce(item, item_hint, f"{path}[{i}]", build) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value  # an annotation this module does not know: no check


def over_section_defaults(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (the mapping of the dataclass ``cls``) with each nested section it gives laid
    over that field's own default: a section whose default differs from its class's (e.g. a
    run's ``EMConfig(checkpoint_every=1)``) keeps those values for the keys the mapping
    leaves out, instead of falling back to the class defaults."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        given = isinstance(value, Mapping) or (value is None and f.name in out)
        if not given or f.default_factory is dataclasses.MISSING:
            continue
        default = f.default_factory()
        if not dataclasses.is_dataclass(default):
            continue
        # An empty section (`em:` with every key commented out, or `null`) is that field's
        # default, as an omitted one is (it was the class's: checkpoint_every=0, not 1).
        value = {} if value is None else value
        plain = type(default)()
        changed = {g.name: getattr(default, g.name) for g in dataclasses.fields(default)
                   if g.init and getattr(default, g.name) != getattr(plain, g.name)}
        changed = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                   for k, v in changed.items()}
        out[f.name] = {**changed, **value}
    return out
