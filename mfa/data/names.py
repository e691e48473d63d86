"""The dataset names :func:`mfa.data.load_dataset` accepts, defined once for the whole package.

:data:`DatasetName` is the ``Literal`` type of the names and :data:`DATASET_NAMES` its values in
order; :func:`normalise_name` maps what a user typed (any case, ``_`` or ``-``, a few aliases)
to one of them.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DATASET_NAMES", "DatasetName", "canonical_name", "normalise_name"]

#: A dataset name accepted by :func:`mfa.data.load_dataset`.
DatasetName = Literal["embedded-mnist", "mnist", "fashion-mnist", "svhn", "celeba", "folder"]
#: The values of :data:`DatasetName`, in order.
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)

_ALIASES = {
    "embedded": "embedded-mnist",
    "mnist5k": "embedded-mnist",
    "mnist-5k": "embedded-mnist",
    "fashion": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "celeb-a": "celeba",
    "image-folder": "folder",
    "imagefolder": "folder",
}


def normalise_name(name: object) -> str:
    """The :data:`DatasetName` that ``name`` means (case and ``_``/``-`` ignored, aliases such
    as ``"fmnist"`` resolved); ``TypeError``/``ValueError`` for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def canonical_name(name: object) -> object:
    """:func:`normalise_name` of ``name`` where it names a dataset, else ``name`` unchanged
    (for a caller whose own check reports the bad value, e.g. the config's typed fields)."""
    try:
        return normalise_name(name)
    except (TypeError, ValueError):
        return name
