"""Fixtures of the app tests: one app server per test run, a socket guard, Debian's chromium,
and the helpers the browser tests share (tabs, cells, toasts, screenshots, the preview).

The server runs the real app on the embedded SmolLM2 with a small evaluation set (4 windows of
256 tokens) and 4 calibration windows, so a run stays short on two cores; ``python app.py`` uses
the full defaults. Both the browser and the API tests share it (session scope), so the model loads
once. Nothing here may reach the network: the socket guard refuses and records every connection to
a non-loopback address from this process, and the browser fixture records every request the page
makes to anything but the app.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from explorer.planning.plan import Plan

# Before gradio (or the hub client) is imported anywhere in the test process.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "assets" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
EVAL_WINDOWS = 4
CALIBRATION_WINDOWS = 4
SLOW = 600_000  # ms: a cold calibration pass or an export on two busy cores


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="session")
def outbound() -> Iterator[list]:
    """Every non-loopback address this process tried to connect to (each attempt refused)."""
    attempts: list = []
    original = socket.socket.connect
    original_ex = socket.socket.connect_ex

    def guard(method):
        def connect(self, address):
            if not _is_loopback(address):
                attempts.append(address)
                raise ConnectionRefusedError(f"test socket guard: no connection to {address}")
            return method(self, address)

        return connect

    socket.socket.connect = guard(original)
    socket.socket.connect_ex = guard(original_ex)
    try:
        yield attempts
    finally:
        socket.socket.connect = original
        socket.socket.connect_ex = original_ex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(outbound, tmp_path_factory) -> Iterator[str]:
    """The app, on a free loopback port, for the whole test run.

    Its policy lets the tests load and export under pytest's temporary folders and try hub ids
    (which fail offline); tests/hardening checks the default policy.
    """
    import app
    from explorer.policy import AccessPolicy

    base = tmp_path_factory.getbasetemp()
    policy = AccessPolicy.make(allow_paths=[base], allow_hub=["*"], export_root=base)
    demo = app.build_app(
        default_plan=Plan(),
        eval_windows=EVAL_WINDOWS,
        calibration_windows=CALIBRATION_WINDOWS,
        policy=policy,
    )
    with served(demo) as url:
        yield url


@contextmanager
def served(demo) -> Iterator[str]:
    """``demo`` launched on a free loopback port (its URL), closed afterwards."""
    import app

    port = free_port()
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    """Debian's chromium driven by Playwright (never ``playwright install``)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium")),
            executable_path=CHROMIUM,
            headless=True,
            accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="session")
def page_requests() -> list[str]:
    """URLs pages asked for outside the app (fonts, CDNs, analytics...): must stay empty."""
    return []


@pytest.fixture
def nothing_phones_home(outbound, page_requests):
    """After a test: neither the server process nor the page reached past loopback."""
    yield
    assert outbound == []
    assert page_requests == []


def open_page(context, url: str, requests: list[str], loaded: str):
    """A fresh page (a new Gradio session) on ``url``, recording requests outside the app, once
    the Model tab says ``Loaded <loaded>``."""
    page = context.new_page()
    page.on(
        "request",
        lambda r: (
            None
            if r.url.startswith((url.rstrip("/"), "data:", "blob:"))
            else requests.append(r.url)
        ),
    )
    page.goto(url)
    page.wait_for_selector(f"#model-status:has-text('Loaded {loaded}')", timeout=SLOW)
    return page


@pytest.fixture
def page(browser_context, app_url, page_requests):
    """A fresh page (a new Gradio session) with the default model loaded."""
    page = open_page(browser_context, app_url, page_requests, "smollm2-135m")
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="session")
def client_factory(app_url):
    """New ``gradio_client.Client`` sessions on the app (each is its own Gradio session)."""
    from gradio_client import Client

    def make() -> Client:
        return Client(app_url, analytics_enabled=False, verbose=False)

    return make


# -- what a person does in the browser ---------------------------------------------------------------
def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let plotly finish its transitions
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def toast(page, text: str):
    return page.wait_for_selector(f'[data-testid="toast-body"]:has-text("{text}")', timeout=SLOW)


def close_toasts(page) -> None:
    for button in page.locator('[data-testid="toast-close"]').all():
        button.click()


def set_cell(page, row: int, col: int, value: str) -> None:
    """Type into a plan-table cell; the edit is committed when the cell loses focus."""
    cell = page.locator(f'#plan-table [data-testid="cell-{row}-{col}"]')
    cell.scroll_into_view_if_needed()
    cell.dblclick()
    editor = cell.locator("textarea")
    editor.press("Control+A")
    editor.press_sequentially(value)
    page.locator("#plan-counters").click()


def number(page, elem_id: str) -> float:
    return float(page.input_value(f"#{elem_id} textarea"))


def wait_plan(page, text: str) -> None:
    page.wait_for_selector(f"#plan-status:has-text('{text}')", timeout=SLOW)


def run_preview(page, previous: float | None = None) -> tuple[float, float]:
    """Press Run preview and wait for it to finish (with a value other than ``previous``)."""
    open_tab(page, "Preview")
    page.click("#preview-run")
    page.wait_for_function(
        """(previous) => {
            const status = document.querySelector('#preview-status');
            const pruned = document.querySelector('#preview-pruned textarea');
            return status && status.innerText.includes('Done') && pruned && pruned.value !== ''
                && Number(pruned.value) !== previous;
        }""",
        arg=previous,
        timeout=SLOW,
    )
    return number(page, "preview-dense"), number(page, "preview-pruned")
