"""Checks of a plan that need no scores: field types, and plans no scoring could make valid.

A plan comes from JSON someone else wrote (a file, the app's API), so a field may hold the wrong
type (``"protect_first": "two"``): that is refused with the field's name, not met later as a
``TypeError`` deep in the resolution. A plan that protects more layers than the model has, or whose
ratios remove every head or channel of a layer, is refused before the calibration pass, which is
the expensive part of resolving it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..errors import PlanError


def check_types(plan: Any) -> None:
    """Raise ``PlanError`` naming the first field whose value does not have its declared type
    (and for window counts and lengths below what a window needs)."""
    hints = get_type_hints(type(plan))
    for f in fields(plan):
        value = getattr(plan, f.name)
        if not _fits(value, hints[f.name]):
            raise PlanError(
                f"Plan field '{f.name}' is {value!r}; it must be {_describe(hints[f.name])}."
            )
    for name, least in (("calibration_windows", 1), ("calibration_length", 2)):
        if getattr(plan, name) < least:
            raise PlanError(f"{name} = {getattr(plan, name)} is out of range; use {least} or more.")


def _fits(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if origin is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        item = _describe(get_args(tp)[0]).split(" ", 1)[1]  # "a number" -> "number"
        return f"a list of {item}s"
    names = {float: "a number", int: "a whole number", str: "a text", bool: "true or false"}
    return names.get(tp, "null" if tp is type(None) else "an object")


def check_layers(plan: Any, num_layers: int) -> None:
    """Refuse what no scores can rescue, before any scoring: protection and emptied layers."""
    protected = plan.protect_first + plan.protect_last
    if protected > num_layers:
        raise PlanError(
            f"The plan protects {protected} layers (first {plan.protect_first}, last "
            f"{plan.protect_last}) but the model has {num_layers}. Protect fewer layers."
        )
    removes = any(r for r in (plan.target, plan.head_ratio, plan.mlp_ratio) if r)
    if plan.allocation != "per_layer" and protected == num_layers and removes:
        raise PlanError(
            f"The plan protects all {num_layers} layers, so nothing can be pruned. "
            "Protect fewer layers."
        )
    if plan.allocation == "global" and (plan.target or 0.0) >= 1.0:
        raise PlanError("A target of 1 removes every unit of every layer. Lower the target.")
    for layer, heads, mlp in _ratios(plan, num_layers):
        if heads >= 1.0:
            raise PlanError(
                f"The plan removes every attention head of layer {layer}. "
                "Lower that layer's head ratio, or remove the whole layer instead."
            )
        if mlp >= 1.0:
            raise PlanError(
                f"The plan removes every MLP channel of layer {layer}. "
                "Lower that layer's MLP ratio, or remove the whole layer instead."
            )


def _ratios(plan: Any, n: int) -> list[tuple[int, float, float]]:
    """(layer, head ratio, MLP ratio) for the layers a uniform or per-layer plan cuts."""
    if plan.allocation == "per_layer":
        heads = plan.head_ratios or [0.0] * n
        mlp = plan.mlp_ratios or [0.0] * n
        return [(i, heads[i], mlp[i]) for i in range(n) if i not in plan.remove_layers]
    if plan.allocation != "uniform":
        return []
    layers = [
        i for i in range(plan.protect_first, n - plan.protect_last) if i not in plan.remove_layers
    ]
    if plan.head_ratio is not None or plan.mlp_ratio is not None:
        return [(i, plan.head_ratio or 0.0, plan.mlp_ratio or 0.0) for i in layers]
    # The target spread over the unprotected layers: each of them loses more.
    share = (plan.target or 0.0) * n / max(len(layers), 1)
    if share > 1.0:
        raise PlanError(
            f"Removing {plan.target:.0%} of the block parameters from only {len(layers)} "
            "unprotected layers is impossible. Protect fewer layers or lower the target."
        )
    return [(i, share, share) for i in layers]
