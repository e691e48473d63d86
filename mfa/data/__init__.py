"""Image datasets as flat uint8 rows of pixels: loading, splitting, dequantisation.

``load_dataset(name, root)`` reads one of :data:`DATASET_NAMES` into an :class:`ImageData`
(uint8 rows ``[N, D]`` in CHW order, split into train/val/test by seed, converted to float one
batch at a time). ``docs/data.md`` describes each dataset's files, the splits, the value
scales and dequantisation. The modules:

* :mod:`~mfa.data.names`: the dataset names (:data:`DatasetName`, :data:`DATASET_NAMES`).
* :mod:`~mfa.data.layout`: CHW rows ↔ images, ``pixel/255``, dequantisation.
* :mod:`~mfa.data.splits`: seeded random streams and the train/val/test assignment.
* :mod:`~mfa.data.image_data`: :class:`ImageData` and :class:`ImageDataset`.
* :mod:`~mfa.data.quantized`: :class:`QuantizedRows` (uint8 rows a trainer makes float per
  batch, on its device).
* :mod:`~mfa.data.sources`: one module per dataset family.
* :mod:`~mfa.data.transforms`, :mod:`~mfa.data.decode`: crop/resize; decoding files (cached).
* :mod:`~mfa.data.load`: :func:`load_dataset`.
"""

import importlib

# Light modules are imported now; the loaders (which import PIL, torchvision and scipy) only
# when one of their names is first used, so that `mfa.config` and `mfa.masks` can take the
# dataset names and the pixel layout from here without loading an imaging library.
from mfa.data.layout import (
    LOG_PIXEL_LEVELS,
    PIXEL_LEVELS,
    check_image_shape,
    dequantize,
    pixels_to_float,
    to_images,
    to_rows,
)
from mfa.data.names import DATASET_NAMES, DatasetName
from mfa.data.quantized import QuantizedRows
from mfa.data.splits import SPLITS, Split

_LAZY = {
    "ImageData": "mfa.data.image_data",
    "ImageDataset": "mfa.data.image_data",
    "load_dataset": "mfa.data.load",
    "DatasetNotFoundError": "mfa.data.locations",
    "default_cache_dir": "mfa.data.locations",
    "default_data_root": "mfa.data.locations",
    "CELEBA_CROP": "mfa.data.sources",
    "FASHION_MNIST_DEBIAN_DIR": "mfa.data.sources",
    "IMAGE_EXTENSIONS": "mfa.data.sources",
    "bits_per_dim": "mfa.metrics",  # re-exported: the conversion belongs with the metrics
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mfa.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CELEBA_CROP",
    "DATASET_NAMES",
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGE_EXTENSIONS",
    "LOG_PIXEL_LEVELS",
    "PIXEL_LEVELS",
    "SPLITS",
    "QuantizedRows",
    "DatasetName",
    "DatasetNotFoundError",
    "ImageData",
    "ImageDataset",
    "Split",
    "bits_per_dim",
    "check_image_shape",
    "default_cache_dir",
    "default_data_root",
    "dequantize",
    "load_dataset",
    "pixels_to_float",
    "to_images",
    "to_rows",
]
