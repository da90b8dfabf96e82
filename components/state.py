"""What the panels share: the loaded models (one copy for every browser session), the lock that
serialises heavy work on them, each session's own plan and results, and small UI helpers.

A loaded model with its data and caches (an ``Explorer``) is keyed by everything that determines
it (source, dtype, calibration and evaluation text, window counts), so two sessions that ask for the
same thing share one copy and its cached statistics and scores. Everything that differs between
sessions (the plan, the last preview, the selected node) lives in ``SessionState``, held by a
``gr.State`` per browser tab.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path
from typing import Any

import gradio as gr
from torch import nn

from explorer.catalogue import CRITERIA
from explorer.errors import ExplorerError
from explorer.planning.plan import Plan
from explorer.planning.selection import Selection
from explorer.policy import AccessPolicy
from explorer.progress import Progress
from explorer.scoring.base import Needs
from explorer.session import Explorer

# The default that tells Gradio to pass a progress tracker (it replaces it with one per call).
TRACK = gr.Progress()
# Head similarity needs attention probabilities; collecting them with the plan's criterion's needs
# in one calibration pass means switching to the Heads panel never re-reads the data.
ATTENTION = Needs(attention=True)


@dataclass(frozen=True)
class Settings:
    """What a load is made with: the app's start-up choices, with the calibration amount replaced
    by the Model tab's inputs on each load (tests use fewer windows to stay fast)."""

    default_model: str = "smollm2-135m"
    calibration_windows: int = 10
    calibration_length: int = 64
    evaluation_length: int = 256
    evaluation_windows: int | None = None


@dataclass
class Loaded:
    """One loaded model with its data: shared by every session that loaded the same thing."""

    key: str
    explorer: Explorer
    summary: dict
    # The arguments of ``Shared.open`` it was made with (``Shared.reopen``, ``settings``); an
    # entry made by hand (tests) has none and cannot be recalibrated.
    opened: tuple = ()
    dense_ppl: float | None = None  # set by the first preview that ran to the end
    dense_offdomain: float | None = None  # the same, on the second text domain

    @property
    def settings(self) -> Settings:
        return self.opened[-1]

    @property
    def structure(self):
        return self.explorer.structure


class Shared:
    """The loaded models, at most ``capacity`` of them, and one lock for all heavy work.

    One lock, not one per model: two models on one small machine gain nothing from running at
    once, and masks put on a shared model by one session must never be seen by another.
    """

    def __init__(self, capacity: int = 2):
        self.lock = threading.Lock()
        self.capacity = capacity
        self._entries: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, key: str | None) -> Loaded:
        if key is None or key not in self._entries:
            raise gr.Error(
                "No model is loaded in this session (or it was unloaded to make room). "
                "Press Load on the Model tab."
            )
        self._entries.move_to_end(key)
        return self._entries[key]

    def open(
        self,
        source: str,
        dtype: str,
        calibration: dict,
        evaluation: dict,
        settings: Settings,
        progress: Progress,
        policy: AccessPolicy,
    ) -> Loaded:
        """The shared entry for this model and data, loading it (under the lock) if needed.

        ``policy`` is checked first: a source or a calibration amount it does not allow is
        never opened. The key holds the calibration amount, so sessions that calibrate
        differently never share statistics.
        """
        policy.check_model(source)
        policy.check_text_source(calibration)
        policy.check_text_source(evaluation)
        policy.check_calibration(settings.calibration_windows, settings.calibration_length)
        key = json.dumps(
            [source, dtype, calibration, evaluation, settings.__dict__], sort_keys=True
        )
        with self.lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            recipe = Plan(
                model=source,
                calibration=calibration,
                evaluation=evaluation,
                calibration_windows=settings.calibration_windows,
                calibration_length=settings.calibration_length,
            )
            explorer = Explorer.open(
                recipe,
                dtype=dtype,
                evaluation_length=settings.evaluation_length,
                evaluation_windows=settings.evaluation_windows,
                progress=progress,
                trust_remote_code=policy.trust_remote_code,
                max_text_chars=policy.max_text_chars,
            )
            opened = (source, dtype, calibration, evaluation, settings)
            entry = Loaded(key, explorer, explorer.workspace.summary(), opened)
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            progress(1.0, "Model ready")
            return entry

    def reopen(
        self, loaded: Loaded, windows: int, length: int, progress: Progress, policy: AccessPolicy
    ) -> Loaded:
        """``loaded``'s model and texts calibrated on ``windows`` x ``length`` tokens (a plan
        file or preset that names another amount than the loaded one)."""
        *args, settings = loaded.opened
        amount = {"calibration_windows": windows, "calibration_length": length}
        return self.open(*args, replace(settings, **amount), progress, policy)


SHARED = Shared()


@dataclass
class Recovered:
    """A pruned copy with a plan's recovery applied, for the model and plan it was made for."""

    made_for: tuple[str | None, str]  # (model key, plan JSON), see ``SessionState.recovery_key``
    model: nn.Module
    reports: list[dict]
    perplexity: float


@dataclass
class SessionState:
    """One browser session's own things: its plan and what it computed with it."""

    model_key: str | None = None
    plan: Plan = field(default_factory=Plan)
    pruned_ppl: float | None = None  # the last finished preview, for ``preview_plan``
    preview_plan: str | None = None  # the plan JSON that preview was run for (see ``pruning_json``)
    recovered: Recovered | None = None  # the last recovery, re-used by an export of its plan
    node: str | None = None  # the node selected on the Structure tab
    second_domain: bool = True  # the preview also measures the off-domain text
    folder: str | None = None  # this session's scratch folder for downloads
    policy: AccessPolicy = field(default_factory=AccessPolicy)  # the server's, the same for all

    def plan_json(self) -> str:
        return self.plan.to_json()

    def switch_model(self, key: str) -> None:
        """Use another loaded entry: what was computed on the previous one no longer holds."""
        self.model_key, self.pruned_ppl, self.preview_plan, self.recovered = key, None, None, None

    def pruning_json(self) -> str:
        """The plan without its recovery: all that the masked (preview) perplexity depends on."""
        return replace(self.plan, recovery=[]).to_json()

    def known_pruned_ppl(self) -> float | None:
        """The last preview's pruned perplexity when it was run for the current pruning."""
        return self.pruned_ppl if self.preview_plan == self.pruning_json() else None

    def recovery_key(self) -> tuple[str | None, str]:
        return self.model_key, self.plan_json()

    def reusable_recovery(self) -> Recovered | None:
        """The last recovered model if it was made for exactly the current model and plan."""
        done = self.recovered
        return done if done is not None and done.made_for == self.recovery_key() else None

    def scratch(self, name: str) -> Path:
        """A folder of this session's own for files it offers for download (created on use)."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="pruning-explorer-session-")
        path = Path(self.folder) / name
        path.mkdir(exist_ok=True)
        return path


# -- work on the shared model ----------------------------------------------------------------------
def gradio_progress(progress: gr.Progress) -> Progress:
    """The library's ``progress(fraction, message)`` callback, shown by Gradio."""
    return lambda fraction, message: progress(min(max(fraction, 0.0), 1.0), desc=message)


def scores(loaded: Loaded, criterion: str, reduction: str, progress: Progress) -> dict:
    """Scores of a criterion, with attention statistics collected in the same calibration pass."""
    needs = CRITERIA[criterion].needs | ATTENTION
    with SHARED.lock:
        loaded.explorer.statistics(needs, progress)
        return loaded.explorer.scores(criterion, reduction, progress)


def select(loaded: Loaded, plan: Plan, progress: Progress) -> Selection:
    """The plan's selection; only the first use of a criterion computes anything heavy."""
    scores(loaded, plan.criterion, plan.reduction, progress)
    with SHARED.lock:  # a sensitivity plan measures its sweep here, the first time
        return loaded.explorer.select(plan, progress)


class Stopped(Exception):
    """Raised inside a worker when its run was stopped from the page."""


_RUNS: dict[str, threading.Event] = {}


def stop_runs(request: gr.Request) -> None:
    """The Stop button: tell this session's running worker to finish at its next step."""
    event = _RUNS.get(request.session_hash) if request else None
    if event is not None:
        event.set()


def streamed(
    work: Callable[[Callable[[Any], None]], Any],
    session_hash: str | None,
    policy: AccessPolicy | None = None,
) -> Iterator:
    """Run ``work(emit)`` under the lock in a worker thread; yield what it emits, as it emits it.

    The worker, not the page's generator, holds the lock and the masks: a generator that Gradio
    cancels or abandons mid-run can therefore never leave the shared model locked or masked. A
    stop (the Stop button, or the generator being closed) makes the next ``emit`` raise ``Stopped``;
    past the policy's ``max_job_seconds`` (counted from taking the lock) it raises the policy's
    ``JobLimitError``, which reaches the page. The final item yielded is ``("done", result)``.
    """
    stop = threading.Event()
    if session_hash:
        _RUNS[session_hash] = stop
    items: queue.Queue = queue.Queue()
    deadline = [math.inf]

    def emit(item: Any) -> None:
        if stop.is_set():
            raise Stopped
        if time.monotonic() > deadline[0]:
            raise policy.job_limit()
        items.put(("item", item))

    def run() -> None:
        try:
            with SHARED.lock:
                if policy is not None:
                    deadline[0] = time.monotonic() + policy.max_job_seconds
                result = work(emit)
            items.put(("done", result))
        except BaseException as exc:  # handed to the page's thread, which re-raises it
            items.put(("error", exc))

    threading.Thread(target=run, daemon=True, name="explorer-worker").start()
    try:
        while True:
            kind, value = items.get()
            if kind == "error":
                if isinstance(value, Stopped):
                    return
                raise value
            yield kind, value
            if kind == "done":
                return
    finally:
        stop.set()
        if session_hash and _RUNS.get(session_hash) is stop:
            del _RUNS[session_hash]


def api(name: str | None) -> dict:
    """Event options: a public endpoint called ``name``, or one only the page itself calls."""
    return {"api_name": name} if name else {"api_visibility": "private"}


def handler(fn: Callable, *panel_args) -> Callable:
    """``fn`` with its first arguments (the panel, the session state, ...) fixed, for an event.

    Handlers are ``fn(*panel_args, values, ...)``: ``values`` is the dict of the event's set of
    inputs, keyed by component. ``functools.partial`` would hide the signature and type hints
    Gradio reads to pass ``gr.Request`` and ``gr.Progress``, so they are kept here (and a
    generator stays a generator, which Gradio streams).
    """
    if inspect.isgeneratorfunction(fn):

        def bound(*args, **kwargs):
            yield from fn(*panel_args, *args, **kwargs)
    else:

        def bound(*args, **kwargs):
            return fn(*panel_args, *args, **kwargs)

    functools.update_wrapper(bound, fn)
    params = list(inspect.signature(fn).parameters.values())[len(panel_args) :]
    bound.__signature__ = inspect.Signature(params)
    return bound


def user_error(exc: ExplorerError) -> gr.Error:
    """A library error as Gradio shows it: the message as is, in a toast that stays a while."""
    return gr.Error(str(exc), duration=20, print_exception=False)


def human(n: float) -> str:
    """134515008 -> '134.5M'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def status(message: str, kind: str = "info") -> str:
    """A one-line status box (``kind``: info, ok, warn, error) as HTML for a ``gr.HTML``."""
    icon = {"info": "ℹ", "ok": "✓", "warn": "⚠", "error": "⚠"}[kind]
    return f'<div class="pe-status pe-{kind}">{icon} {escape(message)}</div>'
