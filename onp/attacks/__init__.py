"""Backdoor attacks whose triggers are deterministic functions of a batch of images in [0, 1].

>>> from onp.attacks import build_attack, ATTACKS
>>> ATTACKS.names()
['badnets', 'blend', 'sig', 'trojan', 'wanet']
>>> atk = build_attack("badnets", (1, 28, 28), num_classes=10, target=0)

One module per attack: it defines an :class:`Attack` subclass decorated with
``@register_attack`` and lists its public names in ``__all__``. Every module of this package is
imported here (so it registers itself) and its ``__all__`` re-exported: adding an attack touches
that one file (plus its test), never this one.
"""

from ..registry import import_submodules
from .base import ATTACKS, MODES, Attack, AttackParamError, build_attack, register_attack

__all__ = ["Attack", "ATTACKS", "MODES", "AttackParamError", "build_attack", "register_attack"]
__all__ += import_submodules(__name__, __path__, globals())
