"""Datasets, the defender's splits and augmentation.

>>> from onp.data import load_dataset
>>> ds = load_dataset("fashion-mnist", source="sample")

Every module of this package is imported here: a dataset is one module calling
:func:`register_dataset` (plus its test), with no line in this file.
"""

from ..registry import import_submodules
from .registry import DATASETS, DataRequest, DatasetNotFoundError, dataset_spec, load_dataset, register_dataset
from .spec import Dataset, DatasetSpec, ImageSet

__all__ = [
    "DATASETS",
    "DataRequest",
    "DatasetNotFoundError",
    "Dataset",
    "DatasetSpec",
    "ImageSet",
    "dataset_spec",
    "load_dataset",
    "register_dataset",
]

import_submodules(__name__, __path__)  # each parser module (idx, cifar, gtsrb, ...) registers its datasets
