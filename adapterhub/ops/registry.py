"""Named registries of operation methods: ``name -> configured instance``.

A registry holds instances, not classes, so a variant of a method is the same class registered again
under another name with other options::

    METHODS = Registry[Method]("combine method")

    @METHODS.register("cat", compress=False)
    @METHODS.register("svd", compress=True)
    class Linear(Method): ...

Looking up a name nobody registered raises `UnknownMethodError`, which lists the known names.
Torch-free; imported by `adapterhub.ops` modules only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ..errors import UnknownMethodError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """A mapping from method name to a configured method instance."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, /, **options: Any) -> Callable[[type[T]], type[T]]:
        """Class decorator: instantiate ``cls(name, **options)`` and register it under ``name``."""

        def decorate(cls: type[T]) -> type[T]:
            self.add(name, cls(name, **options))  # type: ignore[call-arg]
            return cls

        return decorate

    def add(self, name: str, instance: T) -> T:
        """Register an already configured instance under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = instance
        return instance

    def get(self, name: str) -> T:
        """The instance registered under ``name``; `UnknownMethodError` (listing the known names) if none."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownMethodError(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
