"""A small name -> object registry with helpful errors.

Every pluggable thing in onp (datasets, models, attacks, ASR estimators, defenses, agents) lives
in a :class:`Registry`, so that an unknown name always fails with the list of valid choices.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, TypeVar, overload

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
