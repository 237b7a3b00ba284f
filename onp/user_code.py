"""Import a class or factory that the user named: ``path/to/file.py:Name`` or ``package.module:Name``.

This is the one place where onp imports code it was not shipped with (``--agent my_agent.py:Agent``,
``python -m onp.defend --arch my_net.py:Net``). It runs that code, so callers use it only for a spec
the user typed (a flag or a Python call), never for one read from a file (a config, a run folder).

>>> is_code_spec("my_agent.py:Agent"), is_code_spec("resnet18"), is_code_spec("ranked:rnp")
(True, False, False)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List, Tuple

__all__ = ["import_object", "is_code_spec", "split_spec", "MODULE_PREFIX"]

#: the ``sys.modules`` name of an imported file is this prefix and its resolved path (non-word characters as ``_``)
MODULE_PREFIX = "onp_user_code_"
#: what a spec looks like (the end of every "malformed" message)
EXPECTED = "path/to/file.py:ClassName or package.module:ClassName"


def split_spec(spec: str) -> Tuple[str, str]:
    """``(file or module, attribute)`` of ``spec``, split at its last ``:`` (``("", spec)`` without one)."""
    left, _, attr = spec.strip().rpartition(":")
    return left, attr


def _is_file(left: str) -> bool:
    return left.endswith(".py") or "/" in left or "\\" in left


def is_code_spec(spec: str) -> bool:
    """Whether ``spec`` has the shape of a code reference: a file (``*.py``, or a path) or a dotted
    module before its last ``:``. Registry names (``resnet18``) and ``name:argument`` specs
    (``ranked:rnp``: no dot, no path) are not."""
    left, _ = split_spec(spec)
    return bool(left) and (_is_file(left) or "." in left)


def _defined_classes(module: ModuleType) -> List[str]:
    return sorted(n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)


def _import_file(file: Path, spec: str, what: str) -> ModuleType:
    if not file.is_file():
        raise FileNotFoundError(f"{what} file not found: {file} (no such file; from {what} {spec})")
    name = MODULE_PREFIX + re.sub(r"\W", "_", str(file.resolve()))
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} {spec}: cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ValueError(f"importing {what} file {file} failed: {type(exc).__name__}: {exc}") from exc
    return module


def import_object(spec: str, what: str) -> Any:
    """The class or factory that ``spec`` names, imported (this runs the user's code).

    Args:
        spec: ``path/to/file.py:Name`` (a file: the part before the last ``:`` ends in ``.py`` or holds
            a path separator) or ``package.module:Name`` (an importable module); ``Name`` may be dotted
            (``Outer.Inner``).
        what: what the spec is, as the user gave it, for the messages: ``"agent"``, ``"--arch"``.

    Returns:
        The callable (a class or a factory function).

    Raises:
        ValueError: a malformed spec (no ``:``, no name, a name that is not an identifier), a file that
            cannot be imported or fails while importing (the exception is named), a module that cannot be
            imported, no such attribute (the classes defined there are listed), or an attribute that is
            not callable.
        FileNotFoundError: the file does not exist.
    """
    left, attr = split_spec(spec)
    if not left or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"malformed {what} spec {spec!r}; expected {EXPECTED}")
    if _is_file(left):
        file = Path(left).expanduser()
        module = _import_file(file, spec, what)
        where = str(file)
    else:
        try:
            module = importlib.import_module(left)
        except ImportError as exc:
            raise ValueError(f"{what} {spec}: cannot import module {left!r}: {exc}") from exc
        where = left
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{what} {spec}: {where} has no attribute {attr!r}; classes defined there: "
                f"{', '.join(_defined_classes(module)) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec}: {attr} is not a class or factory")
    return obj
