"""Image datasets as flat uint8 rows of pixels: loading, splitting, dequantisation.

``load_dataset(name, root)`` reads one of :data:`DATASET_NAMES` into an :class:`ImageData`
(uint8 rows ``[N, D]`` in CHW order, split into train/val/test by seed, converted to float one
batch at a time). ``docs/data.md`` describes each dataset's files, the splits, the value
scales and dequantisation. The modules:

* :mod:`~mfa.data.names`: the dataset names (:data:`DatasetName`, :data:`DATASET_NAMES`).
* :mod:`~mfa.data.layout`: CHW rows ↔ images, ``pixel/255``, dequantisation.
* :mod:`~mfa.data.splits`: seeded random streams and the train/val/test assignment.
* :mod:`~mfa.data.image_data`: :class:`ImageData` and :class:`ImageDataset`.
* :mod:`~mfa.data.sources`: one module per dataset family.
* :mod:`~mfa.data.transforms`, :mod:`~mfa.data.decode`: crop/resize; decoding files (cached).
* :mod:`~mfa.data.load`: :func:`load_dataset`.
"""

from mfa.data.image_data import ImageData, ImageDataset
from mfa.data.layout import (
    LOG_PIXEL_LEVELS,
    PIXEL_LEVELS,
    check_image_shape,
    dequantize,
    pixels_to_float,
    to_images,
    to_rows,
)
from mfa.data.load import load_dataset
from mfa.data.locations import DatasetNotFoundError, default_cache_dir, default_data_root
from mfa.data.names import DATASET_NAMES, DatasetName
from mfa.data.sources import CELEBA_CROP, FASHION_MNIST_DEBIAN_DIR, IMAGE_EXTENSIONS
from mfa.data.splits import SPLITS, Split
from mfa.metrics import bits_per_dim  # re-exported: the conversion belongs with the metrics

#: The former private name, still imported by :mod:`mfa.viz`; use :func:`check_image_shape`.
_check_image_shape = check_image_shape

__all__ = [
    "CELEBA_CROP",
    "DATASET_NAMES",
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGE_EXTENSIONS",
    "LOG_PIXEL_LEVELS",
    "PIXEL_LEVELS",
    "SPLITS",
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
