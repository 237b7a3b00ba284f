"""The model registry: one definition per architecture, shared by the env, agents and baselines.

>>> from onp.models import build_model
>>> model = build_model("resnet18", num_classes=10, in_channels=1, width=16)

One module per architecture family: it decorates each class with
``@register_model("name", default_width=...)`` (:mod:`onp.models.base`) and lists it in ``__all__``.
Every module of this package is imported here (so it registers itself) and its ``__all__``
re-exported: adding an architecture touches that one file (plus its test), never this one.
"""

from ..registry import import_submodules
from .base import DEFAULT_WIDTH, MODELS, build_model, build_model_for, find_last_linear, model_digest, register_model
from .normalize import Normalize

__all__ = [
    "MODELS", "DEFAULT_WIDTH", "build_model", "build_model_for", "find_last_linear", "model_digest", "register_model",
    "Normalize",
]  # fmt: skip
__all__ += import_submodules(__name__, __path__, globals())
