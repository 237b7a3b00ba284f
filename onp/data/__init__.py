"""Datasets, the defender's splits and augmentation.

>>> from onp.data import load_dataset
>>> ds = load_dataset("fashion-mnist", source="sample")
"""

from . import idx as _idx  # noqa: F401  (registers fashion-mnist and mnist)
from .registry import DATASETS, DataRequest, DatasetNotFoundError, dataset_spec, load_dataset, register_dataset
from .spec import Dataset, DatasetSpec, ImageSet

try:  # CIFAR-10/100 and GTSRB parsers register themselves when present
    from . import cifar as _cifar  # noqa: F401
    from . import gtsrb as _gtsrb  # noqa: F401
except ImportError:  # pragma: no cover - during development only
    pass

__all__ = ["DATASETS", "DataRequest", "DatasetNotFoundError", "Dataset", "DatasetSpec", "ImageSet",
           "dataset_spec", "load_dataset", "register_dataset"]
