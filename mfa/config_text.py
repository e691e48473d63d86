"""A run config's text, up to the nested dict that :func:`mfa.config.config_from_dict`
checks: YAML files (a key given twice is refused; merge keys ``<<:`` work) and the
``"dotted.key=value"`` strings of ``--set``, a mapping value merged into the section it
names."""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["apply_override_strings", "dotted_leaves", "mapping_overrides", "override_keys",
           "parse_override", "read_yaml_mapping"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"

class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last
    silently: a second ``model:`` section would drop the first's values). Checked as each
    mapping is composed, before merge keys (``<<: *defaults``) are flattened into it: the
    keys a merge brings may be overridden, as YAML says."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key_node.value!r} twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return node


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.1's int (PyYAML's resolvers, so a saved config reads as it was written),
    refusing the two forms it reads unlike the decimal they look like: ``010`` (octal 8)
    and ``1:5`` (base 60: 65)."""
    text = loader.construct_scalar(node)
    digits = text.replace("_", "").lstrip("+-")
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    if ":" in digits:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is a base-60 number in YAML 1.1 ({value}): write the "
            "number itself, or quote it for a string", node.start_mark)
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "bx":
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is the octal {value} in YAML 1.1: write "
            f"{'-' if text.startswith('-') else ''}{int(digits, 10)} without the leading "
            f"zero (or {value} for the octal), or quote it for a string", node.start_mark)
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    """YAML 1.1's float, refusing its base-60 form (``1:0.5`` read as 60.5)."""
    text = loader.construct_scalar(node)
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if ":" in text:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is a base-60 number in YAML 1.1 ({value}): write the "
            "number itself, or quote it for a string", node.start_mark)
    return value


UniqueKeyLoader.add_constructor(_INT_TAG, _construct_int)
UniqueKeyLoader.add_constructor(_FLOAT_TAG, _construct_float)


# The configs of a source checkout's configs/ folder (the README's `--config configs/...`).
SHIPPED_CONFIGS = ("celeba", "embedded-mnist", "fashion-mnist", "mnist", "svhn")


def _shipped_hint(path: Path) -> str:
    """What to do when a missing config is one of the checkout's ``configs/<name>.yaml``
    (the README's commands, run outside the checkout, said only that it did not exist)."""
    if path.parent.name != "configs" or path.stem not in SHIPPED_CONFIGS:
        return ""
    checkout = Path(__file__).resolve().parent.parent / "configs" / path.name
    where = ("" if path.is_absolute() else f" (a path relative to the current folder, "
             f"{Path.cwd()})")
    full = (f", e.g. --config {shlex.quote(str(checkout))}"
            if checkout.is_file() and checkout != path.resolve() else "")
    return (f"{where}: the shipped configs live in the source checkout's configs/ folder "
            "(only embedded-mnist, the default of `mfa train`, ships inside the package); "
            f"run from the checkout or give the full path{full}")


def _load(text: str, name: str) -> Any:
    """``text`` read as YAML; an error's marks name ``name`` (for a string PyYAML says
    ``in "<unicode string>", line 3``, not which file), with their snippet of the text."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        for mark in (error.context_mark, error.problem_mark):
            if mark is not None:
                mark.name = name
        raise


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (``{}`` for an empty file).

    Raises:
        FileNotFoundError: ``path`` does not exist (``IsADirectoryError``: it is a folder).
        ValueError: not UTF-8, not valid YAML, a key given twice, or not a mapping at the
            top level (naming the file).
    """
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a folder, not a YAML file (a run "
                                "folder's config is its config.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist{_shipped_hint(path)}")
    try:
        data = _load(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not UTF-8 YAML text (byte {error.start} "
                         f"is {error.object[error.start:error.start + 1]!r})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level, "
                         f"got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"dotted.key=value"`` → ``(key parts, value parsed as YAML)``; an empty value is
    ``None``.

    Raises:
        ValueError: no ``=``, an empty key part, a value that is not valid YAML (a
            mapping key given twice included), or one holding a YAML comment (`` #``: the
            rest of the value was dropped without a word, ``output.name=my run #1`` naming the
            folder ``my run``), with the quoted form that keeps it.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"invalid override {text!r}: expected 'dotted.key=value', "
                         "e.g. 'train.em.max_iter=5'")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ValueError(f"invalid override {text!r}: empty key in '{key}'")
    try:
        value = _load(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"invalid override {text!r}: the value is not valid YAML "
                         f"({error})") from None
    at = _comment_at(raw)
    if at is not None:  # (a plain string cut at " #" is the likely mistake: quote it)
        quoted = shlex.quote(f"{key}={json.dumps(raw.strip(), ensure_ascii=False)}")
        how = (f"quote the value to keep the '#', e.g. --set {quoted}"
               if value is None or isinstance(value, str) else
               "remove the comment, or quote a string that holds a '#'")
        raise ValueError(f"invalid override {text!r}: {raw[at:].splitlines()[0]!r} in its "
                         f"value is a YAML comment, which would drop it (leaving {value!r}); "
                         + how)
    return parts, value


def _comment_at(text: str) -> int | None:
    """Where a YAML comment starts in ``text`` (valid YAML), or ``None``: a ``#`` between
    its tokens (one inside a token, as in ``a#b`` or a quoted string, is text)."""
    end = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        gap = text[end:token.start_mark.index]
        if "#" in gap:
            return end + gap.index("#")
        end = max(end, token.end_mark.index)
    return None


def override_keys(text: str) -> list[str]:
    """The dotted keys an override sets: its own, or for a mapping value each key inside it
    (``"model={n_factors: 2}"`` → ``["model.n_factors"]``).

    Raises:
        ValueError: an invalid override (:func:`parse_override`).
    """
    parts, value = parse_override(text)
    key = ".".join(parts)
    return list(dotted_leaves(value, f"{key}.")) if isinstance(value, dict) and value else [key]


def mapping_overrides(data: Mapping[str, Any]) -> list[str]:
    """The ``"key=value"`` override strings that lay the config tree ``data`` over another
    (one per top-level key, its value as YAML flow text: a section sets the keys it gives
    and keeps the others, :func:`apply_override_strings`). ``mfa train --resume`` applies a
    ``--config`` so: the keys the file leaves out keep the run's values, not the defaults."""
    def flow(value: Any) -> str:  # (a scalar's document ends in "...": dropped)
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
        return text.removesuffix("...").strip()

    return [f"{key}={flow(value)}" for key, value in data.items()]


def drop_empty_sections(data: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the sections it leaves empty: a key whose value is ``None`` or ``{}``
    (a YAML section whose keys are all commented out) where ``template`` (the defaults'
    tree) holds a section. Laid over a run's config (:func:`mapping_overrides`), such a
    section reset every key of it to the defaults. ``None`` stays where it is a value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        section = template.get(key) if isinstance(template, Mapping) else None
        if isinstance(section, Mapping) and (value is None or value == {}):
            continue
        out[key] = (drop_empty_sections(value, section)
                    if isinstance(value, Mapping) and isinstance(section, Mapping) else value)
    return out


def dotted_leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value, ...}``: the values of a nested mapping by dotted key (an empty
    mapping has none)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.update(dotted_leaves(value, f"{path}.") if isinstance(value, Mapping)
                   else {path: value})
    return out


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    """Set ``value``'s keys in ``into``, section by section (a mapping into a mapping; each
    section written is a copy of its own, see :func:`apply_override_strings`)."""
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(into.get(key), dict):
            into[key] = dict(into[key])
            _merge(into[key], item)
        else:
            into[key] = copy.deepcopy(item)


def apply_override_strings(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the config tree ``data`` with ``overrides`` applied in order. A mapping
    value given to a section (``model={n_factors: 2}``) sets those keys and keeps the
    section's others (it replaced the whole section: the file's other values fell back to
    their defaults).

    Raises:
        ValueError: an invalid override, or a dotted path through a value, not a section.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    # Every section an override writes is first copied: a YAML alias (`root_em: *em`) gives
    # two keys one dict, which deepcopy keeps shared, and the override of one set the other's.
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ValueError(f"invalid override {text!r}: '{section}' is a value "
                                 f"({child!r}), not a section")
            node[part] = node = dict(child)
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = dict(node[parts[-1]])
            _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return data
