"""Backdoor attacks whose triggers are deterministic functions of a batch of images in [0, 1].

>>> from onp.attacks import build_attack, ATTACKS
>>> ATTACKS.names()
['badnets', 'blend', 'sig', 'trojan', 'wanet']
>>> atk = build_attack("badnets", (1, 28, 28), num_classes=10, target=0)
"""

from .badnets import BadNets
from .base import ATTACKS, MODES, Attack, AttackParamError, build_attack, register_attack
from .blend import Blend
from .sig import SIG
from .trojan import Trojan, square_logo
from .wanet import WaNet

__all__ = ["Attack", "ATTACKS", "MODES", "AttackParamError", "build_attack", "register_attack",
           "BadNets", "Blend", "Trojan", "SIG", "WaNet", "square_logo"]
