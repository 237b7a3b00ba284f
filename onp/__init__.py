"""onp: remove backdoors from trained CNNs by learned neuron pruning.

Sub-packages:

* :mod:`onp.data`: datasets, the defender's splits and augmentation;
* :mod:`onp.models`: the CNN registry shared by the env, the agents and every baseline;
* :mod:`onp.attacks`: backdoor attacks whose triggers are deterministic functions of a batch;
* :mod:`onp.metrics`: ACC, ASR, RA and DER;
* :mod:`onp.zoo`: trains and caches backdoored models (``python -m onp.backdoor``);
* :mod:`onp.defend`: defend a model you received (``onp.defend(model, clean_x, clean_y)`` or
  ``python -m onp.defend``); imported on first use, because it sits above the core.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``onp.defend`` on first use: the module, which is callable as :func:`onp.defend.defend`."""
    if name == "defend":
        import importlib

        return importlib.import_module(".defend", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
