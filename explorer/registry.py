"""One registry type for everything the catalogue lists by name (criteria, recovery steps).

A registry is filled once, explicitly, in ``explorer.catalogue``; nothing registers itself on import.
Looking up an unknown name raises ``PlanError`` naming the choices, which is what the CLI and the
app show the user.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from .errors import PlanError


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Named items in the order they were added; ``registry[name]`` or a clear ``PlanError``."""

    def __init__(self, noun: str, items: Iterable[T] = ()):
        self.noun = noun
        self._items: dict[str, T] = {}
        for item in items:
            self.add(item)

    def add(self, item: T) -> T:
        if item.name in self._items:
            raise ValueError(f"{self.noun} '{item.name}' is registered twice")
        self._items[item.name] = item
        return item

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise PlanError(f"Unknown {self.noun} '{name}'. Choose one of: {', '.join(self)}.")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
