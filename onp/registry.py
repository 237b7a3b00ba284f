"""A small name -> object registry with helpful errors.

Every pluggable thing in onp (datasets, models, attacks, ASR estimators, defenses, agents) lives
in a :class:`Registry`, so that an unknown name always fails with the list of valid choices.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Dict, Generic, Iterable, Iterator, List, MutableMapping, Optional, TypeVar, overload

T = TypeVar("T")
_D = TypeVar("_D")  # what a @register(name) decorator is applied to (returned unchanged)


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the valid choices."""

    def __init__(self, kind: str, name: str, choices: List[str]):
        self.kind, self.name, self.choices = kind, name, choices
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(choices) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Registry(Generic[T]):
    """Maps names to objects (classes or factories).

    >>> MODELS = Registry("model")
    >>> @MODELS.register("tiny")
    ... def make_tiny(): ...
    >>> MODELS.get("tiny") is make_tiny
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[_D], _D]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name: str, obj: Optional[T] = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` it is a decorator."""

        def _add(o: T) -> T:
            if name in self._items and not overwrite and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise :class:`UnknownNameError`."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def check(self, name: str) -> str:
        """Validate a name without using it (for up-front argument checking)."""
        self.get(name)
        return name

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


Factory = Callable[..., T]


def import_submodules(
    package: str, path: Iterable[str], namespace: Optional[MutableMapping[str, Any]] = None
) -> List[str]:
    """Import every module of one of onp's own packages, so that each registers what it defines.

    A package ``__init__`` calls ``import_submodules(__name__, __path__, globals())``: a new module
    (an attack, an architecture, a defense, an agent, a dataset parser) then needs no line in
    ``__init__.py``. Modules whose name starts with ``_`` are skipped.

    Args:
        package: the package's dotted name (``__name__``).
        path: the package's ``__path__``.
        namespace: the package's ``globals()``; when given, every name in a module's ``__all__`` is
            bound there too (``from onp.models import ResNet18``).

    Returns:
        The names bound into ``namespace`` (empty without one), in module order.
    """
    exported: List[str] = []
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if namespace is None:
            continue
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
            exported.append(name)
    return exported
