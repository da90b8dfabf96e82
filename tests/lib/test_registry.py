"""The one registry type: insertion order, a clear error for an unknown name, no duplicates."""

from dataclasses import dataclass

import pytest

from explorer.errors import PlanError
from explorer.registry import Registry


@dataclass(frozen=True)
class Item:
    name: str


def test_lists_in_order_and_refuses_unknown_names_and_duplicates():
    registry = Registry("widget", [Item("b"), Item("a")])
    assert registry.names() == ["b", "a"] and list(registry) == ["b", "a"] and len(registry) == 2
    assert registry["a"] == Item("a") and "a" in registry and "c" not in registry
    assert registry.items() == [("b", Item("b")), ("a", Item("a"))]
    with pytest.raises(PlanError, match=r"Unknown widget 'c'\. Choose one of: b, a\."):
        registry["c"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(Item("a"))
