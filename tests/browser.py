"""Debian's headless Chromium driven by Playwright, for the tests of pages the project serves
(``harmony monitor --web``, ``harmony report``'s ``report.html``).

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (installed by
``make test``) with a fresh profile and background networking off, since the machine has no
network beyond loopback. Use it as a fixture::

    from tests.browser import browser_page  # noqa: F401  (the fixture)

    def test_page(browser_page, tmp_path):
        browser_page.goto(url)
        ...
        browser_page.screenshot(path=artifact_path("dashboard.png"))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("HARMONY_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("HARMONY_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def artifact_path(name: str) -> Path:
    """Where a test saves a screenshot or page dump for a person to look at (``test-artifacts/``)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """One headless Chromium per test module (a playwright ``Browser``)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it apt-get installs Debian's chromium) "
                    "or set HARMONY_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="harmony-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def browser_page(chromium) -> Iterator[object]:
    """A fresh page (tab) in the module's Chromium; console errors are collected in ``page.errors``."""
    page = chromium.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))  # type: ignore[attr-defined]
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        page.close()
