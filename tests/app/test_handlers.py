"""Panel handlers: bound to their panel, they keep what Gradio reads from a signature."""

from __future__ import annotations

import inspect

import gradio as gr
from gradio.utils import get_type_hints

from components.state import TRACK, handler


def plain(panel, state, values: dict, progress=TRACK) -> dict:
    return {panel: values[state]}


def streaming(panel, state, values: dict, request: gr.Request):
    yield {panel: (values[state], request)}


def test_a_bound_handler_keeps_its_signature_hints_and_streaming():
    bound = handler(plain, "panel", "state")
    assert list(inspect.signature(bound).parameters) == ["values", "progress"]
    assert inspect.signature(bound).parameters["progress"].default is TRACK
    assert bound({"state": 3}) == {"panel": 3}
    streamed = handler(streaming, "panel", "state")
    assert inspect.isgeneratorfunction(streamed)
    assert get_type_hints(streamed)["request"] is gr.Request  # what Gradio injects by
    assert list(streamed({"state": 1}, "req")) == [{"panel": (1, "req")}]
